"""Tables in the paper's layouts, rendered as Markdown and LaTeX.

``results_table`` is the general one: rows and columns are config columns (``algorithm``,
``data.partition``, ``dataset``, ``lora.rank``, ...), a cell is the mean over seeds of one value
per run (a metric's agent mean at the last round, or a ``summary.json`` field), with +- std when
a cell has several seeds; per column (or per row) the best value is bold and the second best
underlined. ``table2``, ``table3``, ``table6`` and ``table7`` are it with the paper's choices.

Markdown marks: ``**best**`` and ``<u>second</u>`` (Markdown has no underline; GitHub and Jupyter
render the tag). LaTeX: ``\\textbf`` and ``\\underline``, booktabs rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.data import (
    ALGORITHM_ORDER,
    COLUMN_NAMES,
    as_frame,
    conditions,
    final_values,
    is_fraction_metric,
    order_values,
    pretty,
    refactorization_variant,
    resolve,
    run_table,
    select,
    summaries,
)

Fmt = str | Callable[[float], str]

COLUMN_TITLES = {"algorithm": "Algorithm", "lora.rank": "Low Rank", "dataset": "Data",
                 "data.partition": "Partition", "agents": "Agents", "topology.name": "Topology"}
QUANTITY_NAMES = {"time_per_round_s": "TT (s)", "trainable_params_per_agent": "NTP",
                  "floats_sent_per_round_per_agent": "floats/round", "wall_time_s": "wall (s)"}


@dataclass
class Table:
    """A rendered-ready table. ``mean``, ``std``, ``n`` share one index and columns (a
    MultiIndex when there are several column levels); ``best``/``second`` are boolean masks."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    best: pd.DataFrame
    second: pd.DataFrame
    fmt: Fmt | Mapping[Any, Fmt] = "{:.2f}"
    row_title: str = ""
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    diverged: pd.DataFrame | None = None
    show_std: bool | Sequence[Any] = True
    """Write ``± std`` in cells of several seeds: all, none, or the listed columns (or last
    column levels, e.g. quantity names)."""

    # ----------------------------------------------------------------- formatting
    def _fmt_for(self, col: Any) -> Fmt:
        if isinstance(self.fmt, Mapping):
            key = col[-1] if isinstance(col, tuple) else col
            return self.fmt.get(col, self.fmt.get(key, "{:.2f}"))
        return self.fmt

    def _std_for(self, col: Any) -> bool:
        if isinstance(self.show_std, bool):
            return self.show_std
        return col in self.show_std or (isinstance(col, tuple) and col[-1] in self.show_std)

    def _number(self, col: Any, v: float) -> str:
        f = self._fmt_for(col)
        return f(v) if callable(f) else f.format(v)

    def text(self, latex: bool = False) -> pd.DataFrame:
        """The cells as plain text (``97.50 ± 0.30``; ``$\\pm$`` in LaTeX), no emphasis."""
        out = pd.DataFrame("", index=self.mean.index, columns=self.mean.columns, dtype=object)
        pm = r" $\pm$ " if latex else " ± "
        for r in self.mean.index:
            for c in self.mean.columns:
                m = self.mean.at[r, c]
                if m is None or (isinstance(m, float) and math.isnan(m)):
                    out.at[r, c] = "--" if latex else "–"
                    continue
                s = self._number(c, m)
                n, sd = self.n.at[r, c], self.std.at[r, c]
                if n and n > 1 and sd is not None and not math.isnan(sd) and self._std_for(c):
                    s += pm + self._number(c, sd)
                if self.diverged is not None and bool(self.diverged.at[r, c]):
                    s += r"$^\dagger$" if latex else "†"
                out.at[r, c] = s
        return out

    # ------------------------------------------------------------------- Markdown
    def to_markdown(self) -> str:
        if self.mean.empty:
            return f"{self.caption}\n\n_no data_\n" if self.caption else "_no data_\n"
        cells = self.text()
        head = [self.row_title or ""] + [_col_name(c) for c in cells.columns]
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join([":---"] + [":---:"] * len(cells.columns)) + "|"]
        for r in cells.index:
            row = [_label(r)]
            for c in cells.columns:
                s = cells.at[r, c]
                if self.best.at[r, c]:
                    s = f"**{s}**"
                elif self.second.at[r, c]:
                    s = f"<u>{s}</u>"
                row.append(s)
            lines.append("| " + " | ".join(row) + " |")
        out = "\n".join(lines) + "\n"
        if self.caption:
            out = f"{self.caption}\n\n{out}"
        if self.notes:
            out += "\n" + "\n".join(f"_{n}_  " for n in self.notes) + "\n"
        return out

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        return self.to_markdown()

    # ---------------------------------------------------------------------- LaTeX
    def to_latex(self, label: str | None = None) -> str:
        """A ``table`` environment (needs ``\\usepackage{booktabs}``)."""
        cells = self.text(latex=True)
        cols = list(cells.columns)
        lines = [r"\begin{table}[t]", r"\centering"]
        if self.caption:
            lines.append(r"\caption{" + _tex(self.caption) + "}")
        if label:
            lines.append(r"\label{" + label + "}")
        lines.append(r"\begin{tabular}{l" + "c" * len(cols) + "}")
        lines.append(r"\toprule")
        if not cols:
            lines += [_tex(self.row_title) + r" \\", r"\midrule", r"\multicolumn{1}{c}{no data} \\"]
        else:
            multi = isinstance(cells.columns, pd.MultiIndex)
            if multi:
                for level in range(cells.columns.nlevels - 1):
                    spans = _spans([c[: level + 1] for c in cols])
                    head, rules, start = [""], [], 2
                    for name, width in spans:
                        head.append(rf"\multicolumn{{{width}}}{{c}}{{{_tex(_label(name[-1]))}}}")
                        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
                        start += width
                    lines.append(" & ".join(head) + r" \\")
                    lines.append("".join(rules))
            last = [_label(c[-1] if multi else c) for c in cols]
            lines.append(" & ".join([_tex(self.row_title)] + [_tex(x) for x in last]) + r" \\")
            lines.append(r"\midrule")
            for r in cells.index:
                row = [_tex(_label(r))]
                for c in cols:
                    s = cells.at[r, c]
                    if self.best.at[r, c]:
                        s = r"\textbf{" + s + "}"
                    elif self.second.at[r, c]:
                        s = r"\underline{" + s + "}"
                    row.append(s)
                lines.append(" & ".join(row) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        for n in self.notes:
            lines.append(r"\par\smallskip{\footnotesize " + _tex(n) + "}")
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"


def _label(v: Any) -> str:
    return str(v)


def _col_name(c: Any) -> str:
    return " / ".join(str(x) for x in c) if isinstance(c, tuple) else str(c)


def _spans(prefixes: list[tuple]) -> list[tuple[tuple, int]]:
    out: list[tuple[tuple, int]] = []
    for p in prefixes:
        if out and out[-1][0] == p:
            out[-1] = (p, out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s)).replace("±", r"$\pm$").replace("†", r"$^\dagger$")


