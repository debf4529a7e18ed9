"""Rebuild docs/results/ from the CPU-scale sweeps' results.

    python docs/results/reproduce.py runs/sweeps      # every sweep in order (make reproduce-cpu),
                                                      # then this script on runs/sweeps
    python docs/results/regenerate.py runs/sweeps
    python docs/results/regenerate.py --from-csv      # redraw from the CSVs committed here

Writes, next to this file, one tidy CSV per sweep (network-level rows and per-agent test
accuracy, with the KEEP config columns), the figures (PNG) and the tables (Markdown).
``analysis`` reads the CSVs back: ``analysis.load`` is for run folders, but every figure and
table function takes such a frame (``pd.read_csv``) as well.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

import analysis

HERE = Path(__file__).resolve().parent
KEEP = ["run", "status", "name", "algorithm", "seed", "agents", "topology.name", "topology.degree",
        "mixing.scheme", "data.partition", "lora.rank", "lora.rank_rule", "lora.ranks",
        "optim.name", "optim.lr",
        "consensus.split", "consensus.state", "rounds", "local_steps", "data.batch_size"]
METRICS = ["test_accuracy", "test_loss", "train_loss", "consensus_distance", "interference",
           "tsvd_error", "prop1_bound", "grad_norm_sq", "floats_sent", "test_perplexity",
           "advbench_refusal_rate", "mt_bench_score", "vicuna_score"]


def checkpoint_sha256(path: str) -> str:
    """The sha256 of the weights a run fine-tuned, from its config's ``task.checkpoint``: a
    sweep trial reads a copy shipped through Ray's object store and named by its digest
    (``runtime.weights``); any other file is hashed here. '' when there is none."""
    from decaf_ray.tasks.checkpoints import checkpoint_digest

    stem = Path(path).stem
    if re.fullmatch(r"[0-9a-f]{64}", stem):
        return stem
    return checkpoint_digest(path) if Path(path).is_file() else ""


def tidy(df: pd.DataFrame, root: Path, agents: bool = True, keep: list[str] = KEEP,
         metrics: list[str] = METRICS) -> pd.DataFrame:
    """Network rows of ``metrics`` and (with ``agents``) per-agent test accuracy, ``keep``
    columns, run paths relative, and ``checkpoint_sha256`` where the runs fine-tuned a
    checkpoint (the CLIP stand-in)."""
    rows = df[((df["agent"] == -1) & df["metric"].isin(metrics))
              | (agents & (df["agent"] >= 0) & (df["metric"] == "test_accuracy"))]
    if "task.checkpoint" in rows and rows["task.checkpoint"].notna().any():
        digests = {p: checkpoint_sha256(p) for p in rows["task.checkpoint"].dropna().unique()}
        rows = rows.assign(checkpoint_sha256=rows["task.checkpoint"].map(digests))
    # Every KEEP column, constant or not: figures drawn from several sweeps' CSVs at once
    # (Fig. 3 from fig3b and fig3c) hold conditions by them, and a legend tells a repeated seed
    # from another seed by ``seed``.
    keep = [c for c in keep + ["checkpoint_sha256"] if c in rows]
    cols = keep + ["round", "step", "agent", "metric", "value"]
    out = rows[cols].copy()
    # Tune's trial folder names repeat the config; its trial id is enough to tell trials apart,
    # and a run folder nested inside one (an earlier attempt's) keeps its own name after it.
    out["run"] = out["run"].map(lambda p: "/".join(
        ["_".join(Path(p).relative_to(root).parts[1].split("_")[:3]),
         *Path(p).relative_to(root).parts[2:]]))
    return out


def csv_path(sweep: str) -> Path:
    """Where a sweep's tidy CSV lives: ``<sweep>.csv``, gzipped for the synthetic lab's (their
    hundreds of runs make megabytes; pandas reads either)."""
    return HERE / (f"{sweep}.csv.gz" if sweep in LAB else f"{sweep}.csv")


def command_line(doc: str) -> Path | None:
    """These scripts' command line: the sweeps' storage folder, or None for ``--from-csv``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("storage", type=Path, nargs="?", help="the --storage folder the sweeps wrote")
    p.add_argument("--from-csv", action="store_true", help="redraw from the CSVs next to this file")
    args = p.parse_args()
    if (args.storage is None) == (not args.from_csv):
        p.error("give the sweeps' storage folder or --from-csv (one of them)")
    return args.storage


