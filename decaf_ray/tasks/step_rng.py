"""One task step's inputs: its indices (``step_indices``) and its randomness (``step_rng``),
seeded by the step's own seed, on the task's device.

A step (one agent's gradient at one step) draws augmentation from torch's CPU generator and
dropout from the generator of the device its tensors live on. ``step_rng(seed, device)`` seeds
exactly those, and only for the step: the caller's generators are restored afterwards, so a
step's numbers depend on its seed alone, not on what ran (or loaded a model) before it, and a
step never disturbs its caller's randomness.

Seeded work outside steps uses it too (a CLIP model's random init, a stand-in's pretraining): the
same seed, the same numbers, and the caller's generators untouched.

On the CPU the stream is the one ``torch.random.default_generator.manual_seed(seed)`` starts,
which is what the runtime set before each step when tasks still read the global generator: the
CPU numbers are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import numpy as np
import torch


def step_indices(indices: Any, call: str = "loss_and_grads") -> np.ndarray:
    """A step's training indices as a flat int64 array; none at all is the caller's bug."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"{call} needs at least one index")
    return idx


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def step_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside: torch's CPU generator and, for a CUDA ``device``, that device's generator, both
    seeded with ``seed`` (a 64-bit int; None: left as they are, only restored afterwards);
    outside, every generator is as it was before.

    Not ``torch.manual_seed``: that seeds every CUDA device (and queues a seed even where CUDA is
    not initialised), which costs milliseconds per call and touches GPUs this task does not use.
    """
    cuda = [_cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        yield


def seeded_step(inner: Callable) -> Callable:
    """A task's public ``loss_and_grads(factors, indices, train_A, seed)`` made from its
    ``inner(self, factors, idx, train_A)``: the indices checked (``step_indices``), the model
    made (``self.materialize()``), and ``inner`` run under ``step_rng(seed, self.device)``.
    What every task with a lazily made model on a device does around its step."""

    @functools.wraps(inner)
    def loss_and_grads(self, factors, indices, train_A: bool, seed: int):
        idx = step_indices(indices)
        self.materialize()
        with step_rng(seed, self.device):
            return inner(self, factors, idx, train_A)

    return loss_and_grads
