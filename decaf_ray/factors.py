"""LoRA factors: the (A, B) pairs that agents train and exchange.

An adapter is a plain dict, ``Factors = {module_name: (A, B)}`` with ``A`` of shape (r, k) and
``B`` of shape (d, r), so that the module's weight is ``W0 + s * B @ A`` (paper, Eq. 1). Keeping it
a plain mapping of tensors (a pytree, as in optax) lets the core, the optimizers and both runtimes
pass it around without knowing which model it came from.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from decaf_ray.consensus import pad_rank

Factors = dict[str, tuple[Tensor, Tensor]]
"""module name -> (A (r, k), B (d, r))."""

Grads = dict[str, tuple["Tensor | None", Tensor]]
"""module name -> (grad A (r, k) or None when A is frozen, grad B (d, r))."""


def init_factors(
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    generator: torch.Generator,
    std: float | None = None,
) -> Factors:
    """The paper's LoRA initialisation: A ~ N(0, std^2) entrywise, B = 0.

    Args:
        shapes: module name -> (d, k) of its frozen weight W0 (d, k).
        rank: r.
        generator: seeds A; the same generator state gives every agent the same A.
        std: standard deviation of A; ``None`` uses 1/sqrt(3k), the standard deviation of
            peft's default Kaiming-uniform init, so a Gaussian A has the same scale.
    Returns:
        Factors with A (r, k) float32 and B (d, r) zeros.
    """
    out: Factors = {}
    for name, (d, k) in shapes.items():
        s = std if std is not None else 1.0 / math.sqrt(3.0 * k)
        a = torch.randn(rank, k, generator=generator, dtype=torch.float32) * s
        out[name] = (a, torch.zeros(d, rank, dtype=torch.float32))
    return out


def shape_groups(factors: Factors) -> dict[tuple[int, int, int], list[str]]:
    """Module names grouped by (d, k, r), in insertion order, so equal shapes can be batched."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name, (a, b) in factors.items():
        groups.setdefault((b.shape[0], a.shape[1], a.shape[0]), []).append(name)
    return groups


def stack(adapters: list[Factors], names: list[str]) -> tuple[Tensor, Tensor]:
    """Stack the named modules of m adapters.

    Returns:
        As (m, L, r, k) and Bs (m, L, d, r) for L = len(names); every module must share a shape.
    """
    As = torch.stack([torch.stack([f[n][0] for n in names]) for f in adapters])
    Bs = torch.stack([torch.stack([f[n][1] for n in names]) for f in adapters])
    return As, Bs


def rank_of(factors: Factors) -> int:
    """An adapter's rank r (every module of one agent has the same), read from its first A."""
    return next(iter(factors.values()))[0].shape[0]


def truncated(factors: Factors, rank: int) -> Factors:
    """The first ``rank`` rows of each A and columns of each B: an agent of rank ``rank``
    cut from a shared larger initialisation, so the agents' A_0 are nested."""
    return {n: (a[:rank].clone(), b[:, :rank].clone()) for n, (a, b) in factors.items()}


def padded(adapters: list[Factors]) -> list[Factors]:
    """Adapters of different ranks zero-padded to the largest (each B A unchanged), so they can
    be stacked and averaged as HetLoRA does; the same list when all ranks are equal."""
    top = max(rank_of(f) for f in adapters)
    if all(rank_of(f) == top for f in adapters):
        return adapters
    return [{n: pad_rank(a, b, top) for n, (a, b) in f.items()} for f in adapters]


def param_count(shapes: Mapping[str, tuple[int, int]], rank: int, train_A: bool = True) -> int:
    """Trainable parameters of one adapter: sum of (d + k) r, or d r when A is frozen."""
    return sum(((k if train_A else 0) + d) * rank for d, k in shapes.values())


def mean(adapters: list[Factors]) -> Factors:
    """The network average (mean A, mean B) per module: the v-bar of Theorem 1."""
    names = list(adapters[0])
    return {n: (torch.stack([f[n][0] for f in adapters]).mean(0),
                torch.stack([f[n][1] for f in adapters]).mean(0)) for n in names}


def clone(factors: Factors) -> Factors:
    """A deep copy, so a published adapter cannot be changed by the agent's next step."""
    return {n: (a.clone(), b.clone()) for n, (a, b) in factors.items()}
