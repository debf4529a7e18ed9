"""Figures that check the paper's theory against saved runs.

- ``theory_curves``: consensus interference (Theorem 2: ||sum pi B_j A_j - (sum pi B_j)(sum pi A_j)||_F)
  and the TSVD error with its Proposition 1 bound, over rounds, per algorithm and rank.
- ``rate_check``: Corollary 1. With step size alpha ~ 1/sqrt(T), (1/T) sum_{t=1..T} ||grad f(v-bar_t)||^2
  decays like T^(-1/2): over a sweep of T, the log-log slope of the average squared gradient norm
  against T should be about -1/2 for both DeCAF and DLoRA.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.data import (
    condition_columns,
    conditions,
    config_columns,
    hashable,
    run_table,
    select,
)
from analysis.figures import corner_note, distinct_seeds, new_figure, no_data, seeds_label
from analysis.names import ALGORITHM_NAMES, COLUMN_NAMES, colour
from analysis.plan_facts import X_LABELS, x_mapper
from analysis.runs import as_frame
from analysis.values import agent_stats, curve

THEORY_METRICS = ("interference", "tsvd_error", "prop1_bound")
RATE_IGNORE = ("rounds", "optim.lr", "eval_every", "optim.warmup_steps", "runtime.checkpoint_every")
"""What a rate sweep varies with T: not held, not split."""


def theory_curves(results, *, by: Sequence[str] = ("algorithm", "lora.rank"), x: str = "round",
                  band: str = "range", others: str = "hold", logy: bool = True,
                  where: Mapping[str, Any] | None = None) -> Figure:
    """(a) consensus interference and (b) TSVD error (solid) with the Proposition 1 bound
    (dashed, same colour), against round, one colour per condition (algorithm x rank)."""
    df = as_frame(results)
    runs = select(run_table(df, THEORY_METRICS), where)
    fig, axes = new_figure(2, size=(5.4, 4.0))
    panels = [(axes[0], ("interference",), "(a) consensus interference (Theorem 2)"),
              (axes[1], ("tsvd_error", "prop1_bound"), "(b) TSVD error and Proposition 1 bound")]
    conds = conditions(runs, list(by), others=others) if len(runs) else None
    mapper = x_mapper(x)
    for ax, metrics, title in panels:
        ax.set_title(title, fontsize=10)
        if conds is None:
            no_data(ax)
            continue
        colours: dict[tuple, str] = {}
        for metric, style in zip(metrics, ("-", "--")):
            stats = agent_stats(df, metric, conds.runs["run"])
            for cond in conds.ordered():
                rows = conds.runs[conds.runs["condition"] == cond]
                c = curve(stats, rows["run"], x=x if x != "epoch" else "step", band=band,
                          x_of=mapper)
                if c.empty:
                    continue
                label = (seeds_label(conds.label(cond), c, distinct_seeds(rows))
                         + (" (bound)" if metric == "prop1_bound" else ""))
                line, = ax.plot(c["x"], c["mean"], linestyle=style, label=label,
                                color=colours.get(cond))
                colours[cond] = line.get_color()
                if metric != "prop1_bound" and (c["hi"] > c["lo"]).any():
                    ax.fill_between(c["x"].astype(float), c["lo"], c["hi"],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
        if not ax.lines:
            no_data(ax)
            continue
        ys = np.concatenate([ln.get_ydata() for ln in ax.lines]).astype(float)
        if logy and np.all(ys[np.isfinite(ys)] > 0):
            ax.set_yscale("log")
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(r"$\|\cdot\|_F$")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        corner_note(ax, conds.note())
    return fig


def fit_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than two distinct x > 0)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if len(np.unique(x[ok])) < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def rate_family(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The runs of one T sweep: runs are grouped by every condition column but the algorithm
    and what a rate sweep varies with T (``RATE_IGNORE``); the group with the most distinct
    (algorithm, T) pairs (then the most runs) is kept. Returns it and the values it fixes
    where they differ between groups."""
    cols = [c for c in condition_columns(config_columns(runs))
            if c not in RATE_IGNORE and c not in ("algorithm", "dataset")]
    if runs.empty or not cols:
        return runs, {}
    keys = runs[cols].apply(lambda r: tuple(hashable(v) for v in r), axis=1)
    best, score = None, None
    for k, g in runs.groupby(keys, sort=False):
        s = (len(set(zip(g["algorithm"], g["rounds"]))), len(g))
        if score is None or s > score:
            best, score = k, s
    family = runs[keys == best]
    varying = [c for c in cols if runs[c].map(hashable).nunique(dropna=False) > 1]
    return family, {c: hashable(family[c].iloc[0]) for c in varying}


