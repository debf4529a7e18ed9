"""Selecting runs and reducing their rows: the shared layer under the figures and tables.

Everything here works on the tidy frame of ``analysis.load`` (or on a results directory, which
is loaded first) and reads nothing but saved results (``summary.json`` for the summary fields).

Conditions. A figure panel or a table cell is a *condition*: its key columns (e.g. ``algorithm``
and ``lora.rank``) fixed; the runs of a condition that differ only in ``seed`` are replicates and
are averaged. When some other config column also varies inside a condition (a sweep over
topology x rank feeding a by-rank panel), ``others="hold"`` (the default) keeps, per column, the
value shared by the most conditions (then by the most runs) and records it in a note, so each
line is one setting; ``others="split"`` draws one line per value instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROW_COLUMNS = ("round", "step", "agent", "metric", "value")
META_COLUMNS = ("run", "status")
NOT_A_CONDITION = ("seed", "name")
"""Config columns that never separate conditions: replicates differ in seed, and ``name`` is a
label (``make run`` names each run after its algorithm)."""
NOT_A_CONDITION_PREFIXES = ("runtime.",)

ALGORITHM_ORDER = ("centralized", "local", "local_fa", "fedavg", "fedavg_fa", "dlora",
                   "dlora_fa", "decaf")
"""Table 2's row order."""
ALGORITHM_NAMES = {"centralized": "Centralized", "local": "Local", "local_fa": "Local-FA",
                   "fedavg": "FedAvg", "fedavg_fa": "FedAvg-FA", "dlora": "DLoRA",
                   "dlora_fa": "DLoRA-FA", "decaf": "DeCAF"}
DECENTRALIZED = ("decaf", "dlora", "dlora_fa")
"""The algorithms that mix over the graph (Fig. 2c)."""
PARTITION_NAMES = {"iid": "IID", "classes_per_agent": "Non-IID", "dirichlet": "Dirichlet",
                   "shards": "Shards"}
PARTITION_ORDER = ("iid", "classes_per_agent", "dirichlet", "shards")
TOPOLOGY_NAMES = {"complete": "fully connected", "erdos_renyi": "Erdos-Renyi",
                  "random_regular": "random regular", "small_world": "small world"}
DATASET_NAMES = {"wic": "WIC", "boolq": "BoolQ", "ucf": "UCF", "ucf101": "UCF101",
                 "food101": "Food101", "flowers": "Flowers", "flowers102": "Flowers"}
COLUMN_NAMES = {"lora.rank": "rank", "agents": "N", "topology.name": "topology",
                "data.partition": "partition", "algorithm": "algorithm", "rounds": "T",
                "optim.lr": "lr", "dataset": "dataset"}
ALIASES = {"rank": "lora.rank", "topology": "topology.name", "partition": "data.partition",
           "lr": "optim.lr", "T": "rounds"}
_PRIORITY = ("algorithm", "task.kind", "dataset", "task.dataset", "task.form",
             "data.partition", "topology.name", "lora.rank", "agents", "rounds", "local_steps")

# Colours that stay with an algorithm across figures.
_ALGO_COLOURS = {"decaf": "C3", "dlora": "C0", "dlora_fa": "C2", "fedavg": "C1",
                 "fedavg_fa": "C4", "local": "C7", "local_fa": "C5", "centralized": "k"}


