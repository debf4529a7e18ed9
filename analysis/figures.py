"""The paper's figures (Fig. 2, Fig. 3) and a few beyond it, from saved results.

Every function takes the tidy frame of ``analysis.load`` (or a results directory) and returns a
``matplotlib.figure.Figure`` (built without pyplot: nothing global, nothing left open). A line is
the mean over agents; its band is the range (or +-std, ``band="std"``) over agents, or, when a
condition has several seeds, the mean over seeds of the agent mean with the band across seeds.
A panel with nothing to draw says "no data".

Two views need more than the saved files, since the metrics hold neither shard sizes nor labels:
the epoch axis (``x="epoch"``) and ``label_distribution`` re-run each run's setup
(``decaf_ray.plan.prepare``, see ``analysis.plan_facts``), so they need the datasets the run
used; nothing is trained. Every other figure reads only the saved files.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from analysis.data import conditions, run_table, select
from analysis.names import (
    DECENTRALIZED,
    colour,
    is_fraction_metric,
    metric_label,
    order_values,
    pretty,
    refactorization_variant,
)
from analysis.plan_facts import X_LABELS, plan_facts, x_mapper
from analysis.runs import as_frame
from analysis.values import (METRIC_X, agent_stats, curve, final_values, last_common_round,
                             metric_x)

Where = Mapping[str, Any] | None


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.6, 3.6)
               ) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def no_data(ax: Axes, why: str = "no data") -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4",
            fontsize=11, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def corner_note(ax: Axes, text: str) -> None:
    """What other settings were held at, small, in the lower right corner."""
    if text:
        text = textwrap.fill(text, 60)
        ax.text(0.99, 0.01, text, ha="right", va="bottom", transform=ax.transAxes,
                fontsize=7, color="0.35")


def curves_panel(ax: Axes, df: pd.DataFrame, runs: pd.DataFrame, key: Sequence[str],
                 metric: str, *, x: str = "round", band: str = "range", others: str = "hold",
                 title: str = "", ignore: Sequence[str] = (), linestyle: str = "-",
                 label_prefix: str = "", colour_by: str | None = None) -> int:
    """Draw one line per condition of ``runs`` (a ``run_table`` subset) by ``key``; returns the
    number of lines drawn (0: the panel says "no data"). ``x``: ``round``, ``step``, ``epoch``
    (``plan_facts``) or a network metric of ``values.METRIC_X`` (``bytes_sent``,
    ``sim_time_s``)."""
    if title:
        ax.set_title(title, fontsize=10)
    runs = runs[runs["run"].isin(df.loc[df["metric"] == metric, "run"].unique())]
    if runs.empty:
        no_data(ax)
        return 0
    conds = conditions(runs, key, others=others, ignore=ignore)
    stats = agent_stats(df, metric, conds.runs["run"])
    scale = 100.0 if is_fraction_metric(metric) else 1.0
    mapper = metric_x(df, x) if x in METRIC_X else x_mapper(x)
    n = 0
    for cond in conds.ordered():
        rows = conds.runs[conds.runs["condition"] == cond]
        members = rows["run"]
        c = curve(stats, members, x=x if x in ("round", "step") else "step", band=band,
                  x_of=mapper).dropna(subset=["x"])
        if c.empty:
            continue
        col = None
        if colour_by is not None and colour_by in conds.key:
            col = colour(cond[conds.key.index(colour_by)])
        label = seeds_label(label_prefix + conds.label(cond), c, distinct_seeds(rows))
        line, = ax.plot(c["x"], c["mean"] * scale, linestyle=linestyle, label=label, color=col,
                        lw=1.6)
        if (c["hi"] > c["lo"]).any():
            ax.fill_between(c["x"].astype(float), c["lo"] * scale, c["hi"] * scale,
                            color=line.get_color(), alpha=0.15, linewidth=0)
        n += 1
    if n == 0:
        no_data(ax)
        return 0
    ax.set_xlabel(METRIC_X.get(x) or X_LABELS[x])
    if x == "bytes_sent":
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.set_ylabel(metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    corner_note(ax, conds.note())
    return n


def seeds_label(label: str, c: pd.DataFrame, seeds: int | None = None) -> str:
    """``label (k seeds)`` when the curve averages several runs; ``(k runs, s seed)`` when some
    of them share a seed (e.g. the same experiment run by two sweeps, or runs differing in a
    column the condition does not key on), so a legend never counts a repeat as another seed.
    ``seeds``: distinct seeds among the runs, if known."""
    k = int(c["n_runs"].max()) if len(c) else 0
    if k <= 1:
        return label
    if not seeds or seeds >= k:  # None or 0 (a seed column of NaN): unknown
        return f"{label} ({k} seeds)"
    return f"{label} ({k} runs, {seeds} seed{'s' if seeds > 1 else ''})"


def distinct_seeds(members: pd.DataFrame) -> int | None:
    """Distinct ``seed`` values of a condition's rows of a ``run_table`` (None if not recorded)."""
    return int(members["seed"].nunique()) if "seed" in members.columns else None