def _check_cadence(chosen: pd.DataFrame, net: pd.DataFrame) -> None:
    """Raise ValueError unless every run evaluated every round t = 1..T (``eval_every: 1``):
    the corollary's average is over all T rounds, and a sparser or mixed cadence would average
    different sets of rounds at different T."""
    if "eval_every" in chosen:
        every = sorted({int(v) for v in chosen["eval_every"].dropna()})
        if every != [1] and every:
            raise ValueError(f"rate_check needs eval_every: 1 in every run (Corollary 1 averages "
                             f"t = 1..T), got eval_every {', '.join(map(str, every))}")
    seen = net.groupby("run")["round"].nunique()
    rounds = chosen.set_index("run")["rounds"].astype(int)
    short = [r for r in rounds.index if seen.get(r, 0) < rounds[r]]
    if short:
        r = short[0]
        raise ValueError(f"rate_check needs the metric at every round t = 1..T (eval_every: 1): "
                         f"{r} has {seen.get(r, 0)} of {rounds[r]} rounds"
                         + (f" ({len(short) - 1} more runs alike)" if len(short) > 1 else ""))


def rate_points(results, *, metric: str = "grad_norm_sq",
                algorithms: Sequence[str] | None = ("decaf", "dlora"),
                where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per algorithm and T (``rounds``): each run's mean over rounds t = 1..T of the network
    ``metric`` (Corollary 1's average; round 0, the initial model, is left out), then the mean
    (and min, max) over seeds. Runs must evaluate every round (``eval_every: 1``); others are
    refused with a ValueError. When the runs hold several T
    sweeps (or other experiments), the sweep with the most (algorithm, T) points is used (see
    ``rate_family``; ``where`` selects one explicitly) and ``points.attrs["held"]`` says what it
    fixes. Columns ``algorithm, T, mean, min, max, n_runs, lr_sqrt_T``."""
    df = as_frame(results)
    runs = select(run_table(df, metric), where)
    if algorithms is not None:
        runs = runs[runs["algorithm"].isin(list(algorithms))]
    cols = ["algorithm", "T", "mean", "min", "max", "n_runs", "lr_sqrt_T"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    chosen, held = rate_family(runs)
    rows = df[(df["metric"] == metric) & df["run"].isin(chosen["run"])]
    net = rows[rows["agent"] < 0]
    if net.empty:  # a metric with per-agent rows only: their mean per round
        net = rows.groupby(["run", "round"], as_index=False)["value"].mean()
    net = net[net["round"] >= 1]  # Corollary 1 averages t = 1..T; round 0 is the initial model
    _check_cadence(chosen, net)
    per_run = net.groupby("run")["value"].mean().rename("avg")
    chosen = chosen.join(per_run, on="run").dropna(subset=["avg"])
    lr = chosen["optim.lr"] if "optim.lr" in chosen else pd.Series(np.nan, index=chosen.index)
    chosen = chosen.assign(T=chosen["rounds"].astype(int), lr_sqrt_T=lr * np.sqrt(chosen["rounds"]))
    out = (chosen.groupby(["algorithm", "T"])
           .agg(mean=("avg", "mean"), min=("avg", "min"), max=("avg", "max"),
                n_runs=("avg", "size"), lr_sqrt_T=("lr_sqrt_T", "mean"))
           .reset_index())
    for alg, g in out.groupby("algorithm"):
        c = g["lr_sqrt_T"].dropna()
        if len(c) > 1 and not np.allclose(c, c.iloc[0], rtol=1e-3):
            warnings.warn(f"rate_check: {alg}'s step size is not proportional to 1/sqrt(T) "
                          f"(lr*sqrt(T) = {', '.join(f'{v:.4g}' for v in c)})", stacklevel=2)
    out = out[cols]
    out.attrs["held"] = held
    return out


def rate_slopes(points: pd.DataFrame) -> dict[str, float]:
    """Fitted log-log slope per algorithm of ``rate_points``."""
    return {alg: fit_slope(g["T"], g["mean"]) for alg, g in points.groupby("algorithm", sort=False)}


def rate_check(results, *, metric: str = "grad_norm_sq",
               algorithms: Sequence[str] | None = ("decaf", "dlora"),
               reference: float | None = -0.5, where: Mapping[str, Any] | None = None
               ) -> tuple[Figure, dict[str, float]]:
    """Corollary 1's check: (1/T) sum_{t=1..T} ||grad f(v-bar_t)||^2 against T on
    log-log axes, one line per algorithm with its fitted slope in the legend (error bars: range
    over seeds), and a dashed T^``reference`` guide. Returns ``(figure, {algorithm: slope})``.

    The runs are a sweep over ``rounds`` whose ``optim.lr`` is proportional to 1/sqrt(T) (a
    warning says when it is not); see ``rate_points`` for which runs are used."""
    points = rate_points(results, metric=metric, algorithms=algorithms, where=where)
    held = points.attrs.get("held", {})
    fig, axes = new_figure(1, size=(5.6, 4.2))
    ax = axes[0]
    ax.set_title(r"Corollary 1: rate with $\alpha \propto 1/\sqrt{T}$", fontsize=10)
    slopes = {}
    if algorithms is not None:
        points = points.assign(_o=points["algorithm"].map({a: i for i, a in enumerate(algorithms)}))
        points = points.sort_values(["_o", "T"]).drop(columns="_o")
    for alg, g in points.groupby("algorithm", sort=False):
        g = g.sort_values("T")
        slope = fit_slope(g["T"], g["mean"])
        slopes[alg] = slope
        yerr = np.vstack([g["mean"] - g["min"], g["max"] - g["mean"]])
        name = ALGORITHM_NAMES.get(alg, alg)
        lab = f"{name} (slope {slope:+.2f})" if np.isfinite(slope) else f"{name} (one T: no slope)"
        ax.errorbar(g["T"], g["mean"], yerr=yerr, marker="o", capsize=3, label=lab,
                    color=colour(alg))
        if np.isfinite(slope):
            lt = np.log(g["T"].to_numpy(float))
            b = np.mean(np.log(g["mean"].to_numpy(float))) - slope * lt.mean()
            ax.plot(g["T"], np.exp(b + slope * lt), lw=0.8, alpha=0.6, color=colour(alg))
    if not slopes:
        no_data(ax, "no data (needs runs recording grad_norm_sq)")
        return fig, slopes
    if reference is not None and points["T"].nunique() > 1:
        t = np.array([points["T"].min(), points["T"].max()], dtype=float)
        y0 = float(np.exp(np.log(points["mean"].astype(float)).mean()))
        t0 = float(np.exp(np.log(points["T"].astype(float)).mean()))
        ax.plot(t, y0 * (t / t0) ** reference, "k--", lw=0.8,
                label=rf"$T^{{{reference:g}}}$ guide")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T (rounds)")
    ax.set_ylabel(r"mean over $t = 1..T$ of $\|\nabla f(\bar v_t)\|^2$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if held:
        corner_note(ax, "held: " + ", ".join(f"{COLUMN_NAMES.get(c, c)} {v}"
                                             for c, v in held.items()))
    return fig, slopes


def neighbourhood_size(runs: pd.DataFrame) -> pd.Series:
    """|N_b(i)| (the agent counted) of each run's graph where every agent has the same one:
    complete (the agent count), ring (3), random_regular (degree + 1); NaN otherwise."""
    name = runs.get("topology.name", pd.Series(index=runs.index, dtype=object))
    degree = pd.to_numeric(runs.get("topology.degree", pd.Series(np.nan, index=runs.index)),
                           errors="coerce")
    agents = pd.to_numeric(runs.get("agents", pd.Series(np.nan, index=runs.index)), errors="coerce")
    out = pd.Series(np.nan, index=runs.index, dtype=float)
    out[name == "complete"] = agents[name == "complete"]
    out[name == "ring"] = 3.0
    out[name == "random_regular"] = degree[name == "random_regular"] + 1
    return out


def tsvd_points(results, *, where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Proposition 1 measured: per DeCAF split, rank r and neighbourhood size m, the TSVD error
    and the bound sqrt((m - 1) r) c^2, each the mean over agents and communication rounds of a
    completed run (diverged ones are left out; ``n`` counts the rest), then over seeds. Columns ``consensus.split, lora.rank, m, error, error_std, bound,
    ratio, n`` (ratio: error / bound, per run then averaged)."""
    df = as_frame(results)
    runs = select(run_table(df, "tsvd_error"), where)
    runs = runs[runs["status"] == "completed"]  # a diverged run's norms end non-finite
    cols = ["consensus.split", "lora.rank", "m", "error", "error_std", "bound", "ratio", "n"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    runs = runs.assign(m=neighbourhood_size(runs)).dropna(subset=["m"])
    # the network rows (agent -1) hold the mean over agents, per-agent rows need not be kept
    rows = df[df["run"].isin(runs["run"]) & (df["agent"] == -1) & (df["round"] > 0)]
    per_run = rows.pivot_table(index="run", columns="metric", values="value", aggfunc="mean")
    runs = runs.join(per_run[["tsvd_error", "prop1_bound"]], on="run")
    runs["ratio"] = runs["tsvd_error"] / runs["prop1_bound"]
    key = [c for c in ("consensus.split", "lora.rank", "m") if c in runs]
    g = runs.groupby(key, sort=True)
    out = pd.DataFrame({"error": g["tsvd_error"].mean(), "error_std": g["tsvd_error"].std(ddof=1),
                        "bound": g["prop1_bound"].mean(), "ratio": g["ratio"].mean(),
                        "n": g.size()}).reset_index()
    return out.reindex(columns=cols)


def tsvd_neighbourhood(results, *, where: Mapping[str, Any] | None = None) -> Figure:
    """TSVD error (solid, ± std over seeds) and Proposition 1's bound (dashed) against the
    neighbourhood size |N_b(i)|, one colour per rank, one panel per DeCAF split; log scale."""
    pts = tsvd_points(results, where=where)
    splits = list(pts["consensus.split"].dropna().unique()) if len(pts) else []
    fig, axes = new_figure(max(len(splits), 1), size=(4.8, 3.8))
    axes = np.atleast_1d(axes)
    if not splits:
        no_data(axes[0])
        return fig
    for ax, split in zip(axes, splits):
        sel = pts[pts["consensus.split"] == split]
        for rank, g in sel.groupby("lora.rank", sort=True):
            line, = ax.plot(g["m"], g["error"], marker="o", label=f"r = {int(rank)}")
            ax.errorbar(g["m"], g["error"], yerr=g["error_std"].fillna(0), fmt="none",
                        ecolor=line.get_color(), capsize=3)
            ax.plot(g["m"], g["bound"], linestyle="--", color=line.get_color())
        ax.set_yscale("log")
        ax.set_title(f"DeCAF {split}: TSVD error (solid), bound (dashed)", fontsize=10)
        ax.set_xlabel(r"neighbourhood size $|N_b(i)|$")
        ax.set_ylabel(r"$\|\cdot\|_F$")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def gap_points(results, *, metric: str = "consensus_distance",
               where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The consensus distance against the graph's spectral gap: per algorithm, rank and graph,
    the gap 1 - max(|lambda_2|, |lambda_N|) of the graph's Metropolis Pi (rebuilt from the
    run's topology columns by ``decaf_ray.topology``) and ``metric``'s network value averaged
    over rounds t >= 1 of each completed run, then mean and std over seeds. Columns
    ``algorithm, lora.rank, topology, gap, value, value_std, n``."""
    from decaf_ray import topology

    df = as_frame(results)
    runs = select(run_table(df, metric), where)
    runs = runs[runs["status"] == "completed"]  # a diverged run's distances end non-finite
    cols = ["algorithm", "lora.rank", "topology", "gap", "value", "value_std", "n"]
    if runs.empty:
        return pd.DataFrame(columns=cols)

    cache: dict[tuple, tuple[str, float]] = {}

    def graph(name: str, degree: float, agents: int) -> tuple[str, float]:
        params = {} if pd.isna(degree) else {"degree": int(degree)}
        key = (name, *params.values(), int(agents))
        if key not in cache:
            g = topology.build_topology(name, int(agents), **params)
            cache[key] = (" ".join(map(str, key[:-1])),
                          topology.spectral_gap(topology.mixing_matrix(g, "metropolis")))
        return cache[key]

    degree = runs.get("topology.degree", pd.Series(np.nan, index=runs.index))
    facts = [graph(*k) for k in zip(runs["topology.name"], degree, runs["agents"])]
    runs = runs.assign(topology=[f[0] for f in facts], gap=[f[1] for f in facts])
    rows = df[df["run"].isin(runs["run"]) & (df["agent"] == -1) & (df["round"] > 0)
              & (df["metric"] == metric)]
    runs = runs.join(rows.groupby("run")["value"].mean(), on="run")
    g = runs.groupby(["algorithm", "lora.rank", "topology", "gap"], sort=True)["value"]
    out = pd.DataFrame({"value": g.mean(), "value_std": g.std(ddof=1), "n": g.size()})
    return out.reset_index().sort_values(["algorithm", "lora.rank", "gap"]).reindex(columns=cols)


def consensus_gap(results, *, metric: str = "consensus_distance",
                  where: Mapping[str, Any] | None = None) -> Figure:
    """``gap_points`` drawn: ``metric`` (mean over rounds, ± std over seeds) against the
    spectral gap, one line per algorithm and rank; log scale."""
    pts = gap_points(results, metric=metric, where=where)
    fig, axes = new_figure(1, size=(5.2, 3.8))
    ax = axes[0]
    if pts.empty:
        no_data(ax)
        return fig
    for (alg, rank), g in pts.groupby(["algorithm", "lora.rank"], sort=True):
        ax.errorbar(g["gap"], g["value"], yerr=g["value_std"].fillna(0), marker="o", capsize=3,
                    label=f"{ALGORITHM_NAMES.get(alg, alg)}, r = {int(rank)}")
    ax.set_yscale("log")
    ax.set_xlabel(r"spectral gap $1 - \max(|\lambda_2|, |\lambda_N|)$ of $\Pi$")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (mean over rounds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
