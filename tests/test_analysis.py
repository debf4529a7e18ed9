"""The analysis package on real (tiny) saved runs, and its tables and fits on hand-made frames."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.data import conditions, run_labels, run_table

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "analysis-test", "algorithm": "decaf", "agents": 4, "topology": "complete",
    "rounds": 12, "local_steps": 2, "eval_every": 3, "seed": 0,
    "task": {"kind": "synthetic", "form": "classification", "d": 4, "k": 8, "true_rank": 2,
             "samples": 200, "test_samples": 200},
    "data": {"partition": "iid", "batch_size": 16},
    "lora": {"rank": 2, "alpha": 2.0},
    "optim": {"name": "sgd", "lr": 0.5},
    "runtime": {"kind": "inprocess", "threads": 1},
}
SEEDS = (0, 1)
NONIID = "classes_per_agent"
RATE_T = (8, 16, 32)


def _configs():
    """(folder, overrides) of every run: Fig. 2, Fig. 3, Table 2 and a rate sweep."""
    runs = []
    for seed in SEEDS:
        def add(alg, topo="complete", part="iid", rank=2, agents=4, seed=seed):
            runs.append((f"{alg}-{topo}-{part}-r{rank}-n{agents}-s{seed}",
                         {"algorithm": alg, "topology": topo, "data.partition": part,
                          "lora.rank": rank, "agents": agents, "seed": seed}))
        for topo, part in itertools.product(("complete", "ring"), ("iid", NONIID)):
            add("decaf", topo, part)                      # Fig. 2a, 2b
        for alg in ("dlora", "dlora_fa"):
            add(alg, "ring", NONIID)                      # Fig. 2c
            for part in ("iid", NONIID):
                add(alg, "complete", part)                # Table 2
        for alg in ("fedavg", "local"):
            for part in ("iid", NONIID):
                add(alg, "complete", part)
        add("centralized")
        for alg in ("decaf", "dlora"):
            add(alg, rank=1)                              # Fig. 3a, 3b
        add("decaf", agents=8)                            # Fig. 3c
    # Corollary 1: T rounds with lr = 0.8 / sqrt(T), on the regression form (no accuracy).
    for alg, t in itertools.product(("decaf", "dlora"), RATE_T):
        runs.append((f"rate/{alg}-T{t}", {"algorithm": alg, "rounds": t, "eval_every": 1,
                                          "optim.lr": round(0.8 / np.sqrt(t), 6),
                                          "task.form": "regression", "task.clusters": 4,
                                          "task.heterogeneity": 0.5}))
    return runs


def _config(overrides):
    data = copy.deepcopy(BASE)
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def build_results(root: Path) -> Path:
    """Run every config in-process and write it as ``decaf-ray run`` does."""
    from decaf_ray.experiment_config import load_config
    from decaf_ray.experiment import run
    from decaf_ray.results import RunWriter

    for folder, overrides in _configs():
        cfg = load_config(_config(overrides))
        writer = RunWriter(root / folder).open(cfg)
        result = run(cfg, on_rows=writer.rows, progress=False)
        # The FA variants share one frozen A tensor across agents, which safetensors refuses
        # to save as is; copies keep the test about the analysis.
        result.factors = {i: {m: (a.clone(), b.clone()) for m, (a, b) in f.items()}
                          for i, f in result.factors.items()}
        writer.close(result)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return build_results(tmp_path_factory.mktemp("analysis") / "results")


@pytest.fixture(scope="module")
def df(results):
    return analysis.load(results)


def _lines(ax):
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


# ------------------------------------------------------------------------------ load

def test_load_columns_and_runs(df):
    for col in ("run", "status", "algorithm", "agents", "topology.name", "lora.rank",
                "data.partition", "seed", "task.kind", "round", "step", "agent", "metric",
                "value"):
        assert col in df.columns, col
    assert df["run"].nunique() == len(_configs())
    assert set(df["status"]) == {"completed"}
    assert {"test_accuracy", "grad_norm_sq", "interference", "floats_sent"} <= set(df["metric"])
    runs = run_table(df)
    assert set(runs["dataset"]) == {"synthetic"}


def test_conditions_hold_other_columns_at_the_shared_value(df):
    runs = run_table(df, "test_accuracy")
    decaf = runs[runs["algorithm"] == "decaf"]
    by_rank = conditions(decaf, ["lora.rank"])
    # rank 1 exists only at complete / iid / 4 agents: rank 2 is held there too.
    assert set(by_rank.runs["topology.name"]) == {"complete"}
    assert set(by_rank.runs["data.partition"]) == {"iid"}
    assert set(by_rank.runs["agents"]) == {4}
    assert by_rank.held == {"data.partition": ["iid"], "topology.name": ["complete"], "agents": [4]}
    assert sorted(by_rank.ordered()) == [(1,), (2,)]
    assert len(by_rank.runs) == 2 * len(SEEDS)
    split = conditions(decaf, ["lora.rank"], others="split")
    assert len(split.ordered()) > 2 and not split.held


# ----------------------------------------------------------------------------- figures

def test_fig2_panels_and_lines(df, tmp_path):
    fig = analysis.fig2(df)
    axes = fig.get_axes()
    assert len(axes) == 3
    labels = [[ln.get_label() for ln in _lines(ax)] for ax in axes]
    assert labels[0] == ["fully connected (2 seeds)", "ring (2 seeds)"]
    assert labels[1] == ["fully connected (2 seeds)", "ring (2 seeds)"]
    assert labels[2] == ["DLoRA (2 seeds)", "DLoRA-FA (2 seeds)", "DeCAF (2 seeds)"]
    # A line is the seed mean of the agent mean, in percent.
    decaf_ring = df[(df.algorithm == "decaf") & (df["topology.name"] == "ring")
                    & (df["data.partition"] == "iid") & (df.metric == "test_accuracy")
                    & (df.agent >= 0) & (df["round"] == 12)]
    want = decaf_ring.groupby("run")["value"].mean().mean() * 100
    y = _lines(axes[0])[1].get_ydata()
    assert y[-1] == pytest.approx(want)
    assert axes[0].get_xlabel() == "round (communication)"
    out = analysis.figure("fig2", df, tmp_path / "fig2.png")
    assert out.exists() and out.stat().st_size > 10_000


def test_a_repeated_seed_is_not_counted_as_another_seed(df):
    # The same experiment run twice (two sweeps sharing a grid point) is one seed, two runs.
    runs = run_table(df, "test_accuracy")
    one = runs[(runs.algorithm == "decaf") & (runs["topology.name"] == "ring")
               & (runs["data.partition"] == "iid") & (runs.seed == SEEDS[0])]
    twin = df[df.run == one.run.iloc[0]].assign(run="twin-of-" + one.run.iloc[0])
    both = df[df.run.isin(one.run)]
    fig = analysis.fig2(pd.concat([both, twin], ignore_index=True))
    assert [ln.get_label() for ln in _lines(fig.get_axes()[0])] == ["ring (2 runs, 1 seed)"]


def test_fig2_missing_panel_says_no_data(df):
    only_iid = df[df["data.partition"] == "iid"]
    fig = analysis.fig2(only_iid)
    axes = fig.get_axes()
    assert len(_lines(axes[0])) == 2
    for ax in axes[1:]:
        assert not _lines(ax)
        assert any(t.get_text() == "no data" for t in ax.texts)


def test_fig3_rank_gap_and_agents(df, tmp_path):
    fig = analysis.fig3(df)
    a, b, c = fig.get_axes()
    assert [ln.get_label() for ln in _lines(a)] == ["r = 1 (2 seeds)", "r = 2 (2 seeds)"]
    assert [ln.get_label() for ln in _lines(c)] == ["N = 4 (2 seeds)", "N = 8 (2 seeds)"]
    assert len(b.patches) == 2  # one bar per rank
    gap = analysis.accuracy_gap(df)
    assert list(gap["lora.rank"]) == [1, 2] and list(gap["n"]) == [2, 2]
    assert (gap["round"] == 12).all()
    # The gap is DeCAF minus DLoRA per seed, averaged over seeds.
    acc = df[(df.metric == "test_accuracy") & (df.agent >= 0) & (df["round"] == 12)
             & (df["topology.name"] == "complete") & (df["data.partition"] == "iid")
             & (df.agents == 4) & (df["lora.rank"] == 1)]
    m = acc.groupby(["algorithm", "seed"])["value"].mean()
    diffs = m["decaf"] - m["dlora"]
    assert gap["gap"].iloc[0] == pytest.approx(diffs.mean())
    assert gap["err"].iloc[0] == pytest.approx(diffs.std(ddof=1))
    assert b.patches[0].get_height() == pytest.approx(100 * diffs.mean())
    assert analysis.accuracy_gap(df, at_round=6)["round"].eq(6).all()
    assert analysis.figure("fig3", df, tmp_path / "fig3.pdf").stat().st_size > 1000


def test_theory_bytes_labels_figures(df, results, tmp_path):
    fig = analysis.theory_curves(df, where={"task.form": "classification"})
    a, b = fig.get_axes()
    labels = [ln.get_label() for ln in _lines(a)]
    assert "DeCAF, r = 1 (2 seeds)" in labels and "DLoRA, r = 2 (2 seeds)" in labels
    blabels = [ln.get_label() for ln in _lines(b)]
    assert "DeCAF, r = 2 (2 seeds) (bound)" in blabels
    # Proposition 1: the TSVD error stays under its bound.
    err = df[(df.metric == "tsvd_error") & (df.algorithm == "decaf")].set_index(["run", "round", "agent"])["value"]
    bound = df[(df.metric == "prop1_bound") & (df.algorithm == "decaf")].set_index(["run", "round", "agent"])["value"]
    assert (err <= bound.reindex(err.index) + 1e-6).all()

    fig = analysis.bytes_vs_accuracy(df)
    ax = fig.get_axes()[0]
    lines = {ln.get_label(): ln for ln in _lines(ax)}
    assert "Local (2 seeds)" in lines and "DeCAF (2 seeds)" in lines
    assert np.all(lines["Local (2 seeds)"].get_xdata() == 0)  # Local sends nothing
    x = lines["DeCAF (2 seeds)"].get_xdata()
    assert x[0] == 0 and np.all(np.diff(x) > 0)
    assert analysis.figure("bytes", df, tmp_path / "bytes.svg").exists()

    one = min(Path(results).glob("decaf-ring-classes_per_agent-*-s0"))
    fig = analysis.label_distribution(one)
    (ax, _cbar) = fig.get_axes()
    hist = ax.get_images()[0].get_array()
    assert hist.shape == (4, 4)
    assert (np.asarray(hist > 0).sum(axis=1) == 1).all()  # one class per agent (non-IID)
    fig = analysis.label_distribution(df[df["task.form"] == "classification"])
    assert len(fig.get_axes()) >= 4  # IID and non-IID panels (each with its colour bar)
    assert analysis.figure("labels", one, tmp_path / "labels.png").exists()


def test_rate_check_on_the_sweep(df, tmp_path, capsys):
    fig, slopes = analysis.rate_check(df)
    assert set(slopes) == {"decaf", "dlora"}
    assert all(np.isfinite(s) for s in slopes.values())
    ax = fig.get_axes()[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("DeCAF (slope ") for t in legend)
    points = analysis.rate_points(df)
    assert sorted(points["T"].unique()) == list(RATE_T)
    assert np.allclose(points["lr_sqrt_T"], 0.8, rtol=1e-4)
    analysis.figure("rate", df, tmp_path / "rate.png")
    assert "rate check" in capsys.readouterr().out


def _rate_frame(ts=(10, 40, 160, 640)):
    rows = []
    for alg, (c, p) in {"decaf": (3.0, -0.5), "dlora": (5.0, -1.0)}.items():
        for t, seed in itertools.product(ts, (0, 1)):
            run = f"/x/{alg}-{t}-{seed}"
            noise = 1.1 if seed else 1 / 1.1  # the seed mean stays c T^p (geometric pairs)
            # Rounds 1..T alternate 0.5 and 1.5 times c T^p (T even: mean c T^p); round 0 is off.
            values = [1e3] + [c * t ** p * noise * (0.5 if r % 2 else 1.5) for r in range(1, t + 1)]
            for r, v in enumerate(values):
                rows.append({"run": run, "status": "completed", "algorithm": alg, "rounds": t,
                             "eval_every": 1, "optim.lr": 0.2 / np.sqrt(t), "seed": seed,
                             "task.kind": "synthetic", "round": r, "step": r, "agent": -1,
                             "metric": "grad_norm_sq", "value": v})
    return pd.DataFrame(rows)


def test_rate_check_refuses_a_sparse_or_mixed_cadence():
    df = _rate_frame(ts=(4, 8))
    mixed = df.assign(eval_every=np.where(df["rounds"] == 8, 2, 1))
    with pytest.raises(ValueError, match="needs eval_every: 1 .* got eval_every 1, 2"):
        analysis.rate_points(mixed)
    sparse = df[(df["round"] % 2 == 0) | (df["round"] == df["rounds"])].drop(columns="eval_every")
    with pytest.raises(ValueError, match=r"every round t = 1..T .*has 2 of 4 rounds"):
        analysis.rate_points(sparse)
    points = analysis.rate_points(df)  # round 0 (1e3) is not in the average
    assert points["max"].max() < 10


def test_rate_slope_on_known_data():
    """avg over t = 1..T of ||grad||^2 = 3 T^-1/2 for decaf and 5 T^-1 for dlora (2 seeds
    each): slopes exact. Round 0 holds a huge value that would bend both lines if averaged."""
    df = _rate_frame()
    fig, slopes = analysis.rate_check(df)
    assert slopes["decaf"] == pytest.approx(-0.5, abs=0.01)
    assert slopes["dlora"] == pytest.approx(-1.0, abs=0.01)
    assert analysis.fit_slope([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    legend = [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()]
    assert "DeCAF (slope -0.50)" in legend and "DLoRA (slope -1.00)" in legend
    with pytest.warns(UserWarning, match="not proportional"):
        analysis.rate_points(df.assign(**{"optim.lr": 0.1 * df["rounds"] / 10}))


# ------------------------------------------------------------------------------ tables

def _hand_frame():
    """Final accuracy by hand: 2 datasets x 2 partitions, 4 algorithms, 2 seeds each."""
    acc = {  # (algorithm, partition, dataset) -> per-seed accuracies
        ("decaf", "iid", "flowers"): (0.95, 0.97), ("dlora", "iid", "flowers"): (0.97, 0.99),
        ("fedavg", "iid", "flowers"): (0.90, 0.90), ("centralized", "iid", "flowers"): (0.99, 0.99),
        ("decaf", NONIID, "flowers"): (0.90, 0.92), ("dlora", NONIID, "flowers"): (0.80, 0.80),
        ("fedavg", NONIID, "flowers"): (0.93, 0.93),
        ("decaf", "iid", "ucf"): (0.70, 0.70), ("dlora", "iid", "ucf"): (0.70, 0.70),
        ("fedavg", "iid", "ucf"): (0.60, 0.60), ("centralized", "iid", "ucf"): (0.50, 0.50),
        ("decaf", NONIID, "ucf"): (0.65, 0.65), ("dlora", NONIID, "ucf"): (0.55, 0.55),
        ("fedavg", NONIID, "ucf"): (0.60, 0.60),
    }
    rows = []
    for (alg, part, ds), accs in acc.items():
        for seed, a in enumerate(accs):
            run = f"/x/{alg}-{part}-{ds}-{seed}"
            for r, v in ((0, 0.1), (5, a)):
                for agent, dv in ((0, -0.01), (1, 0.01)):
                    rows.append({"run": run, "status": "completed", "algorithm": alg,
                                 "data.partition": part, "task.kind": "clip",
                                 "task.dataset": ds, "seed": seed, "round": r, "step": r,
                                 "agent": agent, "metric": "test_accuracy", "value": v + dv})
    return pd.DataFrame(rows)


def test_table2_layout_values_and_marks():
    t = analysis.table2(_hand_frame())
    assert list(t.mean.index) == ["Centralized", "FedAvg", "DLoRA", "DeCAF"]
    assert list(t.mean.columns) == [("IID", "Flowers"), ("IID", "UCF"),
                                    ("Non-IID", "Flowers"), ("Non-IID", "UCF")]
    assert t.mean.loc["DeCAF", ("IID", "Flowers")] == pytest.approx(96.0)
    assert t.std.loc["DeCAF", ("IID", "Flowers")] == pytest.approx(np.std([95, 97], ddof=1))
    # Centralized ignores the partition: its IID runs fill the non-IID columns too.
    assert t.mean.loc["Centralized", ("Non-IID", "Flowers")] == pytest.approx(99.0)
    def cells(m):
        return sorted((r, c) for r in m.index for c in m.columns if m.at[r, c])

    assert cells(t.best) == sorted([("DLoRA", ("IID", "Flowers")), ("DeCAF", ("IID", "UCF")),
                                    ("DLoRA", ("IID", "UCF")), ("FedAvg", ("Non-IID", "Flowers")),
                                    ("DeCAF", ("Non-IID", "UCF"))])
    assert cells(t.second) == sorted([("DeCAF", ("IID", "Flowers")), ("FedAvg", ("IID", "UCF")),
                                      ("DeCAF", ("Non-IID", "Flowers")),
                                      ("FedAvg", ("Non-IID", "UCF"))])
    md = t.to_markdown()
    assert "| DeCAF | <u>96.00 ± 1.41</u> | **70.00 ± 0.00** | <u>91.00 ± 1.41</u> | **65.00 ± 0.00** |" in md
    assert "| DLoRA | **98.00 ± 1.41** | **70.00 ± 0.00** | 80.00 ± 0.00 | 55.00 ± 0.00 |" in md
    assert "| Centralized | 99.00 ± 0.00 |" in md  # a reference row: never marked
    tex = t.to_latex()
    assert r"\multicolumn{2}{c}{IID} & \multicolumn{2}{c}{Non-IID} \\" in tex
    assert (r"DeCAF & \underline{96.00 $\pm$ 1.41} & \textbf{70.00 $\pm$ 0.00} & "
            r"\underline{91.00 $\pm$ 1.41} & \textbf{65.00 $\pm$ 0.00} \\") in tex
    assert tex.count(r"\textbf{") == 5 and tex.count(r"\underline{") == 4
    # A diverged run is flagged, not hidden.
    df = _hand_frame()
    df.loc[df["run"] == "/x/dlora-iid-flowers-1", "status"] = "diverged"
    t = analysis.table2(df)
    assert "**98.00 ± 1.41†**" in t.to_markdown() and any("diverged" in n for n in t.notes)
    assert analysis.table2(df, statuses=("completed",)).n.loc["DLoRA", ("IID", "Flowers")] == 1


def test_table2_without_a_partition_column_has_one_unknown_partition():
    # A CSV that kept only some config columns (docs/results' refactorization sweep has no
    # data.partition): the Centralized copy step is skipped instead of raising KeyError.
    df = _hand_frame()
    df = df[(df["data.partition"] == "iid") & (df["algorithm"] != "centralized")]
    t = analysis.table2(df.drop(columns="data.partition"))
    assert list(t.mean.index) == ["FedAvg", "DLoRA", "DeCAF"]
    assert list(t.mean.columns) == [("-", "Flowers"), ("-", "UCF")]
    assert t.mean.loc["DeCAF", ("-", "Flowers")] == pytest.approx(96.0)


def test_table3_ranks_per_row_and_single_seed_has_no_std():
    df = _hand_frame()
    df = df[df["seed"] == 0].assign(metric="test_f1")
    t = analysis.table3(df[df["data.partition"] == "iid"])
    assert list(t.mean.columns) == ["CNT", "FedAvg", "DLoRA", "DeCAF"]
    assert list(t.mean.index) == ["Flowers", "UCF"]
    md = t.to_markdown()
    assert "| Flowers | 99.00 | 90.00 | **97.00** | <u>95.00</u> |" in md
    assert "| UCF | 50.00 | <u>60.00</u> | **70.00** | **70.00** |" in md


def test_results_table_generic_min_mode_and_no_data():
    df = _hand_frame()
    t = analysis.results_table(df, rows="algorithm", cols="dataset", metric="test_accuracy",
                               mode="min", fmt="{:.1f}", where={"partition": NONIID})
    assert list(t.mean.columns) == ["Flowers", "UCF"]
    assert t.best.loc["DLoRA", "Flowers"] and t.second.loc["DeCAF", "Flowers"]
    assert "80.0 ± 0.0" in t.to_markdown()
    empty = analysis.results_table(df, metric="test_f1")
    assert "no data" in empty.to_markdown()


def test_tables_on_saved_runs(df, tmp_path, capsys):
    t2 = analysis.table2(df, where={"task.form": "classification"})
    assert list(t2.mean.index) == ["Centralized", "Local", "FedAvg", "DLoRA", "DLoRA-FA", "DeCAF"]
    assert list(t2.mean.columns) == [("IID", "Synthetic"), ("Non-IID", "Synthetic")]
    assert (t2.n.values == 2).all()
    assert t2.best.values.sum() >= 2 and not t2.best.loc["Centralized"].any()
    runs = run_table(df)
    run = runs[(runs.algorithm == "decaf") & (runs["topology.name"] == "complete")
               & (runs["data.partition"] == "iid") & (runs["lora.rank"] == 2)
               & (runs.agents == 4)]["run"]
    last = df[df.run.isin(run) & (df.metric == "test_accuracy") & (df.agent >= 0) & (df["round"] == 12)]
    assert t2.mean.loc["DeCAF", ("IID", "Synthetic")] == pytest.approx(
        100 * last.groupby("run")["value"].mean().mean())
    assert "topology fully connected" not in " ".join(t2.notes)  # held notes use raw values
    assert any("topology complete" in n for n in t2.notes)

    t6 = analysis.table6(df, where={"task.form": "classification"})
    assert list(t6.mean.index) == [1, 2]
    assert list(t6.mean.columns) == [("Synthetic", "TT (s)"), ("Synthetic", "NTP")]
    # NTP = r (d + k) = 12 r for the 4 x 8 synthetic layer.
    assert list(t6.mean[("Synthetic", "NTP")]) == [12, 24]
    assert "| 2 |" in t6.to_markdown() and "24 |" in t6.to_markdown()
    t7 = analysis.table7(df, where={"task.form": "classification"})
    assert list(t7.mean.index)[:3] == ["DeCAF", "DLoRA-FA", "DLoRA"]
    assert t7.mean.loc["DLoRA-FA", ("Synthetic", "NTP")] == 8  # only B trains: d r
    assert not t7.best.values.any()

    out = analysis.figure("table2", df, tmp_path / "t2.tex")
    assert out.read_text().startswith(r"\begin{table}")
    assert "| DeCAF |" in capsys.readouterr().out
    out = analysis.figure("table7", df, tmp_path / "t7.md")
    assert "| DeCAF |" in out.read_text()
    t3 = analysis.table3(df)  # no text task here: an empty table, not an error
    assert t3.mean.empty and "no data" in t3.to_markdown()


def test_figure_dispatcher_rejects_bad_names_and_suffixes(df, tmp_path):
    with pytest.raises(ValueError, match="unknown figure"):
        analysis.figure("fig9", df, tmp_path / "x.png")
    with pytest.raises(ValueError, match=".md or .tex"):
        analysis.figure("table2", df, tmp_path / "x.png")
    with pytest.raises(ValueError, match=".png, .pdf or .svg"):
        analysis.figure("fig2", df, tmp_path / "x.md")
    with pytest.raises(FileNotFoundError):
        analysis.figure("fig2", tmp_path / "nothing", tmp_path / "x.png")


def test_plot_runs_still_works(results, tmp_path):
    out = analysis.plot_runs(Path(results) / "rate", "grad_norm_sq", tmp_path / "p.png")
    assert out.exists()


# ------------------------------------------------------------------- decaf-ray plot, one line a run

QUICKSTART = {"name": "quickstart", "topology": "ring", "data.partition": NONIID, "rounds": 6}


def _write(out: Path, overrides: dict, end: str = "close") -> None:
    """A real run written by RunWriter; ``end``: ``close`` (completed), ``interrupt`` (a second
    Ctrl-C: summary ``interrupted``) or ``kill`` (rows, no summary)."""
    from decaf_ray.experiment import run
    from decaf_ray.experiment_config import load_config
    from decaf_ray.results import RunWriter

    cfg = load_config(_config({**QUICKSTART, **overrides}))
    writer = RunWriter(out).open(cfg)
    result = run(cfg, on_rows=writer.rows, progress=False)
    if end == "close":
        writer.close(result)
    elif end == "interrupt":
        writer.fail(KeyboardInterrupt())
    else:
        writer.stop()


def _broken(root: Path) -> dict[str, str]:
    """Runs that cannot be drawn, as a killed or failed ``decaf-ray run`` leaves them, and the
    reason each notice gives."""
    from decaf_ray.experiment_config import load_config
    from decaf_ray.results import RunWriter

    cfg = load_config(_config(QUICKSTART))
    RunWriter(root / "failed").open(cfg).fail(RuntimeError("boom\nmore about it"))
    RunWriter(root / "header-only").open(cfg).stop()
    RunWriter(root / "zero-bytes").open(cfg).stop()
    (root / "zero-bytes" / "metrics.csv").write_text("")
    (root / "torn").mkdir()
    (root / "torn" / "metrics.csv").write_text((root / "decaf" / "metrics.csv").read_text())
    (root / "torn" / "config.json").write_text('{"algorithm": "de')
    (root / "no-metrics").mkdir()  # its metrics.csv lost: the config and summary remain
    (root / "no-metrics" / "config.json").write_text((root / "failed" / "config.json").read_text())
    (root / "no-metrics" / "summary.json").write_text('{"status": "completed"}')
    return {"failed": "failed (RuntimeError: boom)", "header-only": "no metrics yet",
            "zero-bytes": "no metrics yet", "no-metrics": "no metrics.csv",
            "torn": "unreadable config.json (JSONDecodeError: "}


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()]


def test_plot_skips_broken_runs_and_labels_the_quickstart_by_algorithm(tmp_path, capsys):
    root = tmp_path / "quickstart"
    for alg in ("decaf", "dlora", "local"):  # make run: one name for all three
        _write(root / alg, {"algorithm": alg})
    reasons = _broken(root)
    out = analysis.plot_runs(root, "test_accuracy", tmp_path / "acc.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == len(reasons)
    for line, (folder, why) in zip(notices, sorted(reasons.items())):
        assert line.startswith(f"decaf-ray: skipped {root / folder}: {why}"), line
    fig = analysis.runs_figure(root, "test_accuracy")
    assert _legend(fig) == ["Local", "DLoRA", "DeCAF"]  # the paper's order
    assert len(fig.get_axes()[0].get_lines()) == 3
    # one run alone is named by its algorithm
    assert _legend(analysis.runs_figure(root / "dlora", "test_accuracy")) == ["DLoRA"]


def test_plot_of_nothing_usable_is_one_line_naming_the_folder(tmp_path):
    from decaf_ray.cli import main

    root = tmp_path / "bad"
    _write(root / "decaf", {})
    _broken(root)
    for f in (root / "decaf").iterdir():
        if f.name != "summary.json":  # a finished run whose files were lost
            f.unlink()
    with pytest.raises(ValueError, match=f"^{root}: no run left to read"):
        analysis.load(root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["plot", str(root), "--out", str(tmp_path / "x.png")])
    assert code == 2
    last = err.getvalue().splitlines()[-1]
    assert last.startswith("decaf-ray: error: plot: ") and str(root) in last
    assert "Traceback" not in err.getvalue()


def test_plot_labels_by_what_differs_and_flags_unfinished_runs(tmp_path):
    root = tmp_path / "mixed"
    _write(root / "a", {"seed": 0})
    _write(root / "b", {"seed": 1}, end="interrupt")
    _write(root / "c", {"seed": 0, "lora.rank": 1}, end="kill")
    status = analysis.load(root).groupby("run")["status"].first()
    assert list(status) == ["completed", "interrupted", "running"]
    assert _legend(analysis.runs_figure(root, "test_accuracy")) == [
        "r = 1, seed=0 (incomplete)", "r = 2, seed=0", "r = 2, seed=1 (interrupted)"]
    # runs that differ in nothing (a repeat, here also by another name) read as their folders
    twins = tmp_path / "twins"
    _write(twins / "first", {})
    _write(twins / "again" / "second", {"name": "repeat"})
    assert _legend(analysis.runs_figure(twins, "test_accuracy")) == ["again/second", "first"]


def test_run_labels_never_repeat_a_label():
    runs = pd.DataFrame({"run": ["/r/a", "/r/b", "/r/c"], "status": "completed",
                         "name": ["x", "y", "z"], "algorithm": "decaf", "seed": 0,
                         "lora.rank": [2, 2, 1], "runtime.kind": ["inprocess", "ray", "ray"]})
    assert run_labels(runs, root="/r") == {"/r/c": "r = 1", "/r/a": "r = 2 [a]",
                                           "/r/b": "r = 2 [b]"}
    assert list(run_labels(runs, root="/r")) == ["/r/c", "/r/a", "/r/b"]


# ------------------------------------------------------------------------------ notebook

def test_notebook_runs_against_saved_results(results, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed")
    path = ROOT / "notebooks" / "ablations.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert "RESULTS =" in nb.cells[0].source and "DECAF_RAY_RESULTS" in nb.cells[0].source
    monkeypatch.setenv("DECAF_RAY_RESULTS", str(results))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(results) in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # fig2, fig3, theory, bytes, labels, rate
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| DeCAF |" in m for m in markdown)


def test_notebook_is_committed_executed_on_the_committed_results():
    """The notebook opens on docs/results' tidy CSVs and is committed with its outputs, so its
    figures render where the repository is browsed (the test above executes it afresh)."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
    nb = nbformat.read(ROOT / "notebooks" / "ablations.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "../docs/results/" in text and " 0 runs from" not in text
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_load_reads_tidy_csvs_and_lists_of_paths(df, results, tmp_path):
    tidy = tmp_path / "sweep.csv.gz"
    keep = ["run", "status", "algorithm", "seed", "topology.name", "data.partition",
            "lora.rank", "round", "step", "agent", "metric", "value"]
    df[keep].to_csv(tidy, index=False)
    back = analysis.load(tidy)
    assert back.shape == df[keep].shape
    expected = analysis.table2(df[keep]).to_markdown()
    assert analysis.table2(back).to_markdown() == expected
    both = analysis.load([tidy, results])
    assert len(both) == len(back) + len(df)
    df[["run", "status", "round"]].to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv: not a tidy results CSV"):
        analysis.load(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="no such results file"):
        analysis.load(tmp_path / "missing.csv")


def test_refactorization_figure_and_table(tmp_path):
    from decaf_ray.experiment_config import load_config
    from decaf_ray.experiment import run
    from decaf_ray.results import RunWriter

    variants = [("dlora", "balanced", "keep"), ("decaf", "balanced", "keep"),
                ("decaf", "aligned", "rotate")]
    for opt, topo, (alg, split, state), seed in itertools.product(
            ("sgd", "adam"), ("ring", "complete"), variants, (0, 1)):
        cfg = load_config(_config({"algorithm": alg, "topology": topo, "optim.name": opt,
                                   "optim.lr": 0.5 if opt == "sgd" else 0.05, "seed": seed,
                                   "consensus.split": split, "consensus.state": state,
                                   "rounds": 6}))
        writer = RunWriter(tmp_path / f"{opt}-{topo}-{alg}-{split}-{state}-{seed}").open(cfg)
        writer.close(run(cfg, on_rows=writer.rows, progress=False))
    fig = analysis.refactorization(tmp_path)
    axes = fig.get_axes()
    assert len(axes) == 4  # (SGD, Adam) x (ring, complete)
    for ax in axes:
        assert len(_lines(ax)) == 3 and all("(2 seeds)" in ln.get_label() for ln in _lines(ax))
    t = analysis.refactorization_table(tmp_path)
    assert t.mean.shape == (3, 4) and (t.n.values == 2).all()
    md = analysis.figure("refactor_table", tmp_path, tmp_path / "t.md").read_text()
    assert "± " in md and "aligned" in md.lower()
    assert analysis.figure("refactor", tmp_path, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_table5_rows_are_the_benchmarks_with_perplexity_ranked_lowest_best():
    vals = {  # algorithm -> (refusal rate, perplexity); no judge: MT and Vic absent
        "local": (0.40, 9.0), "fedavg": (0.50, 7.0), "dlora": (0.45, 7.5), "decaf": (0.60, 8.0)}
    rows = []
    for alg, (adv, ppl) in vals.items():
        for metric, v in (("advbench_refusal_rate", adv), ("test_perplexity", ppl)):
            for agent in (0, 1):
                rows.append({"run": f"/x/{alg}", "status": "completed", "algorithm": alg,
                             "data.partition": "iid", "task.kind": "instruct", "seed": 0,
                             "round": 4, "step": 8, "agent": agent, "metric": metric,
                             "value": v})
    t = analysis.table5(pd.DataFrame(rows))
    assert list(t.mean.index) == ["Adv", "PPL"]
    assert list(t.mean.columns) == ["Local", "FedAvg", "DLoRA", "DeCAF"]
    md = t.to_markdown()
    assert "| Adv | 40.00 | 50.00 | 45.00 | **60.00** |" in md.replace("<u>50.00</u>", "50.00")
    assert t.best.loc["PPL", "FedAvg"] and t.second.loc["PPL", "DLoRA"]
    assert any("MT, Vic" in n and "judge" in n for n in t.notes)


def test_tsvd_points_by_neighbourhood_size_and_rank():
    rows = []
    for split in ("balanced", "conserved"):
        for (name, degree), m in ((("random_regular", 2), 3), (("complete", None), 10)):
            for rank in (1, 2):
                for seed in (0, 1):
                    run = f"/x/{split}-{name}-{rank}-{seed}"
                    err = 0.1 * m * rank + 0.01 * seed
                    for rnd, metric, v in ((0, "test_accuracy", 0.1), (1, "tsvd_error", err),
                                           (2, "tsvd_error", err), (1, "prop1_bound", 2 * err),
                                           (2, "prop1_bound", 2 * err)):
                        rows.append({"run": run, "status": "completed", "algorithm": "decaf",
                                     "consensus.split": split, "topology.name": name,
                                     "topology.degree": degree, "agents": 10, "lora.rank": rank,
                                     "seed": seed, "round": rnd, "step": rnd, "agent": -1,
                                     "metric": metric, "value": v})
    pts = analysis.tsvd_points(pd.DataFrame(rows))
    got = pts.set_index(["consensus.split", "lora.rank", "m"])
    assert len(pts) == 8 and set(pts["n"]) == {2}
    assert got.loc[("balanced", 2, 10.0), "error"] == pytest.approx(2.005)
    assert got.loc[("conserved", 1, 3.0), "ratio"] == pytest.approx(0.5)
    fig = analysis.tsvd_neighbourhood(pd.DataFrame(rows))
    assert len(fig.axes) == 2


def test_gap_points_pair_each_graph_with_its_metropolis_spectral_gap():
    from decaf_ray import topology

    rows = []
    for (name, degree), dist in ((("ring", None), 4.0), (("complete", None), 1.0),
                                 (("random_regular", 4), 2.0)):
        for seed in (0, 1):
            run = f"/x/{name}-{seed}"
            for rnd, v in ((0, 99.0), (1, dist + seed), (2, dist + seed)):
                rows.append({"run": run, "status": "completed", "algorithm": "decaf",
                             "topology.name": name, "topology.degree": degree, "agents": 10,
                             "lora.rank": 2, "seed": seed, "round": rnd, "step": rnd,
                             "agent": -1, "metric": "consensus_distance", "value": v})
    pts = analysis.gap_points(pd.DataFrame(rows)).set_index("topology")
    ring = topology.mixing_matrix(topology.build_topology("ring", 10), "metropolis")
    assert pts.loc["ring", "gap"] == pytest.approx(topology.spectral_gap(ring))
    assert pts.loc["complete", "gap"] == pytest.approx(1.0)
    # round 0 (the initial model) is left out: the mean over seeds of rounds 1-2
    assert pts.loc["random_regular 4", "value"] == pytest.approx(2.5)
    assert list(pts["n"]) == [2, 2, 2] and list(pts["gap"]) == sorted(pts["gap"])
    assert len(analysis.consensus_gap(pd.DataFrame(rows)).axes[0].lines) >= 1


def test_the_network_study_tables_are_what_its_committed_csvs_give(monkeypatch):
    """docs/results/networks.py's table from the committed lab CSV is the committed table: the
    numbers docs/results/networks.md reads are the data's, and the script still runs."""
    import importlib

    here = Path(__file__).resolve().parents[1] / "docs" / "results"
    monkeypatch.syspath_prepend(str(here))  # as a script there sees it (it imports regenerate)
    networks = importlib.import_module("networks")
    frames = networks.joined({s: pd.read_csv(csv) for s, csv in networks.SWEEPS.items()
                              if csv.is_file()})
    assert "net-synthetic" in frames
    for sweep, df in frames.items():
        text = networks.table(df, networks.TITLES[sweep])
        assert text == (here / f"{networks.STEMS[sweep]}.md").read_text()
        assert "| default |" in text and "not completed" not in text