def as_frame(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """``results`` itself when it is a DataFrame, else ``analysis.load(results)``."""
    if isinstance(results, pd.DataFrame):
        return results
    from analysis import load

    return load(results)


def resolve(column: str) -> str:
    """Short names (``rank``, ``topology``, ``partition``, ``lr``, ``T``) to config columns."""
    return ALIASES.get(column, column)


def config_columns(df: pd.DataFrame) -> list[str]:
    """The flattened config columns of a tidy frame (plus the derived ``dataset``)."""
    skip = set(ROW_COLUMNS) | set(META_COLUMNS)
    return [c for c in df.columns if c not in skip]


def condition_columns(columns: Iterable[str]) -> list[str]:
    """Config columns that can tell two conditions apart (all but seed, name, runtime.*)."""
    return [c for c in columns if c not in NOT_A_CONDITION
            and not c.startswith(NOT_A_CONDITION_PREFIXES)]


def with_dataset(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``dataset``: ``task.dataset`` where the task has one, else ``task.kind``."""
    if "dataset" in df.columns:
        return df
    ds = df["task.dataset"] if "task.dataset" in df.columns else pd.Series(np.nan, index=df.index)
    kind = df["task.kind"] if "task.kind" in df.columns else pd.Series("unknown", index=df.index)
    return df.assign(dataset=ds.where(ds.notna(), kind).astype(str))


def run_table(df: pd.DataFrame, metric: str | Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run: ``run``, ``status``, the config columns, ``dataset``. With ``metric``,
    only the runs that recorded it (any of them, for a list)."""
    if metric is not None:
        metrics = [metric] if isinstance(metric, str) else list(metric)
        df = df[df["metric"].isin(metrics)]
    runs = df.drop_duplicates("run")
    cols = ["run", "status"] + config_columns(df)
    return with_dataset(runs[cols].reset_index(drop=True))


def select(runs: pd.DataFrame, where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Keep the runs matching ``where``: column -> value, list/tuple/set of values, or a
    predicate on the column. Short column names are accepted (``rank``, ``topology``, ...)."""
    if not where:
        return runs
    keep = pd.Series(True, index=runs.index)
    for col, want in where.items():
        col = resolve(col)
        if col not in runs.columns:
            keep &= False
            continue
        s = runs[col]
        if callable(want):
            keep &= s.map(lambda v, f=want: bool(f(v))).astype(bool)
        elif isinstance(want, (list, tuple, set, frozenset)):
            keep &= s.isin(list(want))
        else:
            keep &= _equal(s, want)
    return runs[keep]


def _equal(s: pd.Series, value: Any) -> pd.Series:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return s.isna()
    return s == value


def _sort_key(value: Any) -> tuple:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0, "")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0, str(value))


def order_values(column: str, values: Iterable[Any]) -> list[Any]:
    """Values in the paper's order where it has one (algorithms, partitions), else sorted."""
    values = list(dict.fromkeys(values))
    if column == "algorithm":
        known = [a for a in ALGORITHM_ORDER if a in values]
        return known + sorted((v for v in values if v not in ALGORITHM_ORDER), key=_sort_key)
    if column == "data.partition":
        known = [p for p in PARTITION_ORDER if p in values]
        return known + sorted((v for v in values if v not in PARTITION_ORDER), key=_sort_key)
    return sorted(values, key=_sort_key)


def pretty(column: str, value: Any) -> str:
    """A value as the paper writes it: ``DeCAF``, ``IID``, ``fully connected``, ``r = 2``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if column == "algorithm":
        return ALGORITHM_NAMES.get(value, str(value))
    if column == "data.partition":
        return PARTITION_NAMES.get(value, str(value))
    if column == "topology.name":
        return TOPOLOGY_NAMES.get(value, str(value))
    if column in ("dataset", "task.dataset"):
        return DATASET_NAMES.get(str(value).lower(), str(value).capitalize())
    if column == "lora.rank":
        return f"r = {value}"
    if column == "agents":
        return f"N = {value}"
    if column == "rounds":
        return f"T = {value}"
    return f"{COLUMN_NAMES.get(column, column)}={value}"


def colour(algorithm: Any) -> str | None:
    return _ALGO_COLOURS.get(algorithm)


@dataclass
class Conditions:
    """The runs of each condition after ``hold``: ``runs`` has a ``condition`` column (a tuple
    of the key values, then the values of split columns)."""

    runs: pd.DataFrame
    key: list[str]
    split: list[str] = field(default_factory=list)
    held: dict[str, list[Any]] = field(default_factory=dict)

    def label(self, cond: tuple) -> str:
        cols = self.key + self.split
        return ", ".join(pretty(c, v) for c, v in zip(cols, cond))

    def note(self) -> str:
        """``held: rank 2, N 4``: the values other columns were held at ('' when none)."""
        if not self.held:
            return ""
        parts = [f"{COLUMN_NAMES.get(c, c)} {'/'.join(_fmt(v) for v in vs)}"
                 for c, vs in self.held.items()]
        return "held: " + ", ".join(parts)

    def ordered(self) -> list[tuple]:
        conds = list(dict.fromkeys(self.runs["condition"]))
        cols = self.key + self.split
        for i in reversed(range(len(cols))):
            order = order_values(cols[i], [c[i] for c in conds])
            conds.sort(key=lambda c, i=i, order=order: order.index(c[i]))
        return conds


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def conditions(runs: pd.DataFrame, key: Sequence[str], others: str = "hold",
               ignore: Sequence[str] = ()) -> Conditions:
    """Group ``runs`` (a ``run_table``) into conditions by ``key``; see the module docstring.

    ``ignore``: config columns that may vary inside a condition without being held or split
    (e.g. ``rounds`` and ``optim.lr`` for the rate check's x axis)."""
    if others not in ("hold", "split"):
        raise ValueError(f"others must be 'hold' or 'split', not {others!r}")
    key = [resolve(k) for k in key]
    runs = runs.copy()
    for k in key:
        if k not in runs.columns:
            runs[k] = np.nan
    candidates = [c for c in condition_columns(config_columns(runs))
                  if c not in key and c not in ignore and c != "dataset"]
    candidates.sort(key=lambda c: (_PRIORITY.index(c) if c in _PRIORITY else len(_PRIORITY), c))
    held: dict[str, list[Any]] = {}
    split: list[str] = []
    for col in candidates:
        groups = runs.groupby(key, dropna=False, sort=False)[col]
        if runs.empty or groups.nunique(dropna=False).max() <= 1:
            continue
        if others == "split":
            split.append(col)
            continue
        values = runs[col].map(_hashable)
        group_ids = runs.groupby(key, dropna=False, sort=False).ngroup()
        n_groups = pd.DataFrame({"v": values, "g": group_ids}).groupby("v", dropna=False)["g"].nunique()
        n_runs = values.value_counts(dropna=False)
        prefs = sorted(n_runs.index, key=lambda v: (-n_groups.get(v, 0), -n_runs[v], _sort_key(v)))
        rank = {v: i for i, v in enumerate(prefs)}
        r = values.map(rank)
        best = r.groupby(group_ids).transform("min")
        keep = r == best
        held[col] = order_values(col, values[keep].unique())
        runs = runs[keep]
    cols = key + split
    runs["condition"] = [tuple(_hashable(v) for v in row) for row in runs[cols].itertuples(index=False)] \
        if len(runs) else []
    return Conditions(runs, key, split, held)


def _hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---------------------------------------------------------------------------------- values

def metric_rows(df: pd.DataFrame, metric: str, runs: Iterable[str] | None = None) -> pd.DataFrame:
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
        return pd.DataFrame(columns=["run", "round", "step", "mean", "min", "max", "std", "n_agents"])
    return pd.concat(parts, ignore_index=True).sort_values(["run", "round"], ignore_index=True)


def curve(stats: pd.DataFrame, runs: Sequence[str], x: str = "round", band: str = "range",
          x_of: Callable[[pd.DataFrame], pd.Series] | None = None) -> pd.DataFrame:
    """One condition's curve from ``agent_stats`` rows of its ``runs``.

    One run: the mean over agents, band = min-max (``band="range"``) or +-std over agents.
    Several (seeds): the mean over runs of the agent mean, band = the range or +-std of the
    agent mean across runs. Columns ``x, mean, lo, hi, n_runs``."""
    if band not in ("range", "std"):
        raise ValueError(f"band must be 'range' or 'std', not {band!r}")
    s = stats[stats["run"].isin(list(runs))].copy()
    if s.empty:
        return pd.DataFrame(columns=["x", "mean", "lo", "hi", "n_runs"])
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
    return out.reset_index()[["x", "mean", "lo", "hi", "n_runs"]]


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


def summaries(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """One row per run of each run's ``summary.json``, flattened (``final.test_accuracy``,
    ``time_per_round_s``, ``trainable_params_per_agent``, ...), indexed by run. A run without a
    summary (still running) gets an empty row."""
    from analysis import _flatten

    df = as_frame(results)
    rows = {}
    for run in df["run"].unique():
        f = Path(run) / "summary.json"
        rows[run] = _flatten(json.loads(f.read_text())) if f.exists() else {}
    return pd.DataFrame.from_dict(rows, orient="index")


# ----------------------------------------------------------------------- facts from the plan

@lru_cache(maxsize=256)
def plan_facts(run_dir: str) -> dict[str, Any]:
    """What a run's config implies that the metrics do not hold: each agent's label histogram
    and shard size. Rebuilds the plan (graph, task labels, partition) from ``config.json``;
    trains nothing. Cached per run directory."""
    import numpy as _np

    from decaf_ray.plan import prepare
    from decaf_ray.partition import label_histogram
    from decaf_ray.results import load_run_config

    plan = prepare(load_run_config(run_dir))
    labels = _np.asarray(plan.task.train_labels)
    hist = label_histogram(labels, plan.shards, plan.task.num_classes)
    return {"histogram": hist, "shard_sizes": [len(s) for s in plan.shards],
            "batch_size": plan.config.data.batch_size}


def epochs_of(stats: pd.DataFrame) -> pd.Series:
    """x = epochs over each agent's shard: step * batch_size / (mean shard size)."""
    out = pd.Series(np.nan, index=stats.index, dtype=float)
    for run, idx in stats.groupby("run").groups.items():
        facts = plan_facts(str(run))
        per_step = facts["batch_size"] / max(float(np.mean(facts["shard_sizes"])), 1.0)
        out.loc[idx] = stats.loc[idx, "step"].astype(float) * per_step
    return out


X_LABELS = {"round": "round (communication)", "step": "step (local gradient steps)",
            "epoch": "epoch"}


def x_mapper(x: str) -> Callable[[pd.DataFrame], pd.Series] | None:
    if x not in X_LABELS:
        raise ValueError(f"x must be one of {', '.join(X_LABELS)}, not {x!r}")
    return epochs_of if x == "epoch" else None


def is_fraction_metric(metric: str) -> bool:
    """Accuracy and F1 are recorded in [0, 1] and shown in percent."""
    return metric.endswith(("accuracy", "f1"))


def metric_label(metric: str) -> str:
    names = {"test_accuracy": "test accuracy (%)", "test_f1": "test F1 (%)",
             "test_loss": "test loss", "train_loss": "train loss",
             "grad_norm_sq": r"$\|\nabla f(\bar v)\|^2$", "interference": "consensus interference",
             "tsvd_error": "TSVD error"}
    return names.get(metric, metric.replace("_", " "))


def refactorization_variant(df: pd.DataFrame) -> pd.Series:
    """``DeCAF <split>/<state>`` for DeCAF rows; the algorithm's name otherwise (its split and
    state are unused)."""
    name = df["algorithm"].map(lambda a: pretty("algorithm", a))
    decaf = df["algorithm"] == "decaf"
    split = df.get("consensus.split", pd.Series("balanced", index=df.index)).astype(str)
    state = df.get("consensus.state", pd.Series("keep", index=df.index)).astype(str)
    return name.where(~decaf, name + " " + split + "/" + state)