def _runs(df: pd.DataFrame, metric: str, where: Where) -> pd.DataFrame:
    return select(run_table(df, metric), where)


def fig2(results, *, metric: str = "test_accuracy", x: str = "round", band: str = "range",
         others: str = "hold", algorithms: Sequence[str] = DECENTRALIZED,
         where: Where = None) -> Figure:
    """Fig. 2: (a) DeCAF by topology on IID data, (b) DeCAF by topology on non-IID data,
    (c) the decentralized ``algorithms`` on the non-IID ring.

    Non-IID is any partition other than ``iid``; ``where`` narrows every panel (e.g.
    ``{"rank": 2}``); other config columns are held or split per ``others``."""
    df = as_frame(results)
    runs = _runs(df, metric, where)
    iid = runs["data.partition"] == "iid" if "data.partition" in runs else pd.Series(False, index=runs.index)
    decaf = runs["algorithm"] == "decaf"
    fig, axes = new_figure(3)
    kw = {"x": x, "band": band, "others": others}
    curves_panel(axes[0], df, runs[decaf & iid], ["topology.name"], metric,
                 title="(a) DeCAF, IID, by topology", **kw)
    curves_panel(axes[1], df, runs[decaf & ~iid], ["topology.name"], metric,
                 title="(b) DeCAF, non-IID, by topology", **kw)
    ring = runs["topology.name"] == "ring" if "topology.name" in runs else False
    sel = runs[~iid & ring & runs["algorithm"].isin(list(algorithms))]
    curves_panel(axes[2], df, sel, ["algorithm"], metric, colour_by="algorithm",
                 title="(c) non-IID ring, by algorithm", **kw)
    return fig


def refactorization(results, *, metric: str = "test_accuracy", band: str = "std",
                    where: Where = None) -> Figure:
    """The re-factorization study: one panel per optimizer (rows) and topology (columns), one
    line per variant (DeCAF's split/state, or the algorithm), mean over seeds with a band."""
    df = as_frame(results).copy()
    df["variant"] = refactorization_variant(df)
    runs = _runs(df, metric, where)
    optims = order_values("optim.name", runs["optim.name"].unique()) if len(runs) else []
    topos = order_values("topology.name", runs["topology.name"].unique()) if len(runs) else []
    fig, axes = new_figure(max(len(topos), 1), max(len(optims), 1), size=(5.2, 3.8))
    axes = np.asarray(axes).reshape(max(len(optims), 1), max(len(topos), 1))
    if runs.empty:
        no_data(axes[0, 0])
        return fig
    for i, opt in enumerate(optims):
        for j, topo in enumerate(topos):
            sel = runs[(runs["optim.name"] == opt) & (runs["topology.name"] == topo)]
            curves_panel(axes[i, j], df, sel, ["variant"], metric, band=band,
                         title=f"{pretty('optim.name', opt)}, {pretty('topology.name', topo)}")
    return fig


