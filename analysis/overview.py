"""One line per run: what ``decaf-ray plot`` draws without ``--figure``.

Unlike the paper's figures, no run is averaged with another or held out: every usable run under
the folder is a line (``analysis.load`` skips failed, empty and unreadable ones with a notice).
The legend names a run by what differs between the runs drawn (``data.run_labels``) and flags
one that did not complete (``names.status_flag``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.data import run_labels, run_table
from analysis.names import status_flag
from analysis.runs import as_frame


def runs_figure(results: str | Path | pd.DataFrame, metric: str,
                root: str | Path | None = None) -> Figure:
    """``metric`` against round for every run of ``results`` (a folder of runs or a tidy frame):
    the network-wide value (agent -1) as a line, the range over agents as a band.

    ``root``: what directory labels are relative to (default: ``results`` when it is a path).
    Raises ``ValueError`` when no run recorded ``metric``."""
    df = as_frame(results)
    df = df[df.metric == metric]
    if df.empty:
        where = f"under {results}" if isinstance(results, (str, Path)) else "here"
        raise ValueError(f"no run {where} recorded metric {metric!r}")
    if root is None and isinstance(results, (str, Path)):
        root = results
    runs = run_table(df)
    status = dict(zip(runs["run"], runs["status"]))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for run, label in run_labels(runs, root=root).items():
        g = df[df["run"] == run]
        agents = g[g.agent >= 0].groupby("round")["value"]
        net = g[g.agent == -1].set_index("round")["value"]
        line, = ax.plot(net.index, net.values, label=label + status_flag(status[run]))
        if len(agents):
            ax.fill_between(agents.min().index, agents.min().values, agents.max().values,
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