# ---------------------------------------------------------------------------- highlighting

def rank_marks(mean: pd.DataFrame, axis: str | None = "column", mode: str = "max",
               exclude_rows: Sequence[Any] = (), exclude_cols: Sequence[Any] = (),
               key: Callable[[Any, float], Any] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Boolean masks of the best and second-best cells per column (``axis="column"``) or per
    row (``"row"``); ``None``: no marks. Ties (equal after ``key``, e.g. the displayed text)
    share a mark. Excluded rows/columns are neither marked nor compared."""
    best = pd.DataFrame(False, index=mean.index, columns=mean.columns)
    second = best.copy()
    if axis is None or mean.empty:
        return best, second
    if axis not in ("column", "row"):
        raise ValueError(f"highlight must be 'column', 'row' or None, not {axis!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    lines = mean.columns if axis == "column" else mean.index
    for line in lines:
        if axis == "column":
            if line in exclude_cols:
                continue
            s = mean[line].drop(index=[r for r in exclude_rows if r in mean.index])
        else:
            if line in exclude_rows:
                continue
            s = mean.loc[line].drop(index=[c for c in exclude_cols if c in mean.columns])
        s = pd.to_numeric(s, errors="coerce").dropna()
        if s.empty:
            continue
        keyed = {i: (key(line, v) if key else v) for i, v in s.items()}
        # Compare through the key (displayed values) but order by the numbers.
        distinct = sorted({keyed[i] for i in s.index},
                          key=lambda k: -sign * max(s[i] for i in s.index if keyed[i] == k))
        for i in s.index:
            r, c = (line, i) if axis == "row" else (i, line)
            if keyed[i] == distinct[0]:
                best.at[r, c] = True
            elif len(distinct) > 1 and keyed[i] == distinct[1]:
                second.at[r, c] = True
    return best, second


# ---------------------------------------------------------------------------- the table

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
    summ = None
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
    # Centralized ignores the partition: one copy of each of its runs under every partition.
    if "data.partition" in cols_ and "algorithm" in runs and partition_free:
        free = runs["algorithm"].isin(list(partition_free))
        parts = order_values("data.partition", runs.loc[~free, "data.partition"].unique()) \
            if (~free).any() else order_values("data.partition", runs["data.partition"].unique())
        setup = [c for c in runs.columns if c not in ("run", "status", "data.partition")
                 and not c.startswith("data.")]
        base = runs[free].drop_duplicates(subset=[c for c in setup if c in runs.columns])
        copies = [base.assign(**{"data.partition": p}) for p in parts]
        runs = pd.concat([runs[~free]] + copies, ignore_index=True) if copies else runs[~free]
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
    if source == "summary":
        summ = summaries(df.loc[df["run"].isin(chosen["run"])])
    frames = []
    for m in metrics:
        vals = _values(df, chosen, m, source, at_round, summ)
        sc = scale if scale is not None else (100.0 if is_fraction_metric(m) else 1.0)
        v = chosen.assign(value=chosen["run"].map(vals) * sc, quantity=m)
        frames.append(v.dropna(subset=["value"]))
    vals = pd.concat(frames, ignore_index=True)
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
    col_index = wide["mean"].columns
    if isinstance(col_index, pd.MultiIndex):
        levels = [metrics if n == "quantity" else
                  order_values(n, col_index.get_level_values(i).unique())
                  for i, n in enumerate(colkey)]
        order = sorted(col_index, key=lambda t: tuple(levels[i].index(x) for i, x in enumerate(t)))
    else:
        order = ([m for m in metrics if m in col_index] if colkey == ["quantity"]
                 else order_values(colkey[0], list(col_index)))
    def names(c):
        if isinstance(c, tuple):
            return tuple(_pretty_col(n, x) for n, x in zip(colkey, c))
        return _pretty_col(colkey[0] if colkey else "", c)

    out = {}
    for k, w in wide.items():
        w = w.reindex(index=rvals, columns=order)
        w.index = [pretty(rows_[0], r) if rows_[0] in ("algorithm", "dataset", "data.partition",
                                                        "topology.name") else _plain(r)
                   for r in rvals]
        w.columns = pd.MultiIndex.from_tuples([names(c) for c in order]) \
            if isinstance(col_index, pd.MultiIndex) else [names(c) for c in order]
        out[k] = w
    excl = [pretty(rows_[0], a) for a in exclude_from_ranking] if rows_[0] == "algorithm" else []
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
                                          exclude_cols=excl_cols, key=table._number)
    if table.diverged.values.any():
        table.notes.append("† a run in this cell diverged (its last recorded value is used).")
    return table


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


# ---------------------------------------------------------------------------- paper tables

def table2(results, *, metric: str = "test_accuracy", where: Mapping[str, Any] | None = None,
           **kwargs) -> Table:
    """Table 2: final test accuracy (%), rows = algorithms in the paper's order, columns =
    partition (IID / Non-IID) x dataset; best bold, second underlined per column (Centralized
    is a reference row, not ranked)."""
    kwargs.setdefault("caption", "Test accuracy (%) on IID and non-IID data, final round, "
                      "mean over seeds (± std). Best and second-best are bold and underlined.")
    return results_table(results, "algorithm", ("data.partition", "dataset"), metric,
                         where=where, **kwargs)


def table3(results, *, metric: str = "test_f1", where: Mapping[str, Any] | None = None,
           **kwargs) -> Table:
    """Table 3: final F1 (%) on the text datasets, rows = datasets, columns = algorithms in
    the paper's order; best bold, second underlined per row (CNT not ranked)."""
    kwargs.setdefault("caption", "F1 (%) on the text datasets, final round, mean over seeds "
                      "(± std). Best and second-best are bold and underlined.")
    t = results_table(results, "dataset", "algorithm", metric, highlight="row", where=where,
                      **kwargs)
    if not t.mean.empty:
        t.mean = t.mean.rename(columns={"Centralized": "CNT"})
        for name in ("std", "n", "best", "second", "diverged"):
            setattr(t, name, getattr(t, name).rename(columns={"Centralized": "CNT"}))
    return t


def refactorization_table(results, *, metric: str = "test_accuracy",
                          where: Mapping[str, Any] | None = None, **kwargs) -> Table:
    """The re-factorization study: final accuracy (%), rows = (algorithm, split, state),
    columns = optimizer x topology, mean ± std over seeds; best bold, second underlined."""
    kwargs.setdefault("caption", "Test accuracy (%) at the final round, mean ± std over seeds, "
                      "by DeCAF split and optimizer-state policy next to the other algorithms.")
    df = as_frame(results).copy()
    df["variant"] = refactorization_variant(df)
    return results_table(df, "variant", ["optim.name", "topology.name"], metric, where=where,
                         **kwargs)


def _count(v: float) -> str:
    return f"{round(v):,}"


def _seconds(v: float) -> str:
    return f"{v:.3g}"


COST_FMT = {"time_per_round_s": _seconds, "trainable_params_per_agent": _count,
            "floats_sent_per_round_per_agent": _count, "wall_time_s": _seconds}


def table6(results, *, algorithm: str = "decaf",
           quantities: Sequence[str] = ("time_per_round_s", "trainable_params_per_agent"),
           where: Mapping[str, Any] | None = None, **kwargs) -> Table:
    """Table 6: time per round (TT, s) and trainable parameters per agent (NTP) by LoRA rank,
    for ``algorithm`` (DeCAF), columns = dataset x quantity; from ``summary.json``."""
    w = dict(where or {})
    w.setdefault("algorithm", algorithm)
    kwargs.setdefault("caption", "Time per round (TT, s) and trainable parameters per agent "
                      f"(NTP) by rank, {pretty('algorithm', algorithm)}.")
    return results_table(results, "lora.rank", ("dataset",), list(quantities), source="summary",
                         fmt=COST_FMT, highlight=None, where=w,
                         show_std=kwargs.pop("show_std", ["time_per_round_s"]), **kwargs)


TABLE7_ORDER = ("decaf", "dlora_fa", "dlora")


def table7(results, *, algorithms: Sequence[str] | None = None,
           quantities: Sequence[str] = ("time_per_round_s", "trainable_params_per_agent"),
           where: Mapping[str, Any] | None = None, **kwargs) -> Table:
    """Table 7: time per round (TT, s) and trainable parameters per agent (NTP) by method,
    columns = dataset x quantity; from ``summary.json``. Rows: DeCAF, DLoRA-FA, DLoRA (the
    paper's), then any other algorithm present, or ``algorithms``."""
    df = as_frame(results)
    present = list(run_table(df)["algorithm"].unique())
    if algorithms is None:
        algorithms = [a for a in TABLE7_ORDER if a in present] + \
            [a for a in ALGORITHM_ORDER if a in present and a not in TABLE7_ORDER] + \
            [a for a in present if a not in ALGORITHM_ORDER]
    w = dict(where or {})
    w.setdefault("algorithm", list(algorithms))
    kwargs.setdefault("caption", "Time per round (TT, s) and trainable parameters per agent "
                      "(NTP) by method.")
    return results_table(df, "algorithm", ("dataset",), list(quantities), source="summary",
                         fmt=COST_FMT, highlight=None, where=w,
                         row_values=[a for a in algorithms if a in present],
                         show_std=kwargs.pop("show_std", ["time_per_round_s"]), **kwargs)