def accuracy_gap(results, *, metric: str = "test_accuracy", at_round: int | None = None,
                 a: str = "decaf", b: str = "dlora", by: str = "lora.rank",
                 others: str = "hold", where: Where = None) -> pd.DataFrame:
    """``a`` minus ``b`` (DeCAF minus DLoRA) of the agent-mean ``metric`` at ``at_round``
    (default: the last round every selected run recorded) for each value of ``by``.

    Seeds present in both are paired (gap = mean of the per-seed gaps, err = their std);
    otherwise gap = difference of the seed means, err = sqrt(std_a^2 + std_b^2).
    Columns ``by, gap, err, n, round`` (fractions, not percent)."""
    df = as_frame(results)
    runs = _runs(df, metric, where)
    runs = runs[runs["algorithm"].isin([a, b])]
    cols = [by, "gap", "err", "n", "round"]
    if runs.empty or runs["algorithm"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    conds = conditions(runs, ["algorithm", by], others=others)
    chosen = conds.runs
    rnd = at_round if at_round is not None else last_common_round(df, metric, chosen["run"])
    if rnd is None:
        return pd.DataFrame(columns=cols)
    vals = final_values(df, metric, chosen["run"], at_round=rnd)
    chosen = chosen.assign(value=chosen["run"].map(vals)).dropna(subset=["value"])
    out = []
    for level, g in chosen.groupby(by, sort=True):
        ga = g[g["algorithm"] == a].groupby("seed")["value"].mean()
        gb = g[g["algorithm"] == b].groupby("seed")["value"].mean()
        if ga.empty or gb.empty:
            continue
        both = ga.index.intersection(gb.index)
        if len(both):
            d = ga[both] - gb[both]
            gap, err, n = d.mean(), (d.std(ddof=1) if len(d) > 1 else 0.0), len(d)
        else:
            gap = ga.mean() - gb.mean()
            err = float(np.hypot(ga.std(ddof=1) if len(ga) > 1 else 0.0,
                                 gb.std(ddof=1) if len(gb) > 1 else 0.0))
            n = min(len(ga), len(gb))
        out.append({by: level, "gap": float(gap), "err": float(err), "n": int(n), "round": rnd})
    out = pd.DataFrame(out, columns=cols)
    out.attrs["note"] = conds.note()
    return out


def fig3(results, *, metric: str = "test_accuracy", at_round: int | None = None,
         x: str = "round", band: str = "range", others: str = "hold",
         where: Where = None) -> Figure:
    """Fig. 3: (a) DeCAF by rank, (b) DeCAF minus DLoRA at ``at_round`` (default the last
    common round; the paper uses 100 epochs) by rank, error bars over seeds, (c) DeCAF by
    agent count."""
    df = as_frame(results)
    runs = _runs(df, metric, where)
    decaf = runs[runs["algorithm"] == "decaf"]
    fig, axes = new_figure(3)
    kw = {"x": x, "band": band, "others": others}
    curves_panel(axes[0], df, decaf, ["lora.rank"], metric, title="(a) DeCAF by rank", **kw)
    gap_panel(axes[1], df, metric=metric, at_round=at_round, others=others, where=where)
    curves_panel(axes[2], df, decaf, ["agents"], metric, title="(c) DeCAF by agent count", **kw)
    return fig


def gap_panel(ax: Axes, df: pd.DataFrame, *, metric: str = "test_accuracy",
              at_round: int | None = None, others: str = "hold", where: Where = None) -> None:
    ax.set_title("(b) DeCAF - DLoRA by rank", fontsize=10)
    gap = accuracy_gap(df, metric=metric, at_round=at_round, others=others, where=where)
    if gap.empty:
        no_data(ax)
        return
    scale = 100.0 if is_fraction_metric(metric) else 1.0
    pos = np.arange(len(gap))
    ax.bar(pos, gap["gap"] * scale, yerr=gap["err"] * scale, capsize=4, color=colour("decaf"),
           alpha=0.8, label=f"at round {int(gap['round'].iloc[0])}")
    ax.set_xticks(pos, [f"{int(r) if float(r).is_integer() else r}" for r in gap["lora.rank"]])
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel("LoRA rank r")
    unit = " (points)" if scale == 100 else ""
    ax.set_ylabel(f"{metric_label(metric).replace(' (%)', '')} gap{unit}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    corner_note(ax, gap.attrs.get("note", ""))


def bytes_vs_accuracy(results, *, metric: str = "test_accuracy", by: Sequence[str] = ("algorithm",),
                      bytes_per_float: int = 4, others: str = "hold", band: str = "range",
                      logx: bool = False, where: Where = None) -> Figure:
    """``metric`` (agent mean) against the cumulative bytes each agent has sent, one line per
    condition: a run's ``bytes_sent`` rows (its real encoded messages, ``network.compress``)
    where it has them, else ``floats_sent`` x ``bytes_per_float`` (float32 by default; runs
    and tidy CSVs from before ``bytes_sent``)."""
    df = as_frame(results)
    runs = _runs(df, metric, where)
    runs = runs[runs["run"].isin(df.loc[df["metric"] == "floats_sent", "run"].unique())]
    fig, axes = new_figure(1, size=(6.0, 4.2))
    ax = axes[0]
    ax.set_title(f"{metric_label(metric)} against communication", fontsize=10)
    if runs.empty:
        no_data(ax)
        return fig
    conds = conditions(runs, list(by), others=others)
    sent = agent_stats(df, "floats_sent", conds.runs["run"])[["run", "round", "mean"]]
    sent = sent.rename(columns={"mean": "bytes"})
    sent["bytes"] *= bytes_per_float
    real = df[(df["metric"] == "bytes_sent") & (df["agent"] < 0)]
    real = real[real["run"].isin(conds.runs["run"])]
    estimated = (~sent["run"].isin(real["run"])).mean() if len(sent) else 0.0  # share of rows
    sent = pd.concat([sent[~sent["run"].isin(real["run"])],
                      real[["run", "round", "value"]].rename(columns={"value": "bytes"})])
    stats = agent_stats(df, metric, conds.runs["run"])
    scale = 100.0 if is_fraction_metric(metric) else 1.0
    for cond in conds.ordered():
        rows = conds.runs[conds.runs["condition"] == cond]
        members = rows["run"]
        c = curve(stats, members, x="round", band=band)
        # x: the bytes sent by that round (the same for every seed of a condition).
        b = sent[sent["run"].isin(members)].groupby("round")["bytes"].mean()
        c = c.assign(x=c["x"].map(b)).dropna(subset=["x"])
        if c.empty:
            continue
        col = colour(cond[0]) if conds.key[0] == "algorithm" else None
        line, = ax.plot(c["x"], c["mean"] * scale, marker=".", color=col,
                        label=seeds_label(conds.label(cond), c, distinct_seeds(rows)))
        if (c["hi"] > c["lo"]).any():
            ax.fill_between(c["x"].astype(float), c["lo"] * scale, c["hi"] * scale,
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if not ax.lines:
        no_data(ax)
        return fig
    if logx:
        ax.set_xscale("symlog", linthresh=max(1.0, float(sent["bytes"][sent["bytes"] > 0].min())
                                             if (sent["bytes"] > 0).any() else 1.0))
    ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    unit = f"float{8 * bytes_per_float}"
    ax.set_xlabel("cumulative bytes sent per agent" + ("" if not estimated else f" ({unit})"
                  if estimated == 1 else f" ({unit} where not recorded)"))
    ax.set_ylabel(metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    corner_note(ax, conds.note())
    return fig


def label_distribution(results, *, max_panels: int = 4) -> Figure:
    """Each agent's label counts as a heatmap (rows: agents, columns: labels).

    The metrics do not hold the labels, so this re-runs each shown run's setup from its
    ``config.json``: ``analysis.plan_facts`` calls ``decaf_ray.plan.prepare``, which builds the
    task (reading the dataset's labels the run trained on, or redrawing synthetic data) and the
    partition, then ``partition.label_histogram``. No weights are loaded and nothing is
    trained, but the run's datasets must be where its config says (``task.root``, data files,
    the stand-in cache), else ``prepare`` raises a ConfigError naming the field.
    ``results``: a run directory, a folder of runs, or a tidy frame; with several runs, one
    panel per distinct data setup (agents, data.*, task.*; first seed), at most
    ``max_panels``."""
    if isinstance(results, (str, Path)) and (Path(results) / "config.json").exists():
        dirs = [str(results)]
        runs = None
    else:
        runs = run_table(as_frame(results))
        dirs = list(runs["run"])
    if runs is not None and len(runs) > 1:
        runs = runs[runs["algorithm"] != "centralized"] if (runs["algorithm"] != "centralized").any() else runs
        setup = [c for c in runs.columns if c == "agents" or c.startswith(("data.", "task."))]
        runs = runs.sort_values(["seed", "run"]) if "seed" in runs else runs
        firsts = runs.drop_duplicates(subset=setup) if setup else runs.iloc[:1]
        if "data.partition" in firsts:
            order = {p: i for i, p in enumerate(("iid", "classes_per_agent"))}
            firsts = firsts.sort_values("data.partition", key=lambda s: s.map(lambda v: order.get(v, 9)),
                                        kind="stable")
        dirs = list(firsts["run"])[:max_panels]
    from decaf_ray.results import load_run_config

    fig, axes = new_figure(len(dirs), size=(4.6, 3.8))
    for ax, d in zip(axes, dirs):
        hist = plan_facts(str(d))["histogram"]
        cfg = load_run_config(d)
        im = ax.imshow(hist, aspect="auto", cmap="viridis", interpolation="nearest")
        n, c = hist.shape
        if n * c <= 400:
            top = hist.max() if hist.size else 0
            for i in range(n):
                for j in range(c):
                    ax.text(j, i, str(hist[i, j]), ha="center", va="center", fontsize=7,
                            color="k" if hist[i, j] > 0.6 * top else "w")
        ax.set_xlabel("label")
        ax.set_ylabel("agent")
        if c <= 20:
            ax.set_xticks(range(c))
        if n <= 20:
            ax.set_yticks(range(n))
        task = getattr(cfg.task, "dataset", None) or cfg.task.kind
        if getattr(cfg.task, "form", None):
            task = f"{task} {cfg.task.form}"
        ax.set_title(f"{pretty('data.partition', cfg.data.partition)}, N = {n}, seed {cfg.seed}"
                     f"\n{task}", fontsize=10)
        fig.colorbar(im, ax=ax, label="training examples")
    return fig
