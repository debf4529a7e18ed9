"""Network-level metrics over all agents' adapters: pure functions, no d x k matrix formed."""

from __future__ import annotations

import numpy as np
import torch

from decaf_ray.factors import Factors, Grads, shape_groups, stack


def consensus_distance(adapters: list[Factors], scale: float = 1.0) -> float:
    """(1/N) sum_i ||s B_i A_i - (1/N) sum_j s B_j A_j||_F^2, summed over modules.

    The distance between the agents' weight updates, the quantity consensus drives to zero.
    Computed from the N x N matrix of inner products <B_i A_i, B_j A_j> = sum((B_i^T B_j) *
    (A_i A_j^T)) in float64, O(N^2 (d + k) r^2) per module.
    """
    n, total = len(adapters), 0.0
    for names in shape_groups(adapters[0]).values():
        As, Bs = stack(adapters, names)                      # (N, L, r, k), (N, L, d, r)
        As, Bs = As.double(), Bs.double()
        gb = torch.einsum("ildr,jlds->lijrs", Bs, Bs)        # B_i^T B_j per module
        ga = torch.einsum("ilrk,jlsk->lijrs", As, As)        # A_i A_j^T per module
        gram = (gb * ga).sum((-1, -2))                       # (L, N, N)
        total += float((gram.diagonal(dim1=1, dim2=2).sum(-1) - gram.sum((1, 2)) / n).sum())
    return max(total, 0.0) * scale ** 2 / n


def param_distance(adapters: list[Factors]) -> float:
    """(1/N) sum_i ||v_i - v-bar||^2 over the stacked factors v = (A, B) (Theorem 1's v)."""
    n, total = len(adapters), 0.0
    for name in adapters[0]:
        for part in (0, 1):
            x = torch.stack([f[name][part] for f in adapters]).double()
            total += float(((x - x.mean(0)) ** 2).sum())
    return total / n


def grad_norm_sq(grads: list[Grads]) -> float:
    """||(1/N) sum_i g_i||^2 over every trained factor: ||grad f(v-bar)||^2 when each g_i is
    agent i's full-shard gradient at the network average v-bar (Theorem 1, Corollary 1)."""
    n, total = len(grads), 0.0
    for name in grads[0]:
        for part in (0, 1):
            if grads[0][name][part] is None:
                continue
            total += float((torch.stack([g[name][part] for g in grads]).double().sum(0) / n
                            ).pow(2).sum())
    return total


def means(per_agent: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean over agents of every metric any agent reported."""
    keys = sorted({k for m in per_agent.values() for k in m})
    return {k: float(np.mean([m[k] for m in per_agent.values() if k in m])) for k in keys}
