"""Analysis of saved runs: read what ``decaf_ray.results`` wrote, never a live run.

``load(path)`` gives one tidy DataFrame of every run under ``path`` (a run directory or any folder
of them): the metric rows plus flattened config columns (``algorithm``, ``topology.name``,
``lora.rank``, ...) and the run's ``status`` and ``run`` (its directory). Failed, empty and
unreadable runs are skipped with a one-line notice on stderr. It also reads the tidy CSVs that
``docs/results/regenerate.py`` writes (``load_tidy``), or a list of paths of either kind.

On top of it (each takes that frame or a results directory):

- figures (``analysis.figures``, ``analysis.theory``; each returns a matplotlib Figure):
  ``fig2``, ``fig3``, ``theory_curves``, ``bytes_vs_accuracy``, ``label_distribution``,
  ``rate_check`` (returns ``(figure, slopes)``), ``refactorization`` (the DeCAF split study),
  ``tsvd_neighbourhood`` (Proposition 1 against |N_b(i)| and rank; ``tsvd_points`` its data),
  ``consensus_gap`` (consensus distance against the spectral gap; ``gap_points`` its data),
  ``network_curves`` (a metric against bytes sent or simulated time) and ``robustness`` (the
  final metric against a swept network parameter; ``robustness_points`` its data), in
  ``analysis.network``;
- tables (``analysis.tables``; each returns a ``Table`` with ``to_markdown``/``to_latex``):
  ``table2``, ``table3``, ``table5``, ``table6``, ``table7``, ``refactorization_table``, ``results_table``;
- ``figure(name, results, out)``: write any of them to a file by name (what ``decaf-ray plot
  --figure`` calls);
- ``plot_runs(path, metric, out)``: one line per run, labelled by what differs between the runs
  (``analysis.overview.runs_figure``; what ``decaf-ray plot`` draws without ``--figure``).

Beneath them, from the bottom up: ``runs`` reads the files, ``names`` holds the paper's names and
orders, ``data`` selects runs and groups them into conditions, ``values`` reduces metric rows to
curves and final values, ``table`` and ``results_table`` build and render a table.

Two views re-run a run's setup instead of only reading files: the epoch axis (``x="epoch"``) and
``label_distribution`` call ``decaf_ray.plan.prepare`` on the saved config through
``analysis.plan_facts``. That builds the task, so it needs the datasets the run used (it trains
nothing and loads no weights); everything else needs only the saved results.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.figures import (
    accuracy_gap,
    bytes_vs_accuracy,
    fig2,
    fig3,
    label_distribution,
    refactorization,
)
from analysis.network import network_curves, robustness, robustness_points
from analysis.overview import runs_figure
from analysis.results_table import results_table
from analysis.runs import load, load_tidy, run_dirs, summaries
from analysis.table import Table
from analysis.tables import refactorization_table, table2, table3, table5, table6, table7
from analysis.theory import (consensus_gap, fit_slope, gap_points, rate_check, rate_points,
                             theory_curves, tsvd_neighbourhood, tsvd_points)


def plot_runs(path: str | Path, metric: str, out: str | Path) -> Path:
    """``metric`` against round for every run under ``path`` (``overview.runs_figure``: one line
    per run, failed and empty runs skipped with a notice, the legend by what differs). Writes
    ``out`` and returns its path."""
    fig = runs_figure(path, metric)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


__all__ = ["FIGURES", "NAMES", "TABLES", "Table", "accuracy_gap", "bytes_vs_accuracy",
           "consensus_gap", "fig2", "fig3", "figure", "fit_slope", "gap_points",
           "label_distribution", "load", "load_tidy", "network_curves", "plot_runs", "rate_check",
           "rate_points", "refactorization", "refactorization_table", "results_table",
           "robustness", "robustness_points", "run_dirs", "runs_figure",
           "summaries", "table2", "table3", "table5", "table6", "table7", "theory_curves",
           "tsvd_neighbourhood", "tsvd_points"]

FIGURES = {"fig2": fig2, "fig3": fig3, "theory": theory_curves, "bytes": bytes_vs_accuracy,
           "labels": label_distribution, "rate": rate_check, "refactor": refactorization,
           "tsvd": tsvd_neighbourhood, "gap": consensus_gap, "network": network_curves,
           "robustness": robustness}
TABLES = {"table2": table2, "table3": table3, "table5": table5, "table6": table6, "table7": table7,
          "refactor_table": refactorization_table}
NAMES = tuple(FIGURES) + tuple(TABLES)
"""Every name ``figure`` accepts."""
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
TABLE_SUFFIXES = (".md", ".tex")


def figure(name: str, results: str | Path | pd.DataFrame, out: str | Path, **kwargs) -> Path:
    """Make figure or table ``name`` (one of ``NAMES``) from ``results`` (a results directory or
    a tidy frame from ``load``) and write it to ``out``; returns ``out``.

    Figures write ``.png``, ``.pdf`` or ``.svg``; tables write Markdown (``.md``) or LaTeX
    (``.tex``) by the suffix and print their Markdown to stdout; ``rate`` also prints the fitted
    slopes. ``kwargs`` go to the figure or table function (``where=``, ``at_round=``, ...).
    Raises ``ValueError`` for an unknown name or a suffix that does not fit, and
    ``FileNotFoundError`` when ``results`` holds no run."""
    out = Path(out)
    suffix = out.suffix.lower()
    if name in TABLES:
        if suffix not in TABLE_SUFFIXES:
            raise ValueError(f"table {name} is written as .md or .tex, not {out.name!r}")
    elif name in FIGURES:
        if suffix not in FIGURE_SUFFIXES:
            raise ValueError(f"figure {name} is written as .png, .pdf or .svg, not {out.name!r}")
    else:
        raise ValueError(f"unknown figure {name!r}; choose from {', '.join(NAMES)}")
    data = results if name == "labels" or isinstance(results, pd.DataFrame) else load(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    if name in TABLES:
        table = TABLES[name](data, **kwargs)
        markdown = table.to_markdown()
        out.write_text(markdown if suffix == ".md" else table.to_latex())
        print(markdown, end="")
        return out
    made = FIGURES[name](data, **kwargs)
    fig = made[0] if isinstance(made, tuple) else made
    if name == "rate":
        slopes = made[1]
        shown = [f"{a} {s:+.3f}" if math.isfinite(s) else f"{a} n/a (one T)"
                 for a, s in slopes.items()]
        print("rate check, log-log slope of mean ||grad f||^2 against T: "
              + (", ".join(shown) if shown else "no data"))
    fig.savefig(out, dpi=150)
    return out
