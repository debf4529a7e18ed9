"""How the paper names and orders things: algorithms, partitions, topologies, datasets, config
columns and metrics, and the colour each algorithm keeps across figures.

Pure lookups on values and column names; no frame is read here except by
``refactorization_variant``, which only relabels rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from analysis.runs import NO_SUMMARY

ALGORITHM_ORDER = ("centralized", "local", "local_fa", "fedavg", "fedavg_fa", "fedex", "flora",
                   "dlora", "dlora_fa", "fedsa", "alternating", "hetlora", "decaf")
"""Table 2's row order, with the algorithms the paper does not run among their kin: FedEx-LoRA
and FLoRA after the other server baselines, FedSA-LoRA, alternating and HetLoRA among the
gossip ones, before DeCAF."""
ALGORITHM_NAMES = {"centralized": "Centralized", "local": "Local", "local_fa": "Local-FA",
                   "fedavg": "FedAvg", "fedavg_fa": "FedAvg-FA", "fedex": "FedEx-LoRA",
                   "flora": "FLoRA", "dlora": "DLoRA", "dlora_fa": "DLoRA-FA",
                   "fedsa": "FedSA-LoRA", "alternating": "Alternating", "hetlora": "HetLoRA",
                   "decaf": "DeCAF"}
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
                "optim.lr": "lr", "dataset": "dataset", "network.link_failure": "link failure",
                "network.participation": "participation", "network.schedule": "schedule",
                "network.compress.kind": "compress"}
ALIASES = {"rank": "lora.rank", "topology": "topology.name", "partition": "data.partition",
           "lr": "optim.lr", "T": "rounds", "link_failure": "network.link_failure",
           "participation": "network.participation", "schedule": "network.schedule",
           "compress": "network.compress.kind"}

STATUS_FLAGS = {"diverged": " (diverged)", "interrupted": " (interrupted)",
                NO_SUMMARY: " (incomplete)"}
"""What a legend adds to a run that did not complete: drawn, but not a finished result (a run
without a summary is still running or was killed)."""

# Colours that stay with an algorithm across figures.
_ALGO_COLOURS = {"decaf": "C3", "dlora": "C0", "dlora_fa": "C2", "fedavg": "C1",
                 "fedavg_fa": "C4", "local": "C7", "local_fa": "C5", "centralized": "k",
                 "fedsa": "C6", "alternating": "C8", "hetlora": "C9", "fedex": "navy",
                 "flora": "darkgoldenrod"}


def resolve(column: str) -> str:
    """Short names (``rank``, ``topology``, ``partition``, ``lr``, ``T``) to config columns."""
    return ALIASES.get(column, column)


def sort_key(value: Any) -> tuple:
    """Numbers first (by value), then strings, then missing values: a mixed column sorts."""
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
        return known + sorted((v for v in values if v not in ALGORITHM_ORDER), key=sort_key)
    if column == "data.partition":
        known = [p for p in PARTITION_ORDER if p in values]
        return known + sorted((v for v in values if v not in PARTITION_ORDER), key=sort_key)
    return sorted(values, key=sort_key)


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


def status_flag(status: Any) -> str:
    """`` (interrupted)``, `` (diverged)``, `` (incomplete)``, or '' for a completed run."""
    return STATUS_FLAGS.get(status, "")


def colour(algorithm: Any) -> str | None:
    """The matplotlib colour of ``algorithm`` (None: let the axes cycle choose)."""
    return _ALGO_COLOURS.get(algorithm)


def is_fraction_metric(metric: str) -> bool:
    """Accuracy, F1 and rates are recorded in [0, 1] and shown in percent."""
    return metric.endswith(("accuracy", "f1", "_rate"))


def metric_label(metric: str) -> str:
    """An axis label for ``metric`` (with ``(%)`` for the fraction metrics)."""
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
