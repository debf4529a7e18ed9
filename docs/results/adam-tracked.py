"""The tables of docs/results/adam-tracked.md from the adam-tracked-cpu sweep (synthetic) and
the adam-tracked-standin-cpu sweep (the CLIP stand-in).

    decaf-ray sweep sweeps/adam-tracked-cpu.yaml --storage runs/sweeps --max-concurrent 2
    decaf-ray sweep sweeps/adam-tracked-standin-cpu.yaml --storage runs/sweeps --max-concurrent 2
    python docs/results/adam-tracked.py runs/sweeps      # writes the sweeps' CSVs, prints
                                                         # (several storage folders: one CSV)
    python docs/results/adam-tracked.py --from-csv       # the tables from the committed CSV

The CSV is tidy (``run, status, <config columns>, round, step, agent, metric, value``), network
rows only (agent -1). A cell is the final round's test loss and accuracy, mean ± std over the
seeds that completed; a diverged seed is counted, not averaged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
SWEEPS = ("adam-tracked-cpu", "adam-tracked-standin-cpu")
"""Each sweep's tidy CSV is ``<sweep>.csv`` beside this file."""
KEEP = ["run", "status", "algorithm", "consensus.split", "optim.name", "optim.eps", "optim.lr",
        "seed", "rounds"]
METRICS = ["test_loss", "test_accuracy", "consensus_distance", "floats_sent"]
VARIANTS = [("dlora", "balanced", "DLoRA"), ("decaf", "balanced", "DeCAF balanced (the paper)"),
            ("decaf", "conserved", "DeCAF conserved (decaf-ray's default)")]
OPTIMIZERS = [("adam", 1e-8, "local Adam"), ("adam", 1e-2, "local Adam, eps 1e-2"),
              ("adam_tracked", 1e-8, "Algorithm 4, eps 1e-8"),
              ("adam_tracked", 1e-4, "Algorithm 4, eps 1e-4")]


def tidy(storage: Path, sweep: str) -> pd.DataFrame:
    import analysis

    root = storage.resolve()
    df = analysis.load(root / sweep)
    out = df[(df["agent"] == -1) & df["metric"].isin(METRICS)]
    out = out[KEEP + ["round", "step", "agent", "metric", "value"]].copy()
    # Tune's trial folder names repeat the config; its trial id is enough to tell runs apart.
    trial = lambda p: "_".join(Path(p).relative_to(root).parts[1].split("_")[:3])
    out["run"] = out["run"].map(trial)
    return out


def finals(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its config, status, final test loss and accuracy."""
    last = df[df["round"] == df["rounds"]].pivot_table(index="run", columns="metric",
                                                       values="value")
    runs = df.drop_duplicates("run").set_index("run")[KEEP[1:]]
    return runs.join(last[["test_loss", "test_accuracy"]])


def _cell(group: pd.DataFrame, metric: str) -> str:
    ok = group[group["status"] == "completed"][metric]
    bad = len(group) - len(ok)
    big = len(ok) and ok.abs().max() > 1e3  # blown up without a non-finite number
    text = ("–" if not len(ok) else f"{ok.mean():.2g} ± {ok.std():.2g}" if big
            else f"{ok.mean():.3f} ± {ok.std():.3f}")
    return text + (f" ({bad}/{len(group)} diverged)" if bad else "")


def tables(df: pd.DataFrame) -> str:
    f = finals(df)
    seeds = f["seed"].nunique()
    lines = []
    for metric, title in [("test_loss", "Final test loss"),
                          ("test_accuracy", "Final test accuracy")]:
        lines += [f"{title}, best step size per cell (lowest mean test loss over the seeds, all "
                  f"completed), mean ± std over {seeds} seeds:", "",
                  "| variant | " + " | ".join(o[2] for o in OPTIMIZERS) + " |",
                  "|:---|" + ":---:|" * len(OPTIMIZERS)]
        for alg, split, label in VARIANTS:
            cells = []
            for name, eps, _ in OPTIMIZERS:
                g = f[(f["algorithm"] == alg) & (f["consensus.split"] == split)
                      & (f["optim.name"] == name) & (f["optim.eps"] == eps)]
                full = g.groupby("optim.lr").filter(lambda x: (x["status"] == "completed").all())
                if g.empty:
                    cells.append("not run")
                    continue
                if full.empty:
                    cells.append("diverged at every step size")
                    continue
                lr = full.groupby("optim.lr")["test_loss"].mean().idxmin()
                cells.append(f"{_cell(full[full['optim.lr'] == lr], metric)} (lr {lr:g})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lrs = sorted(f["optim.lr"].unique())
    lines += ["Every step size (final test loss; accuracy in brackets):", "",
              "| variant | optimizer | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
              "|:---|:---|" + ":---:|" * len(lrs)]
    for alg, split, label in VARIANTS:
        for name, eps, olabel in OPTIMIZERS:
            g = f[(f["algorithm"] == alg) & (f["consensus.split"] == split)
                  & (f["optim.name"] == name) & (f["optim.eps"] == eps)]
            cells = [f"{_cell(x, 'test_loss')} [{_cell(x, 'test_accuracy')}]"
                     for _, x in g.groupby("optim.lr")]
            if not cells:
                continue
            lines.append(f"| {label} | {olabel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("storage", type=Path, nargs="*", help="the --storage folder(s) the sweep wrote")
    p.add_argument("--from-csv", action="store_true", help="read the committed CSV")
    args = p.parse_args()
    if bool(args.storage) == args.from_csv:
        p.error("give the sweep's storage folder or --from-csv (one of them)")
    for sweep in SWEEPS:
        csv = HERE / f"{sweep}.csv"
        if args.from_csv:
            if not csv.is_file():
                continue
            df = pd.read_csv(csv)
        else:
            found = [s for s in args.storage if (s / sweep).is_dir()]
            if not found:
                continue
            df = pd.concat([tidy(s, sweep) for s in found]).sort_values(["run", "round", "metric"])
            df.to_csv(csv, index=False, float_format="%.6g")
        print(f"## {sweep}\n\n{tables(df)}\n")

if __name__ == "__main__":
    main()