def main() -> None:
    storage = command_line(__doc__)
    frames = {}
    for sweep in ["refactorization-cpu", "refactorization-conserved-cpu", "fig2c-conserved-cpu",
                  *STANDIN, "cmp-standin-cpu", "table5-cpu", *LAB]:
        if storage is None:
            if csv_path(sweep).is_file():
                frames[sweep] = pd.read_csv(csv_path(sweep))
        elif (storage / sweep).is_dir():
            root = storage.resolve()
            frames[sweep] = analysis.load(root / sweep)
            # the rate sweep evaluates every round: its per-agent rows would be megabytes
            out = tidy(frames[sweep], root, agents=sweep != "lab-rate-synthetic")
            out.to_csv(csv_path(sweep), index=False, float_format="%.6g",
                       compression={"method": "infer", "mtime": 0} if sweep in LAB else "infer")
    if "refactorization-cpu" in frames:
        df = frames["refactorization-cpu"]
        analysis.figure("refactor", df, HERE / "refactorization.png")
        analysis.figure("refactor_table", df, HERE / "refactorization.md")
    # variants (DeCAF's split/state, or the algorithm) by optimizer x topology
    for sweep, stem in [("refactorization-conserved-cpu", "refactorization-conserved"),
                        ("fig2c-conserved-cpu", "fig2c-conserved")]:
        if sweep in frames:
            analysis.figure("refactor", frames[sweep], HERE / f"{stem}.png")
            analysis.figure("refactor_table", frames[sweep], HERE / f"{stem}.md")
    standin(frames)
    comparison(frames)
    if "table5-cpu" in frames:
        analysis.figure("table5", frames["table5-cpu"], HERE / "table5-cpu-table.md")
    lab(frames)


STANDIN = ["pilot-rounds-cpu", "fig2c-cpu", "table2-cpu", "table2-iid-cpu", "fig2ab-cpu",
           "fig3-cpu", "tsvd-standin-cpu"]
"""The stand-in's Figure 2-3 and Table 2 sweeps: 3 seeds, 150 rounds, both DeCAF splits."""
TABLE2_ROWS = ["Centralized", "Local", "Local-FA", "DLoRA", "DLoRA-FA", "DeCAF (paper: balanced)",
               "DeCAF (default: conserved)"]


