"""The files of docs/results/networks.md (issue 18's study): DeCAF, DLoRA, DLoRA-FA (and FedAvg
on the lab) under a degraded network, one factor at a time from the default one.

    decaf-ray sweep sweeps/net-synthetic.yaml --storage runs/sweeps --max-concurrent 2
    decaf-ray sweep sweeps/net-standin-cpu.yaml --storage runs/sweeps --max-concurrent 2
    decaf-ray sweep sweeps/net-synthetic-seeds.yaml --storage runs/sweeps --max-concurrent 2
    python docs/results/networks.py runs/sweeps     # writes the sweeps' CSVs, then the rest
    python docs/results/networks.py --from-csv      # the tables and figures from the CSVs

The stand-in's default network is fig2c-cpu's Dirichlet ring (same seeds, rounds and split),
read from ``fig2c-cpu.csv``; those runs predate the ``bytes_sent`` metric, so theirs is
4 x ``floats_sent`` (a float32 message's bytes, which is what the lab's float32 runs record).
The CSVs are tidy (``run, status, <config columns>, round, step, agent, metric, value``),
network rows only (agent -1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
SWEEPS = {"net-synthetic": HERE / "net-synthetic.csv.gz",
          "net-synthetic-seeds": HERE / "net-synthetic-seeds.csv.gz",
          "net-standin-cpu": HERE / "net-standin-cpu.csv"}
"""Each sweep's tidy CSV; net-synthetic-seeds (DeCAF and DLoRA, seeds 5-14) joins
net-synthetic in its table and figures."""
KEEP = ["run", "status", "algorithm", "seed", "agents", "topology.name", "data.partition",
        "consensus.split", "rounds", "checkpoint_sha256", *(
            f"network.{k}" for k in ("schedule", "participation", "link_failure",
                                     "compress.kind"))]
METRICS = ["test_accuracy", "test_loss", "consensus_distance", "floats_sent", "bytes_sent",
           "sim_time_s", "active_agents", "edges_up", "spectral_gap"]
DEFAULT = {"network.schedule": "static", "network.participation": 1.0,
           "network.link_failure": 0.0, "network.compress.kind": "float32"}
"""The default network: every other condition changes one of these."""
ALGORITHMS = {"decaf": "DeCAF (default split)", "dlora": "DLoRA", "dlora_fa": "DLoRA-FA",
              "fedavg": "FedAvg"}


def tidy(storage: Path, sweep: str) -> pd.DataFrame:
    import analysis

    from regenerate import checkpoint_sha256

    root = storage.resolve()
    df = analysis.load(root / sweep)
    out = df[(df["agent"] == -1) & df["metric"].isin(METRICS)].copy()
    if "task.checkpoint" in out and out["task.checkpoint"].notna().any():
        digests = {p: checkpoint_sha256(p) for p in out["task.checkpoint"].dropna().unique()}
        out["checkpoint_sha256"] = out["task.checkpoint"].map(digests)
    out = out[[c for c in KEEP if c in out] + ["round", "step", "agent", "metric", "value"]]
    # Tune's trial folder names repeat the config; its trial id is enough to tell runs apart.
    out["run"] = out["run"].map(lambda p: "_".join(Path(p).relative_to(root).parts[1].split("_")[:3]))
    return out


def joined(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """One frame per study: the lab's sweeps together, and the stand-in's with fig2c-cpu's
    default-network runs (from ``fig2c-cpu.csv``)."""
    out = dict(frames)
    extra = out.pop("net-synthetic-seeds", None)
    if extra is not None and "net-synthetic" in out:
        out["net-synthetic"] = pd.concat([out["net-synthetic"], extra], ignore_index=True)
    fig2c = HERE / "fig2c-cpu.csv"
    if "net-standin-cpu" in out and fig2c.is_file():
        out["net-standin-cpu"] = pd.concat(
            [out["net-standin-cpu"], standin_default(pd.read_csv(fig2c))], ignore_index=True)
    return out


def standin_default(fig2c: pd.DataFrame) -> pd.DataFrame:
    """fig2c-cpu's runs on the default network that net-standin-cpu degrades: the Dirichlet
    ring's DeCAF (default split), DLoRA and DLoRA-FA, network rows, with ``bytes_sent``."""
    runs = fig2c[(fig2c["agent"] == -1) & (fig2c["data.partition"] == "dirichlet")
                 & fig2c["algorithm"].isin(["decaf", "dlora", "dlora_fa"])
                 & ((fig2c["algorithm"] != "decaf") | (fig2c["consensus.split"] == "conserved"))]
    # only the study's columns: a column the sweep's CSV lacks (lora.rank) would split these
    # runs from the sweep's in the figures' conditions
    runs = runs[[c for c in KEEP if c in runs] + ["round", "step", "agent", "metric", "value"]]
    sent = runs[runs["metric"] == "floats_sent"].assign(
        metric="bytes_sent", value=lambda d: 4 * d["value"])
    return pd.concat([runs, sent], ignore_index=True).assign(**DEFAULT)


