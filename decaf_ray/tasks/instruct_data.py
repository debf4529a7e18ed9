"""Instruction data for the ``instruct`` task: Alpaca-style records, prompt templates, response-only
labels with truncation, the labels partitioners split, and the benchmark prompts.

A record is ``instruction`` + optional ``input`` -> ``output`` (Alpaca, Alpaca-GPT4, Dolly as
AlpaGasus ships it, with ``category``). A training example is ``prompt + response + EOS``; the
loss counts the response and EOS tokens only. Templates:

    alpaca: Stanford Alpaca's prompt ("Below is an instruction that describes a task ...
            ### Instruction: ... [### Input: ...] ### Response:"); a second turn (MT-Bench)
            continues the text with another "### Instruction:" block.
    chat:   the tokenizer's chat template (``apply_chat_template``), the user message being
            the instruction and the input separated by a blank line.

Truncation (ours; the paper does not say): an example longer than ``max_length`` keeps at most
``max_length // 2`` prompt tokens, cut in the middle so the template's head and the cue that
asks for the response both stay, and the response is cut at its end to fill the rest.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from decaf_ray.config import ConfigError
from decaf_ray.tasks.text_data import split_and_cap, stream_rng, subsample

ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n")
ALPACA_NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
BENCH_FILES = {"advbench": "advbench_harmful_behaviors.csv", "mt_bench": "mt_bench_question.jsonl",
               "vicuna": "vicuna_bench_question.jsonl"}
JUDGE_PROMPTS = "judge_prompts.jsonl"
_BENCH = 4  # seed streams: text_data's 0-2 split and cap, 3 is a random model's weights


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    category: str | None = None

    @property
    def user(self) -> str:
        """The user's message: the instruction, then the input after a blank line."""
        return self.instruction + (f"\n\n{self.input}" if self.input else "")


@dataclass(frozen=True)
class BenchItem:
    """One benchmark prompt: its turns (MT-Bench has two) and reference answers if any."""

    benchmark: str
    question_id: str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None


# ------------------------------------------------------------------ records


def record(row: Any, where: str) -> Record:
    """A ``Record`` from an Alpaca-style mapping; a missing field names ``where`` (file:row)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with instruction/output, got {row!r:.60}")
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: needs a string {key!r}")
    cat = row.get("category")
    return Record(row["instruction"], str(row.get("input") or ""), row["output"],
                  None if cat is None else str(cat))


def read_records(path: str | Path) -> list[Record]:
    """Records of a .json file (a list of objects) or a .jsonl file (an object a line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    else:
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or a .jsonl file)")
        rows = [(f"{path}: record {n}", r) for n, r in enumerate(data)]
    if not rows:
        raise ValueError(f"{path}: no records")
    return [record(r, where) for where, r in rows]


def load_hub_records(name: str) -> list[Record]:
    """The train split of hub dataset ``name`` (``datasets`` library; downloads on first use)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("the instruct task reads hub datasets through the 'datasets' library, "
                          "which is not installed: `pip install 'decaf-ray[hub]'`, or give "
                          "task.train_file as a local .json/.jsonl file") from None
    rows = datasets.load_dataset(name, split="train")
    return [record(dict(r), f"{name}: row {n}") for n, r in enumerate(rows)]


def load_records(cfg: Any, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, test) records of an ``InstructConfig``: from its files or the hub, split and capped
    with draws seeded by ``seed``. File errors surface as ``ConfigError`` naming the file."""
    field_name, test = "train_file" if cfg.train_file else "hub_dataset", None
    try:
        train = read_records(cfg.train_file) if cfg.train_file else load_hub_records(cfg.hub_dataset)
        if cfg.test_file is not None:
            field_name = "test_file"
            test = read_records(cfg.test_file)
        return split_and_cap(train, test, cfg, seed)
    except (OSError, ValueError) as e:
        raise ConfigError(field_name, str(e)) from None


def split_labels(records: Sequence[Record], by: str, clusters: int, seed: int) -> np.ndarray:
    """(n,) int labels for the partitioners: all 0 (``none``), the category's index in sorted
    order (``category``), or the k-means cluster of the instruction's TF-IDF vector
    (``clusters``, ``clusters`` of them, seeded)."""
    n = len(records)
    if by == "none":
        return np.zeros(n, dtype=np.int64)
    if by == "category":
        missing = sum(r.category is None for r in records)
        if missing:
            raise ConfigError("split_by", f"category: {missing} of {n} records have no "
                                          "'category' field; use split_by: clusters")
        names = sorted({r.category for r in records})
        index = {c: i for i, c in enumerate(names)}
        return np.array([index[r.category] for r in records], dtype=np.int64)
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    if n < clusters:
        raise ConfigError("clusters", f"must be <= the {n} training records")
    vectors = TfidfVectorizer(max_features=4096, stop_words="english").fit_transform(
        [r.user for r in records])
    km = KMeans(n_clusters=clusters, n_init=4, random_state=seed % 2**32)
    return km.fit_predict(vectors).astype(np.int64)


