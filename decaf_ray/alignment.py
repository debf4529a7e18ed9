"""Fitting DeCAF's re-factorized factors to an agent's own (``consensus.split``: ``aligned``
and ``conserved``), and rotating optimizer state with them (``consensus.state: rotate``).

A TSVD returns the mixed product's factors in a basis of its own; per-coordinate optimizer state
(Adam's moments) and the factors' imbalance ||B||^2 - ||A||^2 belong to the agent's previous
basis. These functions change the factorization, never the product B A. Pure: tensors in,
tensors out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from decaf_ray.consensus import compute_dtype


def procrustes(X: Tensor, Y: Tensor) -> Tensor:
    """The orthogonal R (*b, r, r) minimising ||X R - Y||_F for X, Y (*b, n, r).

    R = U V^T from the SVD U S V^T of X^T Y (Schonemann, 1966).
    """
    dtype = compute_dtype(X.dtype)
    U, _, Vh = torch.linalg.svd(X.mT.to(dtype) @ Y.to(dtype))
    return (U @ Vh).to(X.dtype)


def stacked(A: Tensor, B: Tensor) -> Tensor:
    """[B; A^T] (*b, d + k, r): both factors move together under B -> B R, A -> R^T A."""
    return torch.cat([B, A.mT], dim=-2)


def align(A: Tensor, B: Tensor, A_ref: Tensor, B_ref: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate a factorization onto a reference without changing its product.

    With R = procrustes([B; A^T], [B_ref; A_ref^T]), returns (R^T A, B R): B A is unchanged
    (R R^T = I), and the factors are as close as an orthogonal change of basis allows to the
    reference, so per-coordinate optimizer state (Adam's moments) keeps its meaning across a
    re-factorization. Both factors enter the fit so it stays defined while B is still near zero.
    Shapes: A, A_ref (*b, r, k); B, B_ref (*b, d, r).
    """
    R = procrustes(stacked(A, B), stacked(A_ref, B_ref))
    return R.mT @ A, B @ R


def conserve_imbalance(A: Tensor, B: Tensor, A_ref: Tensor, B_ref: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """Rescale a balanced factorization to the reference's imbalance, same product.

    Gradient flow on a loss of B A conserves B^T B - A A^T, so a LoRA adapter trained from B = 0
    keeps ||B||^2 - ||A||^2 near -||A_0||^2: its product moves at a rate set by ||A||^2, not by
    the product's own size. A balanced split sets that difference to 0 at every mix. Here a
    scalar c per module gives (A / c, c B) with ||c B||^2 - ||A / c||^2 equal to the reference's
    ||B_ref||^2 - ||A_ref||^2 = delta: with s = ||B||^2 = ||A||^2 (balanced),
    c^2 = (t + sqrt(t^2 + 4)) / 2 = 2 / (sqrt(t^2 + 4) - t) with t = delta / s; c = 1 where s = 0.
    Shapes: A, A_ref (*b, r, k); B, B_ref (*b, d, r).
    """
    dtype = compute_dtype(A.dtype)

    def sq(X: Tensor) -> Tensor:  # squared Frobenius norm per module, (*b)
        return X.to(dtype).square().sum(dim=(-2, -1))

    delta = sq(B_ref) - sq(A_ref)
    s = 0.5 * (sq(A) + sq(B))
    # In t = delta / s, free of s^2 (which under- or overflows in float32) and, with one form
    # per sign of t, of cancellation (early on ||A||^2 >> ||B A||: t << 0).
    t = delta / torch.where(s > 0, s, torch.ones_like(s))
    root = torch.sqrt(t.square() + 4)
    c2 = torch.where(t >= 0, (t + root) / 2, 2 / (root - t))
    c = torch.where(s > 0, c2.sqrt(), torch.ones_like(s))[..., None, None]
    return (A / c).to(A.dtype), (B * c).to(B.dtype)
