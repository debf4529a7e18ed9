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

from pathlib import Path

import pandas as pd

import regenerate

HERE = Path(__file__).resolve().parent
SWEEPS = {"net-synthetic": HERE / "net-synthetic.csv.gz",
          "net-synthetic-seeds": HERE / "net-synthetic-seeds.csv.gz",
          "net-standin-cpu": HERE / "net-standin-cpu.csv"}
"""Each sweep's tidy CSV; net-synthetic-seeds (DeCAF and DLoRA, seeds 5-14) joins
net-synthetic in its table and figures."""
KEEP = ["run", "status", "algorithm", "seed", "agents", "topology.name", "data.partition",
        "consensus.split", "rounds", *(
            f"network.{k}" for k in ("schedule", "participation", "link_failure",
                                     "compress.kind"))]
METRICS = ["test_accuracy", "test_loss", "consensus_distance", "floats_sent", "bytes_sent",
           "sim_time_s", "active_agents", "edges_up", "spectral_gap"]
DEFAULT = {"network.schedule": "static", "network.participation": 1.0,
           "network.link_failure": 0.0, "network.compress.kind": "float32"}
"""The default network: every other condition changes one of these."""
ALGORITHMS = {"decaf": "DeCAF (default split)", "dlora": "DLoRA", "dlora_fa": "DLoRA-FA",
              "fedavg": "FedAvg"}


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
    keep = [c for c in KEEP + ["checkpoint_sha256"] if c in runs]
    runs = runs[keep + ["round", "step", "agent", "metric", "value"]]
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
    base = f[f["condition"] == "default"].set_index(["algorithm", "seed"])["test_accuracy"]
    f = f.join(base.rename("default"), on=["algorithm", "seed"])
    f["change"] = 100 * (f["test_accuracy"] - f["default"])  # paired by seed
    algs = [a for a in ALGORITHMS if a in set(f["algorithm"])]
    conds = [c for c in ORDER if c in set(f["condition"])]
    conds += sorted(set(f["condition"]) - set(conds))
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
                d = g["change"].dropna()
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
    change = f.pivot_table(index=["condition", "seed"], columns="algorithm", values="change")
    for c in conds[1:] if {"decaf", "dlora"} <= set(algs) else []:
        d = (change["decaf"] - change["dlora"]).xs(c, level="condition").dropna()
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


def bytes_figure(rows: pd.DataFrame, path: Path) -> None:
    """Accuracy against the bytes sent as encoded (``regenerate.bytes_figure``): colour by
    algorithm, line style by message format."""
    styles = {"float32": "-", "float16": "--", "bfloat16": "-.", "int8": ":"}
    wide = rows.pivot_table(index=["algorithm", "network.compress.kind", "run", "round"],
                            columns="metric", values="value").reset_index()
    kind = wide["network.compress.kind"]
    curves = wide.assign(label=wide["algorithm"].map(ALGORITHMS) + ", " + kind,
                         style=kind.map(styles), bytes=wide["bytes_sent"])
    regenerate.bytes_figure(curves, path, "accuracy against bytes sent, by message format",
                            "bytes sent per agent (cumulative, as encoded)", loc="lower right",
                            ncol=2)


STEMS = {"net-synthetic": "networks-synthetic", "net-standin-cpu": "networks-standin"}
"""Each sweep's table (``<stem>.md``) and figures (``<stem>-*.png``)."""
TITLES = {"net-synthetic": "Synthetic lab, non-IID (one class per agent) ring of 16 agents, "
                           "400 rounds: final test accuracy (%), mean ± std over seeds.",
          "net-standin-cpu": "CLIP stand-in, Dirichlet(0.5) ring of 10 agents, 150 rounds: "
                             "final test accuracy (%), mean ± std over seeds."}


def main() -> None:
    import analysis

    storage = regenerate.command_line(__doc__)
    frames = {}
    for sweep, csv in SWEEPS.items():
        if storage is None:
            if csv.is_file():
                frames[sweep] = pd.read_csv(csv)
        elif (storage / sweep).is_dir():
            root = storage.resolve()
            frames[sweep] = regenerate.tidy(analysis.load(root / sweep), root, agents=False,
                                            keep=KEEP, metrics=METRICS)
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
