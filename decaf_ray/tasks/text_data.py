"""Yes/no text data for the causal-LM task: WiC and BoolQ as prompts, tokenizers, truncation, F1.

Every example becomes ``body + tail`` followed by the answer `` yes`` (label 1) or `` no``
(label 0). ``body`` is the context that may be cut to fit ``max_length`` (BoolQ's passage, WiC's
two sentences); ``tail`` is the question ending in ``Answer:`` and is never cut:

    WiC:    Sentence 1: {sentence1}
            Sentence 2: {sentence2}
            Question: Is the word "{word}" used with the same meaning in both sentences?
            Answer: yes|no
    BoolQ:  Passage: {passage}
            Question: {question}?
            Answer: yes|no

Rows come from jsonl files (SuperGLUE's fields: WiC ``word/sentence1/sentence2/label``, BoolQ
``question/passage/label``; or WiC's prompt form ``{"label": 0/1, "text": "Word: w. Sentence 1:
... Sentence 2: ..."}``) or from the ``datasets`` library (SuperGLUE on the hub).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

DATASETS = ("wic", "boolq")
ANSWERS = (" no", " yes")
"""The answer text of label 0 and label 1; the positive class (F1) is " yes"."""
ANSWER_CUE = "Answer:"
_WIC_PROMPT = re.compile(r"^\s*Word:\s*(?P<word>.*?)\.\s*Sentence 1:\s*(?P<s1>.*?)\s*"
                         r"Sentence 2:\s*(?P<s2>.*?)\s*$", re.DOTALL)
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


@dataclass(frozen=True)
class Example:
    body: str
    """Context that may be shortened to fit ``max_length``."""
    tail: str
    """The question, ending in ``Answer:``; never shortened."""
    label: int
    """1 = yes, 0 = no."""

    @property
    def prompt(self) -> str:
        return self.body + self.tail


def parse_label(value: Any) -> int:
    """0/1 from a bool, 0/1, or "true"/"false"/"yes"/"no" (any case)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return int(value.strip().lower() in _TRUE)
    raise ValueError(f"label must be 0/1 or true/false, got {value!r}")


def wic_example(row: dict[str, Any]) -> Example:
    """A WiC row, in SuperGLUE's fields or the prompt form ``{"text": "Word: ...", "label"}``."""
    if "sentence1" in row:
        word, s1, s2 = row["word"], row["sentence1"], row["sentence2"]
    elif "text" in row:
        m = _WIC_PROMPT.match(row["text"])
        if m is None:
            raise ValueError("WiC text must read 'Word: w. Sentence 1: ... Sentence 2: ...'")
        word, s1, s2 = m["word"], m["s1"], m["s2"]
    else:
        raise ValueError("a WiC row needs word/sentence1/sentence2 or text")
    return Example(f"Sentence 1: {s1.strip()}\nSentence 2: {s2.strip()}\n",
                   f'Question: Is the word "{word.strip()}" used with the same meaning in both '
                   f"sentences?\n{ANSWER_CUE}", parse_label(row["label"]))


def boolq_example(row: dict[str, Any]) -> Example:
    """A BoolQ row: question, passage, label."""
    question = row["question"].strip().rstrip("?")
    question = question[:1].upper() + question[1:]
    return Example(f"Passage: {row['passage'].strip()}\n", f"Question: {question}?\n{ANSWER_CUE}",
                   parse_label(row["label"]))


EXAMPLE_BUILDERS = {"wic": wic_example, "boolq": boolq_example}


def read_jsonl(path: str | Path, dataset: str) -> list[Example]:
    """Examples of ``dataset`` from a jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    out = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(EXAMPLE_BUILDERS[dataset](json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a {dataset} row ({e!r})") from None
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def load_hub(dataset: str, split: str, hub_name: str) -> list[Example]:
    """Examples of SuperGLUE's ``dataset`` (wic/boolq) ``split`` through the ``datasets``
    library (downloads on first use)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "the causal_lm task reads WiC/BoolQ from the hub through the 'datasets' library, "
            "which is not installed: `pip install datasets`, or give task.train_file "
            "(and task.test_file) as local jsonl files") from None
    rows = datasets.load_dataset(hub_name, dataset, split=split)
    return [EXAMPLE_BUILDERS[dataset](dict(r)) for r in rows]


_TRAIN, _TEST, _SPLIT = 0, 1, 2  # seed streams


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    """A generator of its own for each use (``stream``) of one ``seed``: draws of one use do
    not shift another's (streams 0-2 here; the causal LM's random weights take 3)."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, stream]))


def load_splits(cfg: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test) examples of a ``CausalLMConfig``: from its files or the hub, split and capped
    with draws seeded by ``seed``. File and hub errors surface as ``ConfigError``."""
    from decaf_ray.config import ConfigError

    test = None
    try:
        if cfg.train_file is None:
            train = load_hub(cfg.dataset, "train", cfg.hub_dataset)
            test = load_hub(cfg.dataset, "validation", cfg.hub_dataset)
        else:
            train = read_jsonl(cfg.train_file, cfg.dataset)
            if cfg.test_file is not None:
                test = read_jsonl(cfg.test_file, cfg.dataset)
        return split_and_cap(train, test, cfg, seed)
    except (OSError, ValueError) as e:
        raise ConfigError("train_file" if cfg.train_file else "dataset", str(e)) from None