def _variants(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``variant``: ``analysis.names.refactorization_variant`` without the state
    (every run here keeps it), DeCAF's split named as the default or the paper's."""
    from analysis.names import refactorization_variant

    names = {f"DeCAF {v}": f"DeCAF ({k}: {v})" for k, v in SPLITS.items()}
    return df.assign(variant=refactorization_variant(df).str.replace("/keep", "").replace(names))


def standin(frames: dict[str, pd.DataFrame]) -> None:
    """Figure 2 and Table 2 on the stand-in (README.md, "Figures 2 and 3, Table 2")."""
    table2 = [frames[s] for s in ("table2-cpu", "table2-iid-cpu") if s in frames]
    ring = [frames[s] for s in ("fig2c-cpu", "fig2ab-cpu") if s in frames]
    if table2:
        t2 = _variants(pd.concat(table2, ignore_index=True))
        _table(analysis.results_table(
            t2, "variant", "data.partition", "test_accuracy", row_values=[
                r for r in TABLE2_ROWS if r in set(t2["variant"])],
            caption="Table 2 on the CPU stand-in (digits, 10 agents, complete graph, rank 4): "
            "test accuracy (%) at round 150, mean ± std over seeds. Non-IID: the paper's one "
            "class per agent (classes_per_agent) and Dirichlet(0.5)."), HERE / "table2-cpu.md")
        # Local never communicates: its runs on the complete graph are its runs on any graph
        # (the lab's Local is equal on every topology to the last digit), so Fig. 2c reads them.
        local = t2[t2["algorithm"].isin(["local"])].assign(**{"topology.name": "ring"})
        ring.append(local.drop(columns="variant"))
    if "tsvd-standin-cpu" in frames:
        neighbourhoods(frames["tsvd-standin-cpu"], "tsvd-standin", "gap-standin",
                       ranks=[2, 4, 8])
    if "fig3-cpu" in frames:
        # rank 4 with 10 agents: table2-iid-cpu's DeCAF and DLoRA runs
        iid = frames.get("table2-iid-cpu", frames["fig3-cpu"].iloc[:0])
        fig3 = pd.concat([frames["fig3-cpu"], iid[iid["algorithm"].isin(["decaf", "dlora"])]],
                         ignore_index=True)
        for tag, split in SPLITS.items():
            analysis.figure("fig3", _with_decaf(fig3, split), HERE / f"fig3-{tag}.png")
    if not ring:
        return
    fig2 = pd.concat(ring + table2, ignore_index=True)
    rt = _variants(fig2[fig2["topology.name"] == "ring"])
    _table(analysis.results_table(
        rt, "variant", "data.partition", "test_accuracy",
        caption="Fig. 2c on the CPU stand-in (non-IID ring, 10 agents, rank 4): test accuracy "
        "(%) at round 150, mean ± std over seeds. Local: table2-cpu's runs."),
        HERE / "fig2c-cpu.md")
    for tag, split in SPLITS.items():
        for part, stem in [("classes_per_agent", f"fig2-{tag}"),
                           ("dirichlet", f"fig2-{tag}-dirichlet")]:
            analysis.figure("fig2", _with_decaf(fig2, split), HERE / f"{stem}.png",
                            where={"data.partition": ["iid", part]})


def comparison(frames: dict[str, pd.DataFrame]) -> None:
    """Issue 19's comparison of LoRA consensus rules (baselines.md): the lab's cmp-synthetic,
    and on the stand-in cmp-standin-cpu with fig2c-cpu's and table2-cpu's Dirichlet runs of
    DeCAF, DLoRA and DLoRA-FA (the same settings). A table of final accuracy and bytes sent
    per agent, and accuracy against bytes sent, one figure per graph."""
    sets = {"cmp-synthetic": [frames.get("cmp-synthetic")]}
    if "cmp-standin-cpu" in frames:
        sets["cmp-standin"] = [frames["cmp-standin-cpu"]] + [
            f[(f["data.partition"] == "dirichlet") & f["algorithm"].isin(
                ["decaf", "dlora", "dlora_fa"])]
            for f in (frames.get("fig2c-cpu"), frames.get("table2-cpu")) if f is not None]
    for stem, parts in sets.items():
        parts = [p for p in parts if p is not None]
        if not parts:
            continue
        df = _method(pd.concat(parts, ignore_index=True))
        net = df[df["agent"] == -1].pivot_table(
            index=["method", "algorithm", "topology.name", "run", "round"], columns="metric",
            values="value").reset_index()
        (HERE / f"{stem}.md").write_text(_comparison_table(net))
        for graph, g in net.groupby("topology.name"):
            # dashed: the paper's DeCAF split; dotted: per-agent ranks
            style = g["method"].map(lambda m: ":" if "ranks" in m else "--" if "paper" in m
                                    else "-")
            bytes_figure(g.assign(label=g["method"], style=style, bytes=4 * g["floats_sent"]),
                         HERE / f"{stem}-{graph}.png",
                         f"{stem}: {analysis.names.pretty('topology.name', graph)} graph",
                         "bytes sent per agent (float32, cumulative)")


def _method(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``method``, its name as the tables print it (``_variants``, and
    ``, ranks 1-3`` for per-agent ranks)."""
    df = _variants(df)
    ranks = df["lora.ranks"] if "lora.ranks" in df else pd.Series(None, index=df.index)

    def span(r) -> str:  # a list, or its text in a CSV; None or NaN: one rank for all
        got = [int(x) for x in re.findall(r"\d+", str(r))] if isinstance(r, (str, list)) else []
        return f", ranks {min(got)}-{max(got)}" if got else ""

    return df.assign(method=df["variant"] + ranks.map(span)).drop(columns="variant")


def _comparison_table(net: pd.DataFrame) -> str:
    """One row per method and graph, best first within a graph: test accuracy (%) and MB
    sent per agent (float32) at each run's last round, over seeds; and accuracy per byte: the
    accuracy of each run's last evaluation by which it had sent no more than the graph's
    budget, the least any method of that graph sends in the whole run (its round: 0 when even
    the first evaluation sent more)."""
    net = net.assign(mb=4 * net["floats_sent"] / 1e6)
    last = net[net["round"] == net.groupby("run")["round"].transform("max")]
    budget = last.groupby("topology.name")["mb"].min()
    rows = ["| method | graph | test accuracy (%) | MB sent per agent | at the graph's budget "
            "(%) | seeds |", "|:---|:---|---:|---:|---:|---:|"]
    order = {"ring": 0, "complete": 1}
    groups = sorted(last.groupby(["method", "topology.name"]), key=lambda kv: (
        order.get(kv[0][1], 2), -kv[1]["test_accuracy"].mean()))
    for (method, graph), g in groups:
        acc = 100 * g["test_accuracy"]
        within = net[net["run"].isin(g["run"]) & (net["mb"] <= budget[graph] * (1 + 1e-9))]
        at = 100 * within.sort_values("round").groupby("run")["test_accuracy"].last()
        rows.append(f"| {method} | {graph} | {acc.mean():.1f} ± {acc.std():.1f} | "
                    f"{g['mb'].mean():.3g} | {at.mean():.1f} ± {at.std():.1f} | {len(g)} |")
    rows.append("")
    rows += [f"Budget, {graph} graph: {mb:.3g} MB per agent." for graph, mb in budget.items()]
    return "\n".join(rows) + "\n"


def bytes_figure(curves: pd.DataFrame, path: Path, title: str, xlabel: str,
                 **legend) -> None:
    """Test accuracy (mean over seeds, band ± std) against the bytes each agent has sent by
    that round, log x, from the first evaluation after round 0. ``curves``: one row per run
    and round with ``label``, ``algorithm`` (the colour), ``style`` (matplotlib's line
    style), ``bytes`` and ``test_accuracy``; one line per label. ``legend``: to
    ``ax.legend``."""
    import matplotlib.pyplot as plt

    from analysis.names import colour

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (label, alg, style), g in curves[curves["round"] > 0].groupby(
            ["label", "algorithm", "style"]):
        c = g.groupby("round").agg(x=("bytes", "mean"), m=("test_accuracy", "mean"),
                                   s=("test_accuracy", "std")).fillna(0.0)
        line, = ax.plot(c["x"], 100 * c["m"], style, marker=".", label=label, color=colour(alg))
        ax.fill_between(c["x"], 100 * (c["m"] - c["s"]), 100 * (c["m"] + c["s"]),
                        color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, **legend)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


LAB = ["lab-fig2-synthetic", "lab-fig3-synthetic", "lab-tsvd-synthetic", "lab-rate-synthetic",
       "lab-rankrule-synthetic", "cmp-synthetic"]
SPLITS = {"default": "conserved", "paper": "balanced"}
"""The DeCAF each lab figure shows: today's default split, or the paper's."""


def _with_decaf(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """``df`` with only the DeCAF runs of ``split`` (the other algorithms' runs all kept)."""
    other = df["algorithm"] != "decaf"
    return df[other | (df["consensus.split"] == split)]


def _table(table, path: Path) -> None:
    path.write_text(table.to_markdown())


def neighbourhoods(df: pd.DataFrame, tsvd: str, gap: str, ranks: list[int]) -> None:
    """A TSVD sweep's files: Proposition 1 against |N_b(i)| (``tsvd``.png/.md) and the
    consensus distance against the graphs' spectral gaps (``gap``.png/.md, the default split's
    runs of ``ranks``: the lab's rank 1 diverges or blows up)."""
    analysis.figure("tsvd", df, HERE / f"{tsvd}.png")
    pts = analysis.tsvd_points(df)
    head = "| split | rank | \\|N_b(i)\\| | TSVD error | ± std | bound | error / bound | runs |"
    lines = [head, "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['consensus.split']} | {int(r['lora.rank'])} | {int(r['m'])} | "
              f"{r['error']:.4g} | {r['error_std']:.2g} | {r['bound']:.4g} | "
              f"{r['ratio']:.3f} | {int(r['n'])} |" for _, r in pts.iterrows()]
    (HERE / f"{tsvd}.md").write_text("\n".join(lines) + "\n")
    where = {"consensus.split": SPLITS["default"], "lora.rank": ranks}
    analysis.figure("gap", df, HERE / f"{gap}.png", where=where)
    pts = analysis.gap_points(df, where=where)
    lines = ["| rank | graph | spectral gap | consensus distance | ± std | runs |",
             "|---:|:---|---:|---:|---:|---:|"]
    lines += [f"| {int(r['lora.rank'])} | {r['topology']} | {r['gap']:.3f} | "
              f"{r['value']:.4g} | {r['value_std']:.2g} | {int(r['n'])} |"
              for _, r in pts.iterrows()]
    slopes = {int(k): analysis.fit_slope(g["gap"], g["value"]) for k, g in pts.groupby("lora.rank")}
    lines += ["", "Log-log slope of the consensus distance against the gap: "
              + ", ".join(f"rank {k}: {v:+.2f}" for k, v in slopes.items()) + "."]
    (HERE / f"{gap}.md").write_text("\n".join(lines) + "\n")


def lab(frames: dict[str, pd.DataFrame]) -> None:
    """The synthetic theory lab's figures and tables (docs/results/lab-synthetic.md)."""
    if "lab-fig2-synthetic" in frames:
        df = frames["lab-fig2-synthetic"]
        for tag, split in SPLITS.items():
            analysis.figure("fig2", _with_decaf(df, split), HERE / f"lab-fig2-{tag}.png")
        df = _variants(df)
        _table(analysis.results_table(df, "variant", ["data.partition", "topology.name"],
                                      "test_accuracy", caption="Synthetic lab, Fig. 2: test "
                                      "accuracy (%) at round 400, mean ± std over 5 seeds."),
               HERE / "lab-fig2.md")
    if "lab-fig3-synthetic" in frames:
        df = frames["lab-fig3-synthetic"]
        for tag, split in SPLITS.items():
            analysis.figure("fig3", _with_decaf(df, split), HERE / f"lab-fig3-{tag}.png")
        # rank 2 and 8, DLoRA and the default DeCAF: readable (the table has every cell)
        ten = df[(df["agents"] == 10) & df["lora.rank"].isin([2, 8])]
        ten = _with_decaf(ten, SPLITS["default"])
        analysis.figure("theory", ten, HERE / "lab-theory.png")
        df = _variants(df)
        _table(analysis.results_table(df, "variant", ["lora.rank", "agents"], "test_accuracy",
                                      caption="Synthetic lab, Fig. 3: test accuracy (%) at "
                                      "round 400 by rank (10 agents) and agent count (rank 2), "
                                      "IID, ring, mean ± std over 5 seeds."),
               HERE / "lab-fig3.md")
    if "lab-tsvd-synthetic" in frames:
        neighbourhoods(frames["lab-tsvd-synthetic"], "lab-tsvd", "lab-gap", ranks=[2, 4, 8])
    if "lab-rankrule-synthetic" in frames:  # a rank per agent from |N_b(i)|, or one for all
        df = frames["lab-rankrule-synthetic"]
        what = {"test_accuracy": "test accuracy (%)", "tsvd_error": "TSVD error (network mean)",
                "floats_sent": "floats sent per agent (cumulative)"}
        parts = [analysis.results_table(
            df, "topology.name", ["lora.rank", "lora.rank_rule"], metric, highlight=None,
            fmt="{:.4g}", caption=f"Synthetic lab, DeCAF with one rank for every agent "
            f"(uniform) or a rank per agent from its neighbourhood size: {label} at round 200, "
            f"mean ± std over 5 seeds.").to_markdown() for metric, label in what.items()]
        (HERE / "lab-rankrule.md").write_text("\n\n".join(parts))
    if "lab-rate-synthetic" in frames:  # Corollary 1; it prints the fitted slopes
        analysis.figure("rate", frames["lab-rate-synthetic"], HERE / "lab-rate.png")
        pts = analysis.rate_points(frames["lab-rate-synthetic"])
        lines = ["| algorithm | T | mean ‖∇f‖² over t = 1..T | min | max | runs |",
                 "|:---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['algorithm']} | {int(r['T'])} | {r['mean']:.4g} | {r['min']:.4g} | "
                  f"{r['max']:.4g} | {int(r['n_runs'])} |" for _, r in pts.iterrows()]
        slopes = {a: analysis.fit_slope(g["T"], g["mean"]) for a, g in pts.groupby("algorithm")}
        lines += ["", "Log-log slope against T: "
                  + ", ".join(f"{a} {v:+.3f}" for a, v in slopes.items()) + "."]
        (HERE / "lab-rate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
