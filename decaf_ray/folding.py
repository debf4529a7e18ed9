"""Server algorithms that fold into the frozen base weights, FedEx-LoRA and FLoRA: pure
functions from the clients' published factors to the adapter every client receives and the base
delta every client adds to its frozen weight W0 (``BaseDelta``, in weight units: s times a
product). No Ray, no I/O.

* FedEx-LoRA (Singhal et al., "Exact Aggregation for Federated and Efficient Fine-Tuning of
  Foundation Models", arXiv 2411.09432): the server averages A and B as FedAvg does,
  A' = sum_j p_j A_j and B' = sum_j p_j B_j, and sends the residual
  R = sum_j p_j B_j A_j - B' A' (d x k per module) with them; each client folds s R into W0, so
  that W0 + s R + s B' A' = sum_j p_j (W0 + s B_j A_j), the exact average of the clients'
  weights, which FedAvg's A' and B' miss by s R. A' and B' are FedAvg's, bit for bit.
* FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
  Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976): the clients' factors stacked along
  the rank dimension, B_s = [p_1 B_1, ..., p_N B_N] (d, sum_j r_j) and A_s = [A_1; ...; A_N]
  (sum_j r_j, k), multiply to sum_j p_j B_j A_j exactly, whatever the clients' ranks. The
  server sends the stacked factors; each client folds s B_s A_s into W0 and starts a new
  adapter: A a fresh Gaussian from a seed of (experiment seed, round), the same for every
  client (so the stack's A_j stay nested across ranks), and B = 0.

Why only on a server. Every agent of a server algorithm receives the same message, so every
agent folds the same delta into its copy of the base: the bases stay one W0 + S for the whole
run, and each host holds S once (``agents.AgentGroup``). Gossiped over a graph, agent i would
fold its own residual sum_j pi_ij B_j A_j - B_i' A_i' into its own base; bases are never mixed
again, so they would drift apart for good, and the agents would no longer share a foundation
model (consensus on the adapters would then say nothing about the models). ``algorithms.register``
refuses a fold over anything but the server's Pi.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from decaf_ray import consensus
from decaf_ray.factors import Factors, init_factors, rank_of, shape_groups, stack

BaseDelta = dict[str, Tensor]
"""module name -> (d, k) float32: what the frozen weight W0 of the module gains."""
FoldFn = Callable[[list[Factors], Tensor, float, "float | None", int], tuple[Factors, BaseDelta]]


@dataclass(frozen=True)
class Fold:
    """How a server algorithm folds into the base weights."""

    fn: FoldFn
    """(payloads (m adapters), weights (m,) p_j, scale s, init_std of a fresh A, seed) ->
    (the adapter every agent receives, at the payloads' largest rank; the base delta)."""
    broadcast: Callable[[Mapping[str, tuple[int, int]], Sequence[int]], float]
    """Floats in the server's one broadcast, given the module shapes and every agent's rank."""
    fresh: bool = False
    """Every agent receives a new adapter (FLoRA), not a mix of the old ones: a gradient taken
    at the old factors means nothing for it, so the round's last step is taken before the
    agent publishes (the clients send what they trained, as in the paper), and the optimizer
    state starts anew with the adapter."""


def stacked(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor
            ) -> tuple[Tensor, Tensor]:
    """FLoRA's stack of m clients' factors along the rank dimension.

    Args:
        As: m tensors (*b, r_j, k). Bs: m tensors (*b, d, r_j); the r_j may differ.
        weights: (m,).
    Returns:
        B_s = [w_1 B_1, ..., w_m B_m] (*b, d, sum r_j) and A_s = [A_1; ...; A_m]
        (*b, sum r_j, k), in the compute dtype (float32 for half inputs), so that
        B_s A_s = sum_j w_j B_j A_j.
    """
    ct = consensus.compute_dtype(As[0].dtype)
    w = weights.to(As[0].device, ct)
    return (torch.cat([w[j] * b.to(ct) for j, b in enumerate(Bs)], -1),
            torch.cat([a.to(ct) for a in As], -2))


def stacked_product(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """sum_j w_j B_j A_j (*b, d, k), as one product of the ``stacked`` factors (never m
    products of d x k), in the inputs' dtype."""
    B, A = stacked(As, Bs, weights)
    return (B @ A).to(As[0].dtype)


def fedex_aggregate(As: Tensor, Bs: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FedEx-LoRA's aggregate of m clients: A' = sum_j w_j A_j, B' = sum_j w_j B_j (FedAvg's,
    ``consensus.dlora_mix``) and the residual R = sum_j w_j B_j A_j - B' A'.

    Args:
        As: (m, *b, r, k). Bs: (m, *b, d, r). weights: (m,).
    Returns:
        A' (*b, r, k), B' (*b, d, r), R (*b, d, k).
    """
    A, B = consensus.dlora_mix(As, Bs, weights)
    return A, B, stacked_product(list(As), list(Bs), weights) - B @ A


def fedex(payloads: list[Factors], weights: Tensor, scale: float, init_std: float | None,
          seed: int) -> tuple[Factors, BaseDelta]:
    """FedEx-LoRA's fold: every agent gets (A', B'), every base gains s R (``fedex_aggregate``;
    modules of equal shape in one batched call). ``init_std`` and ``seed`` are not read."""
    out: Factors = {}
    delta: BaseDelta = {}
    for names in shape_groups(payloads[0]).values():
        A, B, R = fedex_aggregate(*stack(payloads, names), weights)
        for i, n in enumerate(names):
            out[n], delta[n] = (A[i], B[i]), scale * R[i]
    return out, delta


def flora(payloads: list[Factors], weights: Tensor, scale: float, init_std: float | None,
          seed: int) -> tuple[Factors, BaseDelta]:
    """FLoRA's fold: every base gains s B_s A_s = s sum_j w_j B_j A_j (``stacked_product``;
    payloads of any ranks), and every agent gets a fresh adapter at the payloads' largest rank,
    A ~ N(0, init_std^2) from ``seed`` (``factors.init_factors``), B = 0; an agent of a smaller
    rank takes its first rows (``factors.truncated``)."""
    delta: BaseDelta = {}
    for names in shape_groups(payloads[0]).values():
        per = [stack([p], names) for p in payloads]  # m x ((1, L, r_j, k), (1, L, d, r_j))
        P = stacked_product([a[0] for a, _ in per], [b[0] for _, b in per], weights)
        for i, n in enumerate(names):
            delta[n] = scale * P[i]
    shapes = {n: (b.shape[0], a.shape[1]) for n, (a, b) in payloads[0].items()}
    top = max(rank_of(p) for p in payloads)
    fresh = init_factors(shapes, top, torch.Generator().manual_seed(seed), init_std)
    return fresh, delta


def fedex_broadcast(shapes: Mapping[str, tuple[int, int]], ranks: Sequence[int]) -> float:
    """A', B' and the residual: sum over modules of (d + k) r + d k."""
    return float(sum((d + k) * ranks[0] + d * k for d, k in shapes.values()))


def flora_broadcast(shapes: Mapping[str, tuple[int, int]], ranks: Sequence[int]) -> float:
    """The stacked factors of every agent: sum over modules of (d + k) sum_j r_j, N r (d + k)
    for equal ranks (the fresh A comes from a seed the clients share: no floats)."""
    return float(sum((d + k) * sum(ranks) for d, k in shapes.values()))


FEDEX = Fold(fedex, fedex_broadcast)
FLORA = Fold(flora, flora_broadcast, fresh=True)