def split_and_cap(train: list, test: list | None, cfg: Any, seed: int) -> tuple[list, list]:
    """``(train, test)`` rows: ``test`` or else a seeded ``cfg.test_fraction`` of ``train``,
    each then cut to a seeded ``cfg.train_samples`` / ``cfg.test_samples``. Seed streams are
    the same for every text task, so a file gives the same split whichever task reads it."""
    if test is None:
        if len(train) < 2:
            raise ValueError(f"{cfg.train_file}: too few rows to split")
        tr, te = split_rows(len(train), cfg.test_fraction, stream_rng(seed, _SPLIT))
        train, test = [train[i] for i in tr], [train[i] for i in te]
    train = [train[i] for i in subsample(len(train), cfg.train_samples, stream_rng(seed, _TRAIN))]
    test = [test[i] for i in subsample(len(test), cfg.test_samples, stream_rng(seed, _TEST))]
    return train, test


def subsample(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``cap`` of ``n`` rows drawn without replacement (all when None)."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def split_rows(n: int, test_fraction: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of ``n`` rows: (train indices, test indices), both sorted."""
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def binary_f1(pred: Iterable[int], gold: Iterable[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2 TP / (2 TP + FP + FN); 0 when there is nothing to count."""
    p, g = np.asarray(list(pred)), np.asarray(list(gold))
    tp = int(((p == positive) & (g == positive)).sum())
    fp = int(((p == positive) & (g != positive)).sum())
    fn = int(((p != positive) & (g == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


# ------------------------------------------------------------------------------ tokenizers


class Codec(Protocol):
    """What the task needs of a tokenizer."""

    prefix: list[int]
    """Ids put before every prompt (BOS when the tokenizer adds one)."""
    pad_id: int
    size: int
    """Vocabulary size (a model built for this tokenizer needs at least this many embeddings)."""

    def encode(self, text: str) -> list[int]: ...


_WORD = re.compile(r"\w+|[^\w\s]")


class WordCodec:
    """A lower-cased word-level vocabulary built from the given texts: for tiny test models."""

    SPECIALS = ("<pad>", "<s>", "<unk>")

    def __init__(self, texts: Iterable[str]):
        words = sorted({w for t in texts for w in _WORD.findall(t.lower())})
        self.vocab = {w: i for i, w in enumerate([*self.SPECIALS, *words])}
        self.prefix, self.pad_id, self.size = [1], 0, len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(w, 2) for w in _WORD.findall(text.lower())]


class ByteCodec:
    """UTF-8 bytes, offset past three specials (pad 0, BOS 1, EOS 2)."""

    def __init__(self):
        self.prefix, self.pad_id, self.size, self.eos_id = [1], 0, 259, 2

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFCodec:
    """A transformers tokenizer; ``prefix`` is what it adds in front of a text (BOS or nothing)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bare = self.encode("x")
        full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
        start = next((i for i in range(len(full) - len(bare) + 1)
                      if full[i:i + len(bare)] == bare), 0)
        self.prefix = full[:start]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def answer_ids(codec: Codec, answers: Iterable[str] = ANSWERS) -> list[list[int]]:
    """Token ids of each answer as it follows ``Answer:`` (so sentencepiece's word-start marker
    comes out as it would in the full text)."""
    base = codec.encode(ANSWER_CUE)
    out = []
    for a in answers:
        full = codec.encode(ANSWER_CUE + a)
        ids = full[len(base):] if full[:len(base)] == base and len(full) > len(base) else codec.encode(a)
        if not ids:
            raise ValueError(f"the tokenizer gives no tokens for the answer {a!r}")
        out.append(ids)
    if len({tuple(i) for i in out}) < len(out):
        raise ValueError(f"the tokenizer cannot tell the answers {list(answers)} apart")
    return out


def encode_prompt(codec: Codec, ex: Example, budget: int) -> list[int]:
    """``prefix + encode(prompt)`` in at most ``budget`` tokens.

    A prompt that is too long loses the end of its body, cut at a word boundary (the longest cut
    that fits, by bisection) and marked with " ..."; if even an empty body is too long, the
    first tokens go, keeping the question and ``Answer:``.
    """
    room = budget - len(codec.prefix)
    if room < 1:
        raise ValueError(f"max_length leaves no room for a prompt (budget {budget})")
    ids = codec.encode(ex.prompt)
    if len(ids) <= room:
        return codec.prefix + ids
    cuts = [m.start() for m in re.finditer(r"\s+", ex.body)]
    cut_body = lambda c: ex.body[:c].rstrip() + " ...\n" if c else ""
    fits = lambda c: len(codec.encode(cut_body(c) + ex.tail)) <= room
    lo, hi = 0, len(cuts) - 1  # invariant: cuts[j] fits for j < lo, fails for j > hi
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(cuts[mid]):
            lo = mid + 1
        else:
            hi = mid - 1
    if hi >= 0 and cuts[hi] > 0:
        return codec.prefix + codec.encode(cut_body(cuts[hi]) + ex.tail)
    return codec.prefix + codec.encode(ex.tail)[-room:]
