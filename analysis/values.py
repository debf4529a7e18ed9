"""From metric rows to the numbers a figure or table shows: per-round agent statistics, one
condition's curve over its seeds, and each run's final value.

Everything takes the tidy frame of ``analysis.load`` (rows ``run, round, step, agent, metric,
value``; agent -1 is a network-wide row) and reads no file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pandas as pd

STATS_COLUMNS = ["run", "round", "step", "mean", "min", "max", "std", "n_agents"]
CURVE_COLUMNS = ["x", "mean", "lo", "hi", "n_runs"]


def metric_rows(df: pd.DataFrame, metric: str, runs: Iterable[str] | None = None) -> pd.DataFrame:
    """The rows of ``metric`` (of ``runs`` only, when given)."""
    rows = df[df["metric"] == metric]
    if runs is not None:
        rows = rows[rows["run"].isin(list(runs))]
    return rows


def agent_stats(df: pd.DataFrame, metric: str, runs: Iterable[str] | None = None) -> pd.DataFrame:
    """Per run and round: the mean over agents of ``metric`` and its min, max and std over
    agents. Network-only metrics (``floats_sent``, ``grad_norm_sq``, ...) use the agent -1 row,
    with no spread. Columns ``run, round, step, mean, min, max, std, n_agents``."""
    rows = metric_rows(df, metric, runs)
    agents = rows[rows["agent"] >= 0]
    net = rows[(rows["agent"] < 0) & ~rows["run"].isin(agents["run"].unique())]
    parts = []
    if len(agents):
        g = agents.groupby(["run", "round"], sort=True)
        a = g["value"].agg(["mean", "min", "max", "count"])
        a["std"] = g["value"].std(ddof=0)
        a["step"] = g["step"].max()
        parts.append(a.rename(columns={"count": "n_agents"}).reset_index())
    if len(net):
        n = net.groupby(["run", "round"], sort=True).agg(mean=("value", "mean"), step=("step", "max"))
        n["min"] = n["max"] = n["mean"]
        n["std"] = 0.0
        n["n_agents"] = 0
        parts.append(n.reset_index())
    if not parts:
        return pd.DataFrame(columns=STATS_COLUMNS)
    return pd.concat(parts, ignore_index=True).sort_values(["run", "round"], ignore_index=True)


def curve(stats: pd.DataFrame, runs: Sequence[str], x: str = "round", band: str = "range",
          x_of: Callable[[pd.DataFrame], pd.Series] | None = None) -> pd.DataFrame:
    """One condition's curve from ``agent_stats`` rows of its ``runs``.

    One run: the mean over agents, band = min-max (``band="range"``) or +-std over agents.
    Several (seeds): the mean over runs of the agent mean, band = the range or +-std of the
    agent mean across runs. ``x_of`` maps the rows to x instead of column ``x`` (the epoch
    axis). Columns ``x, mean, lo, hi, n_runs``."""
    if band not in ("range", "std"):
        raise ValueError(f"band must be 'range' or 'std', not {band!r}")
    s = stats[stats["run"].isin(list(runs))].copy()
    if s.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    s["x"] = x_of(s) if x_of is not None else s[x]
    n_runs = s["run"].nunique()
    if n_runs == 1:
        out = s[["x", "mean"]].copy()
        if band == "range":
            out["lo"], out["hi"] = s["min"].values, s["max"].values
        else:
            out["lo"], out["hi"] = (s["mean"] - s["std"]).values, (s["mean"] + s["std"]).values
        out["n_runs"] = 1
        return out.sort_values("x", ignore_index=True)
    g = s.groupby("x", sort=True)["mean"]
    out = g.agg(["mean", "count"]).rename(columns={"count": "n_runs"})
    if band == "range":
        out["lo"], out["hi"] = g.min(), g.max()
    else:
        sd = g.std(ddof=0).fillna(0.0)
        out["lo"], out["hi"] = out["mean"] - sd, out["mean"] + sd
    return out.reset_index()[CURVE_COLUMNS]


def final_values(df: pd.DataFrame, metric: str, runs: Iterable[str] | None = None,
                 at_round: int | None = None) -> pd.Series:
    """Per run: the mean over agents of ``metric`` at its last recorded round (or at
    ``at_round``; runs without that round are left out). Indexed by run."""
    stats = agent_stats(df, metric, runs)
    if stats.empty:
        return pd.Series(dtype=float, name=metric)
    if at_round is None:
        stats = stats.loc[stats.groupby("run")["round"].idxmax()]
    else:
        stats = stats[stats["round"] == at_round]
    return stats.set_index("run")["mean"].rename(metric)


def last_common_round(df: pd.DataFrame, metric: str, runs: Iterable[str]) -> int | None:
    """The last round at which every one of ``runs`` recorded ``metric`` (None if none)."""
    rows = metric_rows(df, metric, runs)
    common = None
    for _, g in rows.groupby("run"):
        r = set(g["round"].unique().tolist())
        common = r if common is None else common & r
    return int(max(common)) if common else None


METRIC_X = {"bytes_sent": "bytes sent per agent (cumulative, as encoded)",
            "sim_time_s": "simulated time (s)"}
"""Network metrics a curve can be drawn against (the x axis), with their axis labels."""


def metric_x(df: pd.DataFrame, metric: str) -> Callable[[pd.DataFrame], pd.Series]:
    """An ``x_of`` for ``curve``: x = the network row (agent -1) of ``metric`` (``METRIC_X``)
    at each row's round, the mean over the runs ``curve`` is given (seeds of a condition whose
    bytes or clock differ a little still share one x per round)."""
    net = df[(df["metric"] == metric) & (df["agent"] < 0)]
    value = dict(zip(zip(net["run"], net["round"]), net["value"]))

    def of(stats: pd.DataFrame) -> pd.Series:
        own = pd.Series([value.get(k, float("nan")) for k in zip(stats["run"], stats["round"])],
                        index=stats.index, dtype=float)
        return own.groupby(stats["round"]).transform("mean")

    return of

