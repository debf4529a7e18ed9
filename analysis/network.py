"""Figures of the ``network:`` section's runs (issue 18): a metric against what the network cost
(bytes sent, simulated time), and how the final metric holds up as the network degrades.

- ``network_curves``: one line per condition (by algorithm, default) of ``metric`` against
  ``x``: ``bytes_sent`` (the cumulative bytes per agent, as encoded: the network rows, the
  server's broadcast included), ``sim_time_s`` (the simulated clock), or ``round``. The same x
  axes work in ``fig2``/``fig3`` (``x="bytes_sent"``), through ``values.metric_x``.
- ``robustness``: the final ``metric`` against a swept network parameter
  (``network.link_failure``, ``network.participation``, ...), one line per algorithm, the band
  over seeds; every other setting held at the value most conditions share
  (``data.conditions``), so a one-factor-at-a-time sweep draws each factor from the default.

Both read only the saved files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.data import conditions, run_table, select
from analysis.figures import Where, corner_note, curves_panel, new_figure, no_data
from analysis.names import colour, is_fraction_metric, metric_label, pretty, resolve
from analysis.runs import as_frame
from analysis.values import final_values, last_common_round

PARAM_LABELS = {"network.link_failure": "link failure probability",
                "network.participation": "participation probability",
                "network.schedule": "schedule", "network.compress.kind": "message format"}
"""Axis labels of the parameters ``robustness`` is drawn against (others: the column)."""


def network_curves(results, *, metric: str = "test_accuracy", x: str = "bytes_sent",
                   by: Sequence[str] = ("algorithm",), band: str = "range",
                   others: str = "hold", where: Where = None) -> Figure:
    """``metric`` (agent mean) against ``x`` (``bytes_sent``, ``sim_time_s``, ``round``,
    ``step``), one line per condition of ``by``; the band is the range over agents, or over
    seeds when a condition has several (see ``analysis.figures``)."""
    df = as_frame(results)
    runs = select(run_table(df, metric), where)
    fig, axes = new_figure(1, size=(6.0, 4.2))
    curves_panel(axes[0], df, runs, list(by), metric, x=x, band=band, others=others,
                 colour_by="algorithm" if "algorithm" in by else None,
                 title=f"{metric_label(metric)} against {x.replace('_', ' ')}")
    return fig


def robustness_points(results, *, param: str = "network.link_failure",
                      metric: str = "test_accuracy", by: Sequence[str] = ("algorithm",),
                      at_round: int | None = None, others: str = "hold",
                      where: Where = None) -> pd.DataFrame:
    """The data of ``robustness``: per condition of ``by`` and value of ``param``, the final
    agent-mean ``metric`` (at ``at_round``, default the last round every run recorded) over
    the condition's runs: columns ``*by, param, mean, std, lo, hi, n`` (fractions, not
    percent); empty when no run has ``param`` (a column or its short name, ``link_failure``)."""
    param = resolve(param)
    df = as_frame(results)
    runs = select(run_table(df, metric), where)
    cols = [*by, param, "mean", "std", "lo", "hi", "n"]
    if runs.empty or param not in runs.columns:
        return pd.DataFrame(columns=cols)
    conds = conditions(runs, [*by, param], others=others)
    chosen = conds.runs
    rnd = at_round if at_round is not None else last_common_round(df, metric, chosen["run"])
    vals = final_values(df, metric, chosen["run"], at_round=rnd)
    chosen = chosen.assign(value=chosen["run"].map(vals)).dropna(subset=["value"])
    out = []
    for cond, g in chosen.groupby("condition", sort=False):
        v = g["value"].to_numpy(float)
        out.append({**dict(zip([*by, param], cond)), "mean": v.mean(),
                    "std": v.std(ddof=1) if len(v) > 1 else 0.0, "lo": v.min(), "hi": v.max(),
                    "n": len(v)})
    out = pd.DataFrame(out, columns=cols)
    out.attrs["note"], out.attrs["round"] = conds.note(), rnd
    return out


def robustness(results, *, param: str = "network.link_failure", metric: str = "test_accuracy",
               by: Sequence[str] = ("algorithm",), at_round: int | None = None,
               band: str = "range", others: str = "hold", where: Where = None) -> Figure:
    """The final ``metric`` against ``param``, one line per condition of ``by`` (algorithm),
    the band the range (``band="range"``) or +-std over seeds (``robustness_points``)."""
    if band not in ("range", "std"):
        raise ValueError(f"band must be 'range' or 'std', not {band!r}")
    param = resolve(param)
    pts = robustness_points(results, param=param, metric=metric, by=by, at_round=at_round,
                            others=others, where=where)
    fig, axes = new_figure(1, size=(5.6, 4.0))
    ax = axes[0]
    label = PARAM_LABELS.get(param, param)
    ax.set_title(f"final {metric_label(metric)} against {label}", fontsize=10)
    if pts.empty:
        no_data(ax, f"no run records {param}")
        return fig
    scale = 100.0 if is_fraction_metric(metric) else 1.0
    numeric = pd.api.types.is_numeric_dtype(pts[param])
    ticks = sorted(pts[param].unique(), key=str) if not numeric else None
    for cond, g in pts.groupby(list(by), sort=False):
        cond = cond if isinstance(cond, tuple) else (cond,)
        g = g.sort_values(param)
        xs = g[param].to_numpy(float) if numeric else np.array([ticks.index(v) for v in g[param]])
        lo, hi = (g["lo"], g["hi"]) if band == "range" else (g["mean"] - g["std"],
                                                             g["mean"] + g["std"])
        seeds = int(g["n"].max())
        name = ", ".join(pretty(c, v) for c, v in zip(by, cond))
        line, = ax.plot(xs, g["mean"] * scale, marker="o", lw=1.6,
                        color=colour(cond[0]) if by[0] == "algorithm" else None,
                        label=name + (f" ({seeds} seeds)" if seeds > 1 else ""))
        if (hi > lo).any():
            ax.fill_between(xs, lo * scale, hi * scale, color=line.get_color(), alpha=0.15,
                            linewidth=0)
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
    ax.set_xlabel(label)
    ax.set_ylabel(f"{metric_label(metric)} at round {pts.attrs['round']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    corner_note(ax, pts.attrs["note"])
    return fig
