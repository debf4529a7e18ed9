"""One table, ready to render: cell means, stds and seed counts, best and second-best marks,
and its Markdown and LaTeX.

Markdown marks: ``**best**`` and ``<u>second</u>`` (Markdown has no underline; GitHub and Jupyter
render the tag). LaTeX: ``\\textbf`` and ``\\underline``, booktabs rules. ``rank_marks`` finds
the cells to mark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

Fmt = str | Callable[[float], str]
"""A cell's number format: a format string (``"{:.2f}"``) or a callable."""


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

    def number(self, col: Any, v: float) -> str:
        """``v`` as column ``col`` shows it (its format, no std or marks)."""
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
                s = self.number(c, m)
                n, sd = self.n.at[r, c], self.std.at[r, c]
                if n and n > 1 and sd is not None and not math.isnan(sd) and self._std_for(c):
                    s += pm + self.number(c, sd)
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


# ---------------------------------------------------------------------------- marks

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
