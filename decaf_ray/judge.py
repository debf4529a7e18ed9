"""Scores MT-Bench and Vicuna-bench answers with a judge: FastChat's single-answer grading (1-10)
through its judge prompts, after a run, on the driver.

The instruct task saves its answers as ``RunResult.generations``; ``judge_result`` asks the
configured judge (``task.judge``: an OpenAI-compatible chat endpoint, or a local transformers
model) for a verdict on every MT-Bench turn and Vicuna question, adds the verdicts to the
records, and the scores as metric rows of the final round: ``mt_bench_score`` (mean over both
turns, as FastChat's ``show_result``) and ``vicuna_score`` per agent, their means at agent -1.
Math, reasoning and coding questions with a reference answer get the ``single-math-v1``
prompts, the rest ``single-v1``; MT-Bench's second turn the ``-multi-turn`` ones. A verdict
without a ``[[rating]]`` counts as unscored (``*_unscored``), never as a number.

Without a judge, nothing is scored and the summary says why in one line. A judge that fails
mid-way leaves the run's results whole: the summary records the error.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from decaf_ray import metrics
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig
from decaf_ray.plan import Row, RunResult
from decaf_ray.tasks.instruct_data import JUDGE_PROMPTS

JUDGED = {"mt_bench": "mt_bench_score", "vicuna": "vicuna_score"}
NEED_REFERENCE = ("math", "reasoning", "coding")
_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))

Ask = Callable[[str, str], str]
"""``ask(system, user) -> verdict text``."""


def judged(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg`` makes answers a judge scores (an instruct task with MT-Bench/Vicuna)."""
    return cfg.task.kind == "instruct" and any(b in JUDGED for b in cfg.task.benchmarks)


def check(cfg: ExperimentConfig) -> None:
    """Before a run: the judge's API key variable is set and its endpoint answers, so a wrong
    judge stops the run before training, not after it. ConfigError naming the field if not."""
    judge = cfg.task.judge if judged(cfg) else None
    if judge is None or judge.kind != "openai":
        return
    if judge.api_key_env and not os.environ.get(judge.api_key_env):
        raise ConfigError("task.judge.api_key_env",
                          f"{judge.api_key_env} is not set (the judge's API key), or set "
                          "api_key_env: null for a server without keys")
    try:
        _request(judge, "GET", "/models", None, timeout=min(judge.timeout_s, 30.0))
    except (OSError, ValueError) as e:
        raise ConfigError("task.judge.url", f"{judge.url} does not answer: {e}") from None


def parse_rating(text: str) -> float | None:
    """FastChat's rule: the number in ``[[...]]`` (else in ``[...]``), or None."""
    for pattern in _RATING:
        m = pattern.search(text)
        if m:
            return float(m.group(1))
    return None


