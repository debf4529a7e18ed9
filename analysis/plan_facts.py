"""What a run's config implies that its metrics do not hold, got by re-running the run's setup.

The metrics hold rounds and steps but not how much data each agent had, nor which labels. Two
views need that: the epoch axis (``x="epoch"`` of the curve figures: steps x batch size / shard
size) and ``label_distribution`` (each agent's label counts). For them ``plan_facts`` loads the
run's ``config.json`` and calls ``decaf_ray.plan.prepare`` on it again, which:

- builds the topology and its mixing matrix;
- builds the task with ``decaf_ray.tasks.build_task``: a synthetic task redraws its data from the
  seed; a CLIP task reads its dataset's labels and file lists under ``task.root`` (torchvision
  datasets download there when ``task.download`` and they are missing) and takes a
  ``pretrain:`` stand-in from the stand-in cache (a ConfigError if it is not cached); a causal-LM
  task reads its train/test files or hub dataset and the model's config (no weights);
- draws the few-shot pool and the partition from the seed.

It loads no model weights and trains nothing, but it needs what the run needed to build its
task: the same datasets at the same paths (or a network to fetch them), the stand-in cache, and
the task's libraries (open_clip, transformers). A results folder copied to a machine without them
still gives every other figure and table (those read only the saved files), but not these two;
there ``prepare``'s ConfigError names the missing piece (``task.root``, ``task.checkpoint``...).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

X_LABELS = {"round": "round (communication)", "step": "step (local gradient steps)",
            "epoch": "epoch"}
"""The x axes a curve can have; only ``epoch`` needs ``plan_facts``."""


@lru_cache(maxsize=256)
def plan_facts(run_dir: str) -> dict[str, Any]:
    """Each agent's label histogram (``histogram``, shape (agents, classes)), shard sizes
    (``shard_sizes``) and ``batch_size``, from ``decaf_ray.plan.prepare`` on the run's saved
    config (see the module docstring for what that builds and needs). Cached per run
    directory."""
    from decaf_ray.partition import label_histogram
    from decaf_ray.plan import prepare
    from decaf_ray.results import load_run_config

    plan = prepare(load_run_config(run_dir))
    labels = np.asarray(plan.task.train_labels)
    hist = label_histogram(labels, plan.shards, plan.task.num_classes)
    return {"histogram": hist, "shard_sizes": [len(s) for s in plan.shards],
            "batch_size": plan.config.data.batch_size}


def epochs_of(stats: pd.DataFrame) -> pd.Series:
    """x = epochs over each agent's shard: step * batch_size / (mean shard size), per run of
    ``agent_stats`` rows; calls ``plan_facts`` (and so ``prepare``) once per run."""
    out = pd.Series(np.nan, index=stats.index, dtype=float)
    for run, idx in stats.groupby("run").groups.items():
        facts = plan_facts(str(run))
        per_step = facts["batch_size"] / max(float(np.mean(facts["shard_sizes"])), 1.0)
        out.loc[idx] = stats.loc[idx, "step"].astype(float) * per_step
    return out


def x_mapper(x: str) -> Callable[[pd.DataFrame], pd.Series] | None:
    """``epochs_of`` for the epoch axis (which re-runs each run's setup, see above); None for
    ``round`` and ``step``, which the metrics hold."""
    if x not in X_LABELS:
        raise ValueError(f"x must be one of {', '.join(X_LABELS)}, not {x!r}")
    return epochs_of if x == "epoch" else None
