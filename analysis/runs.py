"""Reading saved runs: what ``decaf_ray.results`` wrote, as one tidy DataFrame.

A run directory holds ``metrics.csv`` (rows ``round, step, agent, metric, value``; agent -1 is a
network-wide row), ``config.json`` and, once it has ended, ``summary.json``. This module reads
those files and nothing else; it builds no task and imports nothing from ``decaf_ray``.

A folder of runs often holds a few that cannot be drawn: a run that failed, one killed before
its first evaluation (a header-only or empty ``metrics.csv``), or a half-written file. ``load``
skips each with a one-line notice on stderr and reads the rest, so one bad trial does not hide a
sweep; it raises only when nothing is left.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

COLUMNS = ("round", "step", "agent", "metric", "value")
MARKERS = ("metrics.csv", "summary.json")
"""A directory holding either is a run (a failed run may have a summary and no rows)."""
NO_SUMMARY = "running"
"""The status of a run without ``summary.json``: still running, or killed before it wrote one."""


class Unusable(Exception):
    """A run directory that cannot be drawn; the message says why, on one line."""


def run_dirs(path: str | Path) -> list[Path]:
    """Every directory at or below ``path`` holding a ``metrics.csv`` or a ``summary.json``,
    sorted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such results directory")
    return sorted({p.parent for marker in MARKERS for p in path.rglob(marker)})


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


def _one_line(text: str) -> str:
    """The first non-empty line: a recorded error may span lines, a notice does not."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _first_line(e: BaseException) -> str:
    line = _one_line(str(e))
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # a file cut short by a kill is not JSON
        raise Unusable(f"unreadable {file.name} ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise Unusable(f"unreadable {file.name} (not a JSON object)")
    return data


def read_run(d: str | Path) -> tuple[pd.DataFrame, str, dict]:
    """One run directory as ``(metric rows, status, flattened config)``.

    ``status``: the summary's (``completed``, ``diverged``, ``interrupted``), or ``running``
    without a summary. Raises ``Unusable`` for a failed run, a run without rows, and a missing
    or unreadable file."""
    d = Path(d)
    status = NO_SUMMARY
    if (d / "summary.json").is_file():
        summary = _json(d / "summary.json")
        status = str(summary.get("status", "unknown"))
        if status == "failed":
            error = _one_line(summary.get("error") or "") or "no error recorded"
            raise Unusable(f"failed ({error})")
    if not (d / "config.json").is_file():
        raise Unusable("no config.json")
    cfg = _flatten(_json(d / "config.json"))
    if not (d / "metrics.csv").is_file():
        raise Unusable("no metrics.csv")
    try:
        rows = pd.read_csv(d / "metrics.csv")
    except pd.errors.EmptyDataError:  # zero bytes: killed before the header was written
        raise Unusable("no metrics yet") from None
    except (OSError, ValueError) as e:
        raise Unusable(f"unreadable metrics.csv ({_first_line(e)})") from None
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise Unusable(f"unreadable metrics.csv (no column {', '.join(missing)})")
    if rows.empty:
        raise Unusable("no metrics yet")
    return rows, status, cfg


def notice(d: str | Path, why: str) -> None:
    """The one line telling the user a run was left out."""
    print(f"decaf-ray: skipped {d}: {_one_line(why) or 'unusable'}", file=sys.stderr)


TIDY_SUFFIXES = (".csv", ".csv.gz")
"""A results path ending so is a tidy CSV (``docs/results/regenerate.py`` writes them)."""


def load_tidy(path: str | Path) -> pd.DataFrame:
    """A tidy CSV written from ``load``'s frame (``run, status, <config columns>, round, step,
    agent, metric, value``), as that frame. It holds no config.json or summary.json, so views
    that read those (summary tables, the label distribution, the epoch axis) need run folders.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` when a column is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    df = pd.read_csv(path)
    missing = [c for c in ("run", "status", *COLUMNS) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a tidy results CSV (no column {', '.join(missing)})")
    return df


def load(path: str | Path | list[str | Path]) -> pd.DataFrame:
    """Tidy rows ``run, status, <config columns>, round, step, agent, metric, value`` of every
    usable run under ``path`` (see the module docstring for what is skipped, with a notice).
    ``path`` may also be a tidy CSV (``load_tidy``), or a list of paths, read and concatenated.

    Raises ``FileNotFoundError`` when ``path`` holds no run directory and ``ValueError`` when
    every run in it was skipped."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise FileNotFoundError("no results path given")
        return pd.concat([load(p) for p in path], ignore_index=True)
    if str(path).endswith(TIDY_SUFFIXES):
        return load_tidy(path)
    dirs = run_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"{path}: holds no run (no metrics.csv below it)")
    frames = []
    for d in dirs:
        try:
            rows, status, cfg = read_run(d)
        except Unusable as e:
            notice(d, str(e))
            continue
        meta = {"run": str(d), "status": status, **cfg}
        frames.append(rows.assign(**{k: v for k, v in meta.items() if k not in rows.columns}))
    if not frames:
        raise ValueError(f"{path}: no run left to read ({len(dirs)} skipped: failed, empty or "
                         f"unreadable)")
    return pd.concat(frames, ignore_index=True)


def as_frame(results: str | Path | list[str | Path] | pd.DataFrame) -> pd.DataFrame:
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
