"""Selecting runs and grouping them into conditions: the layer under the figures and tables.

Everything here works on the tidy frame of ``analysis.load`` (``analysis.runs``) and reads no
file: one row per run (``run_table``), the runs matching a filter (``select``), the
conditions those runs fall into (``conditions``), and a legend label per run by what differs
between them (``run_labels``).

Conditions. A figure panel or a table cell is a *condition*: its key columns (e.g. ``algorithm``
and ``lora.rank``) fixed; the runs of a condition that differ only in ``seed`` are replicates and
are averaged. When some other config column also varies inside a condition (a sweep over
topology x rank feeding a by-rank panel), ``others="hold"`` (the default) keeps, per column, the
value shared by the most conditions (then by the most runs) and records it in a note, so each
line is one setting; ``others="split"`` draws one line per value instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.names import COLUMN_NAMES, order_values, pretty, resolve, sort_key

ROW_COLUMNS = ("round", "step", "agent", "metric", "value")
META_COLUMNS = ("run", "status")
NOT_A_CONDITION = ("seed", "name")
"""Config columns that never separate conditions: replicates differ in seed, and ``name`` is a
label (``make run`` names each run after its algorithm)."""
NOT_A_CONDITION_PREFIXES = ("runtime.",)
_PRIORITY = ("algorithm", "task.kind", "dataset", "task.dataset", "task.form",
             "data.partition", "topology.name", "lora.rank", "agents", "rounds", "local_steps")
"""The order in which columns varying inside a condition are held or split (others by name)."""


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


@dataclass
class Conditions:
    """The runs of each condition after ``hold``: ``runs`` has a ``condition`` column (a tuple
    of the key values, then the values of split columns)."""

    runs: pd.DataFrame
    key: list[str]
    split: list[str] = field(default_factory=list)
    held: dict[str, list[Any]] = field(default_factory=dict)

    def label(self, cond: tuple) -> str:
        return condition_label(self.key + self.split, cond)

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


def condition_label(columns: Sequence[str], values: Sequence[Any]) -> str:
    """``DeCAF, r = 2``: each column's value as the paper writes it, in ``columns``' order."""
    return ", ".join(pretty(c, v) for c, v in zip(columns, values))


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
        values = runs[col].map(hashable)
        group_ids = runs.groupby(key, dropna=False, sort=False).ngroup()
        n_groups = pd.DataFrame({"v": values, "g": group_ids}).groupby("v", dropna=False)["g"].nunique()
        n_runs = values.value_counts(dropna=False)
        prefs = sorted(n_runs.index, key=lambda v: (-n_groups.get(v, 0), -n_runs[v], sort_key(v)))
        rank = {v: i for i, v in enumerate(prefs)}
        r = values.map(rank)
        best = r.groupby(group_ids).transform("min")
        keep = r == best
        held[col] = order_values(col, values[keep].unique())
        runs = runs[keep]
    cols = key + split
    runs["condition"] = [tuple(hashable(v) for v in row) for row in runs[cols].itertuples(index=False)] \
        if len(runs) else []
    return Conditions(runs, key, split, held)


def hashable(v: Any) -> Any:
    """A cell as a dict key or tuple member: NaN -> None (NaN != NaN), numpy scalars -> Python."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def differing_columns(runs: pd.DataFrame) -> list[str]:
    """The config columns whose values differ across ``runs`` (a ``run_table``): condition
    columns and ``seed`` (a repeated seed is a difference here, unlike inside a condition), in
    the order conditions use, seed last. ``name``, ``runtime.*`` and the derived ``dataset``
    never count (a label, the same numbers, a copy of ``task.*``)."""
    cols = [c for c in condition_columns(config_columns(runs)) if c != "dataset"]
    cols += ["seed"] if "seed" in runs.columns else []
    varying = [c for c in cols if runs[c].map(hashable).nunique(dropna=False) > 1]
    return sorted(varying, key=lambda c: (c == "seed", _PRIORITY.index(c) if c in _PRIORITY
                                          else len(_PRIORITY), c))


def run_labels(runs: pd.DataFrame, root: str | Path | None = None) -> dict[str, str]:
    """A legend label for each run of ``runs`` (a ``run_table``), in the paper's order.

    The values of ``differing_columns`` as a condition's label writes them (``DeCAF``,
    ``DLoRA, r = 4``, ``seed=1``); one run alone: its algorithm; runs that differ in nothing:
    their directory relative to ``root``. Runs that would share a label get their directory
    appended, so no two lines read the same."""
    names = {r: _dir_name(r, root) for r in sorted(runs["run"])}
    if len(runs) == 1 and "algorithm" in runs.columns:
        return {runs["run"].iloc[0]: pretty("algorithm", runs["algorithm"].iloc[0])}
    cols = differing_columns(runs)
    if not cols:
        return names
    conds = conditions(runs, cols)
    labels = {}
    for cond in conds.ordered():
        members = (r for r, c in zip(conds.runs["run"], conds.runs["condition"]) if c == cond)
        labels.update((run, conds.label(cond)) for run in sorted(members))
    shared = pd.Series(labels).duplicated(keep=False)
    return {r: f"{lab} [{names[r]}]" if shared[r] else lab for r, lab in labels.items()}


def _dir_name(run: str, root: str | Path | None) -> str:
    path = Path(run)
    if root is not None and path.is_relative_to(root) and path != Path(root):
        return str(path.relative_to(root))
    return path.name or str(path)
