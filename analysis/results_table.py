"""``results_table``: a table of one value per run, averaged over seeds, with the paper's
ordering, labels and marks.

Rows and columns are config columns (``algorithm``, ``data.partition``, ``dataset``,
``lora.rank``, ...), a cell is the mean over seeds of one value per run (a metric's agent mean at
the last round, or a ``summary.json`` field), with +- std when a cell has several seeds; per
column (or per row) the best value is bold and the second best underlined. The paper's tables
(``analysis.tables``) are it with the paper's choices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analysis.data import conditions, run_table, select
from analysis.names import COLUMN_NAMES, is_fraction_metric, order_values, pretty, resolve
from analysis.runs import as_frame, summaries
from analysis.table import Fmt, Table, rank_marks
from analysis.values import final_values

COLUMN_TITLES = {"algorithm": "Algorithm", "lora.rank": "Low Rank", "dataset": "Data",
                 "data.partition": "Partition", "agents": "Agents", "topology.name": "Topology"}
QUANTITY_NAMES = {"time_per_round_s": "TT (s)", "trainable_params_per_agent": "NTP",
                  "floats_sent_per_round_per_agent": "floats/round", "wall_time_s": "wall (s)",
                  "mt_bench_score": "MT", "advbench_refusal_rate": "Adv", "vicuna_score": "Vic",
                  "test_perplexity": "PPL"}


def _values(df: pd.DataFrame, runs: pd.DataFrame, metric: str, source: str,
            at_round: int | None, summ: pd.DataFrame | None) -> pd.Series:
    if source == "metrics":
        return final_values(df, metric, runs["run"], at_round=at_round)
    if source == "summary":
        if summ is None or metric not in summ.columns:
            return pd.Series(dtype=float)
        return pd.to_numeric(summ[metric], errors="coerce")
    raise ValueError(f"source must be 'metrics' or 'summary', not {source!r}")


def results_table(results, rows: str | Sequence[str] = "algorithm",
                  cols: str | Sequence[str] = ("data.partition", "dataset"),
                  metric: str | Sequence[str] = "test_accuracy", *,
                  source: str = "metrics", at_round: int | None = None,
                  scale: float | None = None, fmt: Fmt | Mapping[Any, Fmt] = "{:.2f}",
                  mode: str = "max", highlight: str | None = "column",
                  exclude_from_ranking: Sequence[str] = ("centralized",),
                  partition_free: Sequence[str] = ("centralized",),
                  row_values: Sequence[Any] | None = None, where: Mapping[str, Any] | None = None,
                  others: str = "hold", statuses: Sequence[str] = ("completed", "diverged"),
                  show_std: bool | Sequence[str] = True, caption: str = "") -> Table:
    """A table of one value per run, averaged over seeds.

    Args:
        rows, cols: config columns (short names work: ``rank``, ``partition``); ``dataset`` is
            ``task.dataset`` or else ``task.kind``. ``cols=()`` gives one column per metric.
        metric: a metric of metrics.csv (``source="metrics"``: agent mean at the last recorded
            round, or at ``at_round``) or a ``summary.json`` field (``source="summary"``:
            ``time_per_round_s``, ``trainable_params_per_agent``, ``final.test_accuracy``...);
            a list adds a last column level, one per metric.
        scale: multiply values (default 100 for accuracy and F1, else 1).
        fmt: a format string or callable, or a mapping column (or metric) -> either.
        mode, highlight: best = ``max`` or ``min``, marked per ``column`` or ``row`` (None: no
            marks); rows whose algorithm is in ``exclude_from_ranking`` are never marked (the
            paper's Centralized row is a reference).
        partition_free: algorithms whose runs ignore ``data.partition`` (Centralized trains
            one agent on everything): their runs fill every partition column.
        row_values: the rows to show and their order (default: those present, paper order).
        where: select runs first (column -> value / list / predicate).
        others: ``hold`` other config columns varying within a cell at one value (see
            ``analysis.data``; listed in ``notes``) or ``pool`` every run of the cell.
        statuses: runs kept (failed and still-running runs are left out); a cell holding a
            diverged run is marked with a dagger.
        show_std: ``± std`` in cells with several seeds: True, False, or the metrics (columns)
            that get it.
    """
    df = as_frame(results)
    rows_ = [resolve(rows)] if isinstance(rows, str) else [resolve(r) for r in rows]
    cols_ = [resolve(cols)] if isinstance(cols, str) else [resolve(c) for c in cols]
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if source == "summary":
        runs = run_table(df)
    else:
        runs = run_table(df, metrics)
    runs = select(runs, where)
    runs = runs[runs["status"].isin(list(statuses))]
    if len(rows_) != 1:
        raise ValueError("rows must be one column")
    if runs.empty:
        return _empty(rows_[0], caption, metrics)
    notes: list[str] = []
    if "data.partition" in cols_ and {"data.partition", "algorithm"} <= set(runs.columns) \
            and partition_free:
        runs = _copy_partition_free(runs, partition_free)
    key = rows_ + cols_
    if others not in ("hold", "pool"):
        raise ValueError(f"others must be 'hold' or 'pool' for a table, not {others!r}")
    conds = conditions(runs, key, others="hold" if others == "hold" else "split")
    chosen = conds.runs
    if conds.held:
        notes.append(conds.note().replace("held:", "Other settings held at:"))
    if conds.split:
        notes.append("Cells pool runs that differ in: "
                     + ", ".join(COLUMN_NAMES.get(c, c) for c in conds.split))
    vals = _cell_values(df, chosen, metrics, source, at_round, scale)
    if vals.empty:
        return _empty(rows_[0], caption, metrics)
    colkey = cols_ + (["quantity"] if len(metrics) > 1 or not cols_ else [])
    vals = vals.assign(_div=vals["status"] == "diverged")
    for c in key:  # groupby drops NaN keys; a missing value is its own row/column
        vals[c] = vals[c].map(lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
    g = vals.groupby(rows_ + colkey, sort=False)
    agg = pd.DataFrame({"mean": g["value"].mean(), "std": g["value"].std(ddof=1),
                        "n": g["value"].size(), "div": g["_div"].any()})
    wide = {k: agg[k].unstack(colkey) if colkey else agg[k].to_frame() for k in agg}
    # Order rows and columns the paper's way, with display labels.
    rvals = list(row_values) if row_values is not None else order_values(rows_[0], vals[rows_[0]].unique())
    rvals = [r for r in rvals if r in wide["mean"].index] if row_values is None else rvals
    order = _column_order(wide["mean"].columns, colkey, metrics)
    out = {k: _labelled(w, rows_[0], rvals, colkey, order) for k, w in wide.items()}
    # rows of other columns may name algorithms too (a study's variants: "Centralized")
    excl = [pretty("algorithm", a) for a in exclude_from_ranking]
    if "algorithm" in colkey and highlight == "row":
        excl_cols = [c for c in out["mean"].columns
                     if (c[colkey.index("algorithm")] if isinstance(c, tuple) else c)
                     in [pretty("algorithm", a) for a in exclude_from_ranking]]
    else:
        excl_cols = []
    table = Table(out["mean"], out["std"], out["n"].fillna(0).astype(int),
                  *[None, None], fmt=_pretty_fmt(fmt, colkey), row_title=COLUMN_TITLES.get(rows_[0], rows_[0]),
                  caption=caption, notes=notes, diverged=out["div"].fillna(False).astype(bool),
                  show_std=show_std if isinstance(show_std, bool)
                  else [QUANTITY_NAMES.get(q, q) for q in show_std])
    # Ties are equal displayed values.
    table.best, table.second = rank_marks(out["mean"], highlight, mode, exclude_rows=excl,
                                          exclude_cols=excl_cols, key=table.number)
    if table.diverged.values.any():
        table.notes.append("† a run in this cell diverged (its last recorded value is used).")
    return table


def _copy_partition_free(runs: pd.DataFrame, partition_free: Sequence[str]) -> pd.DataFrame:
    """Centralized ignores the partition: one copy of each of its runs under every partition
    (those of the other runs, or its own when it is alone)."""
    free = runs["algorithm"].isin(list(partition_free))
    parts = order_values("data.partition", runs.loc[~free, "data.partition"].unique()) \
        if (~free).any() else order_values("data.partition", runs["data.partition"].unique())
    setup = [c for c in runs.columns if c not in ("run", "status", "data.partition")
             and not c.startswith("data.")]
    base = runs[free].drop_duplicates(subset=[c for c in setup if c in runs.columns])
    copies = [base.assign(**{"data.partition": p}) for p in parts]
    return pd.concat([runs[~free]] + copies, ignore_index=True) if copies else runs[~free]


def _cell_values(df: pd.DataFrame, chosen: pd.DataFrame, metrics: Sequence[str], source: str,
                 at_round: int | None, scale: float | None) -> pd.DataFrame:
    """``chosen`` (one row per run) with ``value`` (scaled) and ``quantity``, one copy per
    metric; runs without the value are left out."""
    summ = summaries(df.loc[df["run"].isin(chosen["run"])]) if source == "summary" else None
    frames = []
    for m in metrics:
        vals = _values(df, chosen, m, source, at_round, summ)
        sc = scale if scale is not None else (100.0 if is_fraction_metric(m) else 1.0)
        v = chosen.assign(value=chosen["run"].map(vals) * sc, quantity=m)
        frames.append(v.dropna(subset=["value"]))
    return pd.concat(frames, ignore_index=True)


def _column_order(col_index: pd.Index, colkey: list[str], metrics: Sequence[str]) -> list[Any]:
    """The columns in the paper's order per level; quantities in the order asked for."""
    if isinstance(col_index, pd.MultiIndex):
        levels = [metrics if n == "quantity" else
                  order_values(n, col_index.get_level_values(i).unique())
                  for i, n in enumerate(colkey)]
        return sorted(col_index, key=lambda t: tuple(levels[i].index(x) for i, x in enumerate(t)))
    return ([m for m in metrics if m in col_index] if colkey == ["quantity"]
            else order_values(colkey[0], list(col_index)))


def _labelled(wide: pd.DataFrame, row: str, rvals: list[Any], colkey: list[str],
              order: list[Any]) -> pd.DataFrame:
    """``wide`` reindexed to ``rvals`` x ``order``, with display labels."""
    def name(c):
        if isinstance(c, tuple):
            return tuple(_pretty_col(n, x) for n, x in zip(colkey, c))
        return _pretty_col(colkey[0] if colkey else "", c)

    multi = isinstance(wide.columns, pd.MultiIndex)
    w = wide.reindex(index=rvals, columns=order)
    w.index = [pretty(row, r) if row in ("algorithm", "dataset", "data.partition",
                                         "topology.name") else _plain(r)
               for r in rvals]
    w.columns = pd.MultiIndex.from_tuples([name(c) for c in order]) if multi \
        else [name(c) for c in order]
    return w


def _plain(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _pretty_col(column: str, value: Any) -> Any:
    if column == "quantity":
        return QUANTITY_NAMES.get(value, value)
    if column in ("algorithm", "dataset", "data.partition", "topology.name"):
        return pretty(column, value)
    return _plain(value)


def _pretty_fmt(fmt, colkey):
    if isinstance(fmt, Mapping):
        return {(QUANTITY_NAMES.get(k, k) if isinstance(k, str) else k): v for k, v in fmt.items()}
    return fmt


def _empty(row_title: str, caption: str, metrics: Sequence[str]) -> Table:
    e = pd.DataFrame()
    t = Table(e, e, e, e, e, row_title=COLUMN_TITLES.get(row_title, row_title), caption=caption)
    t.notes.append(f"no run recorded {', '.join(metrics)}")
    return t
