"""Analysis of saved runs: read only what ``decaf_ray.results`` wrote, never a live run.

``load(path)`` gives one tidy DataFrame of every run under ``path`` (a run directory or any folder
of them): the metric rows plus flattened config columns (``algorithm``, ``topology.name``,
``lora.rank``, ...) and the run's ``status`` and ``run`` (its directory).
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


def plot_runs(path: str | Path, metric: str, out: str | Path) -> Path:
    """``metric`` against round for every run under ``path``: the mean over agents as a line,
    the range over agents as a band. Writes ``out`` and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = load(path)
    df = df[df.metric == metric]
    if df.empty:
        raise ValueError(f"no run under {path} recorded metric {metric!r}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, g in df.groupby("run", sort=True):
        agents = g[g.agent >= 0].groupby("round")["value"]
        net = g[g.agent == -1].set_index("round")["value"]
        label = g["name"].iloc[0] if isinstance(g["name"].iloc[0], str) else g["algorithm"].iloc[0]
        line, = ax.plot(net.index, net.values, label=label)
        if len(agents):
            ax.fill_between(agents.min().index, agents.min().values, agents.max().values,
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