# ------------------------------------------------------------------ templates and tokens


class Template:
    """Token ids of a conversation's prompt, ready for the assistant's next answer."""

    def __init__(self, kind: str, codec: Any):
        self.kind, self.codec = kind, codec
        if kind == "chat" and not getattr(getattr(codec, "tokenizer", None), "chat_template", None):
            raise ConfigError("template", "chat: the tokenizer has no chat template; "
                                          "use template: alpaca")

    def prompt(self, turns: Sequence[str], answers: Sequence[str] = ()) -> list[int]:
        """Ids of user ``turns`` with the assistant's earlier ``answers`` (one fewer than turns),
        ending where the assistant answers the last turn."""
        if self.kind == "chat":
            messages = []
            for k, user in enumerate(turns):
                messages.append({"role": "user", "content": user})
                if k < len(answers):
                    messages.append({"role": "assistant", "content": answers[k]})
            ids = self.codec.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                           tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = ALPACA_NO_INPUT.format(instruction=turns[0])
        for k, user in enumerate(turns[1:]):
            text += answers[k] + ALPACA_NEXT_TURN.format(instruction=user)
        return self.codec.prefix + self.codec.encode(text)

    def record_prompt(self, rec: Record) -> list[int]:
        """A training record's prompt (Alpaca's with-input form when it has an input)."""
        if self.kind == "alpaca" and rec.input:
            return self.codec.prefix + self.codec.encode(
                ALPACA_INPUT.format(instruction=rec.instruction, input=rec.input))
        return self.prompt([rec.user])

    def clean(self, answer: str) -> str:
        """A generated answer up to where a base model starts a new Alpaca block."""
        if self.kind == "alpaca":
            answer = answer.split("\n### ")[0]
        return answer.strip()


def fit_prompt(prompt: list[int], budget: int) -> list[int]:
    """``prompt`` in at most ``budget`` tokens, its middle cut (head and tail kept)."""
    if len(prompt) <= budget:
        return prompt
    head = budget // 2
    return prompt[:head] + prompt[len(prompt) - (budget - head):]


def example(prompt: list[int], response: list[int], eos: int, max_length: int
            ) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: ``prompt + response + [eos]`` in at most ``max_length`` tokens (see
    the module docstring), and how many of them are prompt (not scored)."""
    prompt = fit_prompt(prompt, max(max_length // 2, max_length - len(response) - 1))
    ids = (prompt + response + [eos])[:max_length]
    return ids, len(prompt)


# ------------------------------------------------------------------ benchmarks


def load_benchmarks(cfg: Any, seed: int) -> list[BenchItem]:
    """The prompts of ``cfg.benchmarks`` from ``cfg.eval_dir``, each benchmark cut to a seeded
    ``bench_samples`` subset (the same for every agent and algorithm of a seed)."""
    out: list[BenchItem] = []
    for k, name in enumerate(cfg.benchmarks):
        path = Path(cfg.eval_dir) / BENCH_FILES[name]
        try:
            items = _read_advbench(path) if name == "advbench" else _read_questions(path, name)
        except (OSError, ValueError, KeyError, csv.Error) as e:
            raise ConfigError("eval_dir", f"{path}: {e}") from None
        keep = subsample(len(items), cfg.bench_samples, stream_rng(seed, _BENCH + k))
        out += [items[i] for i in keep]
    return out


def _read_advbench(path: Path) -> list[BenchItem]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "goal" not in rows[0]:
        raise ValueError("expected a CSV with a 'goal' column (llm-attacks' harmful_behaviors)")
    return [BenchItem("advbench", str(n), "harmful", (r["goal"],)) for n, r in enumerate(rows)]


def _read_questions(path: Path, name: str) -> list[BenchItem]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            ref = q.get("reference")
            items.append(BenchItem(name, str(q["question_id"]), q.get("category", ""),
                                   tuple(q["turns"]), tuple(ref) if ref else None))
    if not items:
        raise ValueError("no questions")
    return items


def refused(answer: str, prefixes: Sequence[str]) -> bool:
    """llm-attacks' test: an answer is a refusal when any prefix occurs in it."""
    return any(p in answer for p in prefixes)