def load_prompts(path: str | Path) -> dict[str, dict[str, str]]:
    """FastChat's judge prompts by name (``single-v1``, ``single-math-v1-multi-turn``, ...)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = json.loads(line)
            out[p["name"]] = p
    return out


def judge_prompts(rec: dict[str, Any], prompts: dict[str, dict[str, str]]
                  ) -> list[tuple[str, str]]:
    """``(system, user)`` of each verdict a generation record needs: one per turn."""
    ref = rec.get("reference") if rec["category"] in NEED_REFERENCE else None
    kind = "single-math-v1" if ref else "single-v1"
    q, a = rec["turns"], rec["answers"]
    fields = {"question": q[0], "answer": a[0], "ref_answer_1": ref[0] if ref else ""}
    out = [(prompts[kind]["system_prompt"], prompts[kind]["prompt_template"].format(**fields))]
    if len(q) > 1:
        multi = prompts[f"{kind}-multi-turn"]
        fields = {"question_1": q[0], "question_2": q[1], "answer_1": a[0], "answer_2": a[1],
                  "ref_answer_1": ref[0] if ref else "",
                  "ref_answer_2": ref[1] if ref and len(ref) > 1 else ""}
        out.append((multi["system_prompt"], multi["prompt_template"].format(**fields)))
    return out


def judge_result(cfg: ExperimentConfig, result: RunResult,
                 on_rows: Callable[[list[Row]], None] | None = None,
                 ask: Ask | None = None) -> RunResult:
    """``result`` with its MT-Bench/Vicuna answers judged (see the module docstring); rows go to
    ``on_rows`` too. ``ask`` replaces the configured judge (another caller's own client)."""
    records = [g for g in result.generations if g.get("benchmark") in JUDGED]
    if not records:
        return result
    judge = cfg.task.judge
    if judge is None and ask is None:
        why = ("not scored: no task.judge is configured (their answers are in "
               "generations.jsonl)")
        print(f"decaf-ray: MT-Bench/Vicuna-bench {why}", file=sys.stderr)
        result.summary["judge"] = why
        return result
    try:
        prompts = load_prompts(Path(cfg.task.eval_dir) / JUDGE_PROMPTS)
        ask = ask or make_judge(judge)
        for rec in records:
            rec["judgments"] = []
            for system, user in judge_prompts(rec, prompts):
                text = ask(system, user)
                rec["judgments"].append({"score": parse_rating(text), "judgment": text})
    except (OSError, ValueError, KeyError) as e:
        why = f"failed: {type(e).__name__}: {e}"
        print(f"decaf-ray: the judge {why}; the run's other results are saved", file=sys.stderr)
        result.summary["judge"] = why
        return result
    rows = _score_rows(result, records)
    result.rows.extend(rows)
    result.summary["final"].update({r["metric"]: r["value"] for r in rows if r["agent"] == -1})
    result.summary["judge"] = judge.model if judge else "custom"
    if on_rows is not None:
        on_rows(rows)
    return result


def _score_rows(result: RunResult, records: list[dict[str, Any]]) -> list[Row]:
    """Per-agent mean score and unscored count of each judged benchmark, then their means."""
    last = max((r for r in result.rows), key=lambda r: r["round"])
    rnd, step = last["round"], last["step"]
    scores: dict[tuple[int, str], list[float | None]] = {}
    for r in records:
        scores.setdefault((r["agent"], r["benchmark"]), []).extend(
            j["score"] for j in r["judgments"])
    per_agent: dict[int, dict[str, float]] = {}
    for (agent, bench), got in sorted(scores.items()):
        valid = [s for s in got if s is not None]
        m, metric = per_agent.setdefault(agent, {}), JUDGED[bench]
        m[metric] = float(np.mean(valid)) if valid else float("nan")
        m[metric.replace("_score", "_unscored")] = float(len(got) - len(valid))
    rows = [{"round": rnd, "step": step, "agent": a, "metric": k, "value": v}
            for a, m in sorted(per_agent.items()) for k, v in sorted(m.items())]
    scored = {a: {k: v for k, v in m.items() if not np.isnan(v)} for a, m in per_agent.items()}
    net = metrics.means(scored)  # over the agents that have a score
    for k in sorted({k for m in per_agent.values() for k in m}):
        rows.append({"round": rnd, "step": step, "agent": -1, "metric": k,
                     "value": net.get(k, float("nan"))})
    return rows


# ------------------------------------------------------------------ judges


def make_judge(judge) -> Ask:
    """The ``ask`` of a ``JudgeConfig``: an endpoint client or a local model."""
    return _endpoint(judge) if judge.kind == "openai" else _local(judge)


def _request(judge, method: str, path: str, body: dict | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(judge.api_key_env) if judge.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(judge.url.rstrip("/") + path, data=data, headers=headers,
                                 method=method)
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read().decode())


def _endpoint(judge) -> Ask:
    """``ask`` through ``{url}/chat/completions`` at temperature 0, retried with backoff on
    timeouts, 429 and 5xx; other HTTP errors raise at once with the server's message."""

    def ask(system: str, user: str) -> str:
        body = {"model": judge.model, "temperature": 0, "max_tokens": judge.max_tokens,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": user}]}
        for attempt in range(judge.retries + 1):
            try:
                reply = _request(judge, "POST", "/chat/completions", body, judge.timeout_s)
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500 or attempt == judge.retries:
                    raise ValueError(f"{judge.url}: HTTP {e.code}: {e.read()[:200]!r}") from None
            except (TimeoutError, urllib.error.URLError) as e:
                if attempt == judge.retries:
                    raise OSError(f"{judge.url}: {e}") from None
            time.sleep(min(2.0 ** attempt, 30.0))
        raise AssertionError("unreachable")

    return ask


def _local(judge) -> Ask:
    """``ask`` by a transformers model on this machine, greedy, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decaf_ray.tasks.generate import greedy

    tokenizer = AutoTokenizer.from_pretrained(judge.model)
    model = AutoModelForCausalLM.from_pretrained(judge.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    def ask(system: str, user: str) -> str:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                             {"role": "user", "content": user}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        new = greedy(model, [ids], pad_id=pad, eos_id=tokenizer.eos_token_id,
                     max_new_tokens=judge.max_tokens, batch_size=1, device=device, desc="judge")
        return tokenizer.decode(new[0], skip_special_tokens=True)

    return ask
