"""Reading saved runs: what ``decaf_ray.results`` wrote, as one tidy DataFrame.

A run directory holds ``metrics.csv`` (rows ``round, step, agent, metric, value``; agent -1 is a
network-wide row), ``config.json`` and, once it has ended, ``summary.json``. This module reads
those files and nothing else; it builds no task and imports nothing from ``decaf_ray``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def run_dirs(path: str | Path) -> list[Path]:
    """Every directory at or below ``path`` holding a ``metrics.csv``, sorted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such results directory")
    return sorted(p.parent for p in path.rglob("metrics.csv"))


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts to dotted keys (``{"lora": {"rank": 2}}`` -> ``{"lora.rank": 2}``); lists
    become JSON strings so that a column stays hashable."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v if not isinstance(v, list) else json.dumps(v)
    return out


def load(path: str | Path) -> pd.DataFrame:
    """Tidy rows ``run, status, <config columns>, round, step, agent, metric, value``."""
    frames = []
    for d in run_dirs(path):
        df = pd.read_csv(d / "metrics.csv")
        cfg = _flatten(json.loads((d / "config.json").read_text()))
        summary_file = d / "summary.json"
        status = json.loads(summary_file.read_text())["status"] if summary_file.exists() else "running"
        meta = {"run": str(d), "status": status, **cfg}
        frames.append(df.assign(**{k: v for k, v in meta.items() if k not in df.columns}))
    if not frames:
        raise FileNotFoundError(f"{path}: holds no run (no metrics.csv below it)")
    return pd.concat(frames, ignore_index=True)


def as_frame(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """``results`` itself when it is a DataFrame, else ``load(results)``."""
    if isinstance(results, pd.DataFrame):
        return results
    return load(results)


def summaries(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """One row per run of each run's ``summary.json``, flattened (``final.test_accuracy``,
    ``time_per_round_s``, ``trainable_params_per_agent``, ...), indexed by run. A run without a
    summary (still running) gets an empty row."""
    df = as_frame(results)
    rows = {}
    for run in df["run"].unique():
        f = Path(run) / "summary.json"
        rows[run] = _flatten(json.loads(f.read_text())) if f.exists() else {}
    return pd.DataFrame.from_dict(rows, orient="index")