def condition(row: pd.Series) -> str:
    """The network a run had, as the tables name it: ``default``, or the one factor changed."""
    changed = [k for k, v in DEFAULT.items() if row[k] != v]
    if not changed:
        return "default"
    k = changed[0]
    name = {"network.schedule": "{} graphs", "network.participation": "participation {:g}",
            "network.link_failure": "link failure {:g}", "network.compress.kind": "{} messages"}
    return name[k].format(row[k].replace("_", "-") if isinstance(row[k], str) else row[k])


ORDER = ["default", "link failure 0.2", "link failure 0.5", "participation 0.8",
         "participation 0.5", "one-peer-exponential graphs", "float16 messages", "int8 messages"]
"""The tables' rows: the default network, then each factor as it degrades."""


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the network columns filled from ``DEFAULT`` where a run has none, and the
    probabilities as floats (a run folder's config columns are objects)."""
    df = df.fillna({k: v for k, v in DEFAULT.items() if k in df})
    return df.astype({"network.participation": float, "network.link_failure": float})


def finals(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: algorithm, seed, condition, and its last round's metrics."""
    df = _typed(df)
    last = df[df["round"] == df.groupby("run")["round"].transform("max")]
    wide = last.pivot_table(index="run", columns="metric", values="value")
    runs = df.drop_duplicates("run").set_index("run")
    runs = runs[["algorithm", "seed", "status", *DEFAULT]].join(wide)
    return runs.assign(condition=runs.apply(condition, axis=1))


def table(df: pd.DataFrame, title: str) -> str:
    """Final test accuracy (%), mean ± std over seeds, and in brackets the change from the
    algorithm's own default-network runs of the same seeds (mean ± std of the paired
    differences); then MB sent per agent over the run."""
    f = finals(df)
    algs = [a for a in ALGORITHMS if a in set(f["algorithm"])]
    conds = [c for c in ORDER if c in set(f["condition"])]
    conds += sorted(set(f["condition"]) - set(conds))
    base = f[f["condition"] == "default"].set_index(["algorithm", "seed"])["test_accuracy"]
    seeds = f.groupby(["algorithm", "condition"])["seed"].nunique()
    head = "| network | " + " | ".join(ALGORITHMS[a] for a in algs) + " |"
    rule = "|:---|" + "---:|" * len(algs)
    acc, mb = [title, "", head, rule], ["MB sent per agent over the run (mean over seeds):", "",
                                        head, rule]
    for c in conds:
        cells, sizes = [], []
        for a in algs:
            g = f[(f["algorithm"] == a) & (f["condition"] == c)]
            if g.empty:
                cells.append("–")
                sizes.append("–")
                continue
            v = 100 * g["test_accuracy"]
            text = f"{v.mean():.1f} ± {v.std():.1f}"
            if c != "default":
                d = 100 * (g.set_index("seed")["test_accuracy"]
                           - base.xs(a, level="algorithm")).dropna()
                text += f" ({d.mean():+.1f} ± {d.std():.1f})"
            bad = (g["status"] != "completed").sum()
            cells.append(text + (f", {bad} not completed" if bad else ""))
            sizes.append(f"{(g['bytes_sent'] / 1e6).mean():.3g}")
        acc.append(f"| {c} | " + " | ".join(cells) + " |")
        mb.append(f"| {c} | " + " | ".join(sizes) + " |")
    vs = ["", "DeCAF's change minus DLoRA's, paired by seed (positive: DeCAF held up better), "
          "and the seeds where DeCAF's change was the larger:", "",
          "| network | difference (points, mean ± std) | standard error | seeds DeCAF's larger |",
          "|:---|---:|---:|---:|"]
    drop = {a: 100 * (f[f["algorithm"] == a].set_index(["condition", "seed"])["test_accuracy"]
                      - base.xs(a, level="algorithm")) for a in ("decaf", "dlora") if a in algs}
    for c in conds[1:] if len(drop) == 2 else []:
        d = (drop["decaf"].xs(c, level="condition") - drop["dlora"].xs(c, level="condition")
             ).dropna()
        vs.append(f"| {c} | {d.mean():+.1f} ± {d.std():.1f} | {d.std() / len(d) ** 0.5:.1f} | "
                  f"{(d > 0).sum()} of {len(d)} |")
    n = sorted(set(seeds))
    acc += ["", f"Seeds per cell: {', '.join(map(str, n))}. In brackets: the change from the same "
            "algorithm on the default network, paired by seed (mean ± std of the differences)."]
    return "\n".join(acc + (vs if len(vs) > 5 else []) + [""] + mb) + "\n"


def figures(df: pd.DataFrame, stem: str) -> None:
    """Final accuracy against link failure and against participation (band ± std over
    seeds), and, where the lab sent float16 and int8 messages, accuracy against bytes sent."""
    import analysis

    df = _typed(df)
    for param, short in [("network.link_failure", "link-failure"),
                         ("network.participation", "participation")]:
        analysis.figure("robustness", df, HERE / f"{stem}-{short}.png", param=param,
                        band="std")
    plain = df[(df["network.schedule"] == "static") & (df["network.participation"] == 1.0)
               & (df["network.link_failure"] == 0.0) & (df["agent"] == -1)]
    lossy = plain[plain["network.compress.kind"] != "float32"]
    if not lossy.empty:  # the seeds that ran every format (net-synthetic-seeds ran float32 only)
        bytes_figure(plain[plain["seed"].isin(set(lossy["seed"]))], HERE / f"{stem}-bytes.png")


def bytes_figure(df: pd.DataFrame, path: Path) -> None:
    """Test accuracy (mean over seeds, band ± std) against the bytes each agent has sent by
    that round as encoded, log x; colour by algorithm, line style by message format."""
    import matplotlib.pyplot as plt

    from analysis.names import colour

    styles = {"float32": "-", "float16": "--", "bfloat16": "-.", "int8": ":"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    wide = df[df["round"] > 0].pivot_table(
        index=["algorithm", "network.compress.kind", "run", "round"], columns="metric",
        values="value").reset_index()
    for (alg, kind), g in wide.groupby(["algorithm", "network.compress.kind"]):
        c = g.groupby("round").agg(x=("bytes_sent", "mean"), m=("test_accuracy", "mean"),
                                   s=("test_accuracy", "std")).fillna(0.0)
        line, = ax.plot(c["x"], 100 * c["m"], styles.get(kind, "-"), color=colour(alg),
                        label=f"{ALGORITHMS.get(alg, alg)}, {kind}")
        ax.fill_between(c["x"], 100 * (c["m"] - c["s"]), 100 * (c["m"] + c["s"]),
                        color=line.get_color(), alpha=0.08, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per agent (cumulative, as encoded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against bytes sent, by message format", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


STEMS = {"net-synthetic": "networks-synthetic", "net-standin-cpu": "networks-standin"}
"""Each sweep's table (``<stem>.md``) and figures (``<stem>-*.png``)."""
TITLES = {"net-synthetic": "Synthetic lab, non-IID (one class per agent) ring of 16 agents, "
                           "400 rounds: final test accuracy (%), mean ± std over seeds.",
          "net-standin-cpu": "CLIP stand-in, Dirichlet(0.5) ring of 10 agents, 150 rounds: "
                             "final test accuracy (%), mean ± std over seeds."}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("storage", type=Path, nargs="?", help="the --storage folder the sweeps wrote")
    p.add_argument("--from-csv", action="store_true", help="read the committed CSVs")
    args = p.parse_args()
    if (args.storage is None) == (not args.from_csv):
        p.error("give the sweeps' storage folder or --from-csv (one of them)")
    frames = {}
    for sweep, csv in SWEEPS.items():
        if args.from_csv:
            if csv.is_file():
                frames[sweep] = pd.read_csv(csv)
        elif (args.storage / sweep).is_dir():
            frames[sweep] = tidy(args.storage, sweep)
            frames[sweep].to_csv(csv, index=False, float_format="%.6g",
                                 compression={"method": "infer", "mtime": 0})
    frames = joined(frames)
    for sweep, df in frames.items():
        stem = STEMS[sweep]
        text = table(df, TITLES[sweep])
        (HERE / f"{stem}.md").write_text(text)
        print(text)
        figures(df, stem)


if __name__ == "__main__":
    main()
