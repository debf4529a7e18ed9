"""Tasks: a task owns the frozen model, the data, the loss and the evaluation.

A task is built from its config by every host that needs it (so hosts load their own data), and
exposes only what the algorithms need: the shapes of the adapted weights, the labels the
partitioners split, and a loss-and-gradient call on an adapter and a list of training indices.
Adding a model is one module here with a config dataclass and a ``build`` function, plus one row in
``TASKS``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from decaf_ray.factors import Factors, Grads


class Task(Protocol):
    """The contract every task meets. Shapes: A (r, k), B (d, r) per adapted module."""

    num_classes: int | None
    train_labels: np.ndarray
    """(n_train,) int labels (a class or a cluster), what the partitioners split."""

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Adapted module name -> (d, k) of its frozen weight, in a fixed order."""
        ...

    def loss_and_grads(self, factors: Factors, indices: np.ndarray, train_A: bool, seed: int
                       ) -> tuple[float, Grads]:
        """Mean training loss on ``indices`` at ``factors`` and its gradient per factor.

        The gradient of A is None when ``train_A`` is False (the FA variants). Everything the
        step draws (augmentation, dropout, sampling) comes from ``seed`` (63-bit), seeded by the
        task itself after its model is loaded and on its own device (``tasks.step_rng``): the
        same call gives the same numbers whatever ran or loaded before it, and the caller's
        random generators are left as they were.
        """
        ...

    def evaluate(self, factors: Factors) -> dict[str, float]:
        """Test metrics of one adapter, e.g. ``{"test_loss": ..., "test_accuracy": ...}``."""
        ...

    # Optional: ``load()``, make the model now (idempotent, changes no number): runtimes call it
    # once at setup (``getattr(task, "load", None)``) so load time is measured on its own;
    # without it, or before it, the model loads on first use.
    # Optional: ``loss_and_grads_many(factors, indices, train_A, seeds)``, ``loss_and_grads`` of
    # several agents in one pass (``runtime.batch_agents``), agent k's draws from ``seeds[k]``
    # as its own ``loss_and_grads`` would; see ``CLIPTask``.
    # Optional: ``loss_weight(indices) -> float``, what the loss on ``indices`` is a mean over
    # (the causal LM: answer tokens). Without it, the number of examples. Data-parallel
    # workers weight their chunks by it so that their sum is the batch's loss exactly.
    # Optional: ``set_base_delta(delta)``, the frozen weights of the adapted modules become
    # W0 + delta[name] ((d, k) float32 on the CPU; None: W0 again), set from W0 and never
    # added in place, so equal deltas give equal weights whatever came before: what the server
    # algorithms that fold into the base (FedEx-LoRA, FLoRA; ``decaf_ray.folding``) need.
    # Every task kind has it; results remembered per adapter are forgotten by it.


# kind -> "module:ConfigClass"; modules are imported only when their kind is used, so a
# synthetic run never imports open_clip or transformers.
TASKS: dict[str, str] = {
    "synthetic": "decaf_ray.tasks.synthetic:SyntheticConfig",
    "clip": "decaf_ray.tasks.clip:CLIPConfig",
    "causal_lm": "decaf_ray.tasks.causal_lm:CausalLMConfig",
    "instruct": "decaf_ray.tasks.instruct:InstructConfig",
}


def task_config_class(kind: str) -> type:
    """The config dataclass of a task kind (raises KeyError for an unknown kind)."""
    module, cls = TASKS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(task_cfg: Any, lora_cfg: Any, seed: int) -> Task:
    """Build the task named by ``task_cfg.kind``: its module's ``build(task_cfg, lora_cfg, seed)``."""
    module = importlib.import_module(TASKS[task_cfg.kind].split(":")[0])
    return module.build(task_cfg, lora_cfg, seed)
