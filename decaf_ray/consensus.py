"""Consensus steps of DLoRA, DLoRA-FA, DeCAF and the one-factor mixes; the paper's errors.

Agent i mixes the LoRA factors of its neighbours j in Nb(i) with the weights pi_ij of its row of
the mixing matrix Pi. Throughout, the first dim of ``As`` (m, *b, r, k) and ``Bs`` (m, *b, d, r)
indexes the m neighbours (self included), ``*b`` are optional batch dims (many LoRA modules of one
shape mixed in one call) and ``weights`` is (m,); ``decaf_mix`` also takes (m, *wb), one weight
row per entry of leading batch dims wb (many agents' mixes in one call).

* DLoRA (Algorithm 1, lines 6-8) mixes each factor on its own:
  A = sum_j pi_ij A_j,  B = sum_j pi_ij B_j.
* DLoRA-FA (Algorithm 2) freezes a shared A and mixes only B; FedSA-LoRA mixes only A and
  keeps B local; ``alternating`` mixes one factor a round (``factor_mix``).
* DeCAF (Algorithm 1, lines 10-11) mixes the product M = sum_j pi_ij B_j A_j and re-factorizes
  its rank-r truncated SVD T(M) = U_r S_r V_r^T.

``decaf_mix`` never forms the d x k matrix M. It writes M = P Q^T with the thin factors
P = [pi_i1 B_1 ... pi_im B_m] (d, mr) and Q = [A_1^T ... A_m^T] (k, mr); two thin QRs and the SVD of
a core of at most mr x mr give the SVD of M in O((d + k)(mr)^2) time and O((d + k) mr) memory,
instead of O(dk min(d, k)) time and O(dk) memory for the dense SVD (``decaf_mix_dense``). (The
weights pi_ij are applied to the small R factor of P rather than to P itself.) ``interference`` and
``tsvd_error`` take Frobenius norms of such low-rank differences the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = ("balanced", "left", "aligned", "conserved")
"""How DeCAF splits T(M) = U_r S_r V_r^T into (A, B): ``balanced`` (the paper) gives
B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T; ``left`` gives B = U_r S_r, A = V_r^T; ``aligned`` is
balanced here, then rotated per agent onto its previous factors with ``align`` (same product);
``conserved`` is aligned, then rescaled per agent with ``conserve_imbalance`` (same product).
``balanced`` and ``left`` fix each singular pair's sign (largest-magnitude entry of u_i
positive; decaf-ray's convention, the paper does not say), so their factors do not depend on
the SVD routine's sign choice."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a mix computes in: float32 for half precision, else ``dtype``."""
    # LAPACK has no half-precision QR/SVD, and half precision would drown the small singular values.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check(As: Tensor, Bs: Tensor, weights: Tensor, batched_weights: bool = False) -> None:
    """Raise ValueError unless As (m, *b, r, k), Bs (m, *b, d, r) and weights (m,) fit together;
    with ``batched_weights``, weights may also be (m, *wb) for a leading part wb of *b."""
    if As.ndim < 3 or Bs.ndim != As.ndim:
        raise ValueError(f"As (m, *b, r, k) and Bs (m, *b, d, r) expected, got "
                         f"{tuple(As.shape)} and {tuple(Bs.shape)}")
    m = As.shape[0]
    wb = tuple(weights.shape[1:]) if batched_weights else ()
    if (m == 0 or Bs.shape[0] != m or tuple(weights.shape) != (m, *wb)
            or len(wb) > As.ndim - 3 or wb != tuple(As.shape[1:1 + len(wb)])):
        want = "(m,) or (m, *b[:j])" if batched_weights else "(m,)"
        raise ValueError(f"need m >= 1 neighbours with As, Bs and weights {want} agreeing, got "
                         f"{tuple(As.shape)}, {tuple(Bs.shape)}, {tuple(weights.shape)}")
    if As.shape[1:-2] != Bs.shape[1:-2] or As.shape[-2] != Bs.shape[-1]:
        raise ValueError(f"As {tuple(As.shape)} and Bs {tuple(Bs.shape)} disagree on *b or r")


def _weighted_sum(Xs: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_j w_j X_j over the leading dim, in ``dtype``: Xs (m, *s) -> (*s)."""
    return torch.tensordot(weights.to(Xs.device, dtype), Xs.to(dtype), dims=1)


def _thin_factors(As: Tensor, Bs: Tensor, weights: Tensor,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The factors of M = sum_j w_j B_j A_j = P diag(c) Q^T, in ``dtype``.

    Returns:
        P = [B_1 ... B_m] (*b, d, mr), Q = [A_1^T ... A_m^T] (*b, k, mr) and the column weights
        c = (w_1 1_r, ..., w_m 1_r): (mr,) for weights (m,); for weights (m, *wb) it is shaped
        (*wb, 1, ..., 1, mr) to broadcast over a (*b, ., mr) matrix. The weights stay out of P so
        they scale the small R factor of P's QR instead of a (d, mr) copy.
    """
    m, r, k, d = As.shape[0], As.shape[-2], As.shape[-1], Bs.shape[-2]
    # Built as transposes of contiguous (*b, mr, .) tensors, i.e. column-major, the layout
    # LAPACK's QR works in, which saves it a transposing copy.
    Pt = torch.movedim(Bs.to(dtype).mT, 0, -3).reshape(*Bs.shape[1:-2], m * r, d)
    Qt = torch.movedim(As.to(dtype), 0, -3).reshape(*As.shape[1:-2], m * r, k)
    return Pt.mT, Qt.mT, _column_weights(weights, r, Bs.ndim - 1, Bs.device, dtype)


def _column_weights(weights: Tensor, repeats: int | Tensor, ndim: int, device, dtype) -> Tensor:
    """Each neighbour's weight repeated over its r_j columns of P: (n,) for weights (m,);
    for weights (m, *wb), (*wb, 1, ..., 1, n), broadcasting over (*b, ., n) of ``ndim`` dims."""
    c = torch.movedim(weights.to(device, dtype), 0, -1).repeat_interleave(repeats, dim=-1)
    if weights.ndim > 1:  # (*wb, n) -> (*wb, 1 per remaining batch dim, 1 for the row, n)
        c = c.reshape(*c.shape[:-1], *[1] * (ndim - c.ndim), c.shape[-1])
    return c


def _ragged_thin_factors(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor,
                         dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``_thin_factors`` of neighbours of different ranks, As[j] (*b, r_j, k) and Bs[j]
    (*b, d, r_j): P (*b, d, R), Q (*b, k, R) and c for R = sum_j r_j columns."""
    repeats = torch.tensor([a.shape[-2] for a in As], device=Bs[0].device)
    Pt = torch.cat([b.to(dtype).mT for b in Bs], dim=-2)
    Qt = torch.cat([a.to(dtype) for a in As], dim=-2)
    return Pt.mT, Qt.mT, _column_weights(weights, repeats, Bs[0].ndim, Bs[0].device, dtype)


def _lowrank_svd(P: Tensor, Q: Tensor, c: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of P diag(c) Q^T without forming it: P (*b, d, n), Q (*b, k, n), c (n,)
    or broadcastable to (*b, 1, n).

    With P = Q_P R_P, Q = Q_Q R_Q (reduced QR), P diag(c) Q^T = Q_P (R_P diag(c) R_Q^T) Q_Q^T and
    Q_P, Q_Q have orthonormal columns, so the SVD of the core C = R_P diag(c) R_Q^T
    (min(d, n) x min(k, n)) gives that of the product.

    Returns:
        U (*b, d, s), S (*b, s), Vh (*b, s, k) with s = min(rank, d, k, n), S descending.
    """
    Qp, Rp = torch.linalg.qr(P)
    Qq, Rq = torch.linalg.qr(Q)
    Uc, S, Vhc = torch.linalg.svd((Rp * c) @ Rq.mT, full_matrices=False)
    # Truncate before lifting back, so the (d, k)-sized products only carry `rank` columns.
    return Qp @ Uc[..., :rank], S[..., :rank], Vhc[..., :rank, :] @ Qq.mT


def _lowrank_fro(U: Tensor, V: Tensor, c: Tensor) -> Tensor:
    """||U diag(c) V^T||_F for U (*b, d, n), V (*b, k, n), c (n,), in O((d + k) n^2), no d x k.

    It equals ||R_U diag(c) R_V^T||_F since the Q factors have orthonormal columns. Unlike
    sqrt(tr(...)) of Gram matrices, no large terms cancel, so a zero difference stays at rounding level.
    """
    Ru = torch.linalg.qr(U, mode="r").R
    Rv = torch.linalg.qr(V, mode="r").R
    return torch.linalg.matrix_norm((Ru * c) @ Rv.mT)


def _fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair (u_i, v_i) so the largest-magnitude entry of u_i is positive.

    An SVD fixes each pair only up to a joint sign, and LAPACK builds choose differently; B A is
    the same either way, but the next gradient step (taken in the new basis) is not. This is
    decaf-ray's convention, not the paper's (which does not say). Ties go to the first entry
    (argmax's rule); an all-zero u_i is left as it is. U (*b, d, s), Vh (*b, s, k).
    """
    pivot = U.gather(-2, U.abs().argmax(dim=-2, keepdim=True))  # (*b, 1, s)
    sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
    return U * sign, Vh * sign.mT


def _split(U: Tensor, S: Tensor, Vh: Tensor, rank: int, split: str) -> tuple[Tensor, Tensor]:
    """T(M) = U_r S_r V_r^T -> (A (*b, rank, k), B (*b, d, rank)) as ``split`` says.

    For ``balanced`` and ``left`` the singular pairs first get ``_fix_signs``'s convention, so
    the factors do not depend on the SVD routine's sign choice. ``aligned`` and ``conserved``
    skip it: their per-agent fit to the previous factors already removes the sign ambiguity.
    When M has fewer than ``rank`` singular values the missing directions carry S = 0: they are
    padded with zero columns of B and zero rows of A, so the shapes never depend on the data.
    """
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    if split in ("balanced", "left"):
        U, Vh = _fix_signs(U, Vh)
    pad = rank - S.shape[-1]
    if pad > 0:
        U, S, Vh = F.pad(U, (0, pad)), F.pad(S, (0, pad)), F.pad(Vh, (0, 0, 0, pad))
    if split != "left":  # aligned, conserved: balanced here, then per agent
        root = S.sqrt()
        return root.unsqueeze(-1) * Vh, U * root.unsqueeze(-2)
    return Vh, U * S.unsqueeze(-2)


def _prepare(As: Tensor, Bs: Tensor, weights: Tensor, rank: int | None, split: str) -> int:
    """Validate DeCAF's inputs; returns the target rank (r when ``rank`` is None)."""
    _check(As, Bs, weights, batched_weights=True)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    rank = As.shape[-2] if rank is None else int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank


def _check_ranks(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor) -> None:
    """Raise ValueError unless As[j] (*b, r_j, k), Bs[j] (*b, d, r_j) (m of each) and weights
    (m, *wb) fit together: ``_check`` per neighbour, and *b, d, k shared by all."""
    if not len(As) == len(Bs) == weights.shape[0] >= 1:
        raise ValueError(f"need m >= 1 neighbours with As, Bs and weights agreeing, got "
                         f"{len(As)}, {len(Bs)} and weights {tuple(weights.shape)}")
    for A, B, w in zip(As, Bs, weights):
        _check(A[None], B[None], w[None], batched_weights=True)
    if len({(a.shape[:-2], a.shape[-1], b.shape[-2]) for a, b in zip(As, Bs)}) > 1:
        raise ValueError(f"neighbours disagree on *b, d or k: As {[tuple(a.shape) for a in As]}, "
                         f"Bs {[tuple(b.shape) for b in Bs]}")


def dlora_mix(As: Tensor, Bs: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """DLoRA's individual consensus (Algorithm 1, lines 6-8): A = sum_j w_j A_j, B = sum_j w_j B_j.

    Args:
        As: (m, *b, r, k). Bs: (m, *b, d, r). weights: (m,), the pi_ij of j in Nb(i).
    Returns:
        A (*b, r, k), B (*b, d, r) in the input dtypes (half inputs are summed in float32).
    """
    _check(As, Bs, weights)
    ct = compute_dtype(As.dtype)
    return (_weighted_sum(As, weights, ct).to(As.dtype),
            _weighted_sum(Bs, weights, ct).to(Bs.dtype))


def factor_mix(Xs: Tensor, weights: Tensor) -> Tensor:
    """One factor's consensus on its own, X = sum_j w_j X_j, the other factor left as it is:
    DLoRA-FA's B (Algorithm 2), FedSA-LoRA's A, the factor a round of ``alternating`` mixes.

    It is exact on the product when the factor left alone is one Y equal over the
    neighbourhood: (sum_j w_j B_j) Y = sum_j w_j B_j Y and Y (sum_j w_j A_j) = sum_j w_j Y A_j
    (no interference; Theorem 6 for DLoRA-FA's shared A).

    Args:
        Xs: (m, *b, p, q), A's (m, *b, r, k) or B's (m, *b, d, r). weights: (m,).
    Returns:
        X (*b, p, q) in the input dtype (half inputs are summed in float32).
    """
    if Xs.ndim < 3 or Xs.shape[0] == 0 or tuple(weights.shape) != (Xs.shape[0],):
        raise ValueError(f"factors (m, *b, p, q) and weights (m,) expected, got "
                         f"{tuple(Xs.shape)} and {tuple(weights.shape)}")
    return _weighted_sum(Xs, weights, compute_dtype(Xs.dtype)).to(Xs.dtype)


def decaf_mix(As: Tensor, Bs: Tensor, weights: Tensor, rank: int | None = None,
              split: str = "balanced") -> tuple[Tensor, Tensor]:
    """DeCAF's product consensus and TSVD (Algorithm 1, lines 10-11), factored.

    B A = T(M), the best rank-``rank`` approximation of M = sum_j w_j B_j A_j (Eckart-Young),
    computed without forming the d x k matrix M (see the module docstring).

    Args:
        As: (m, *b, r, k). Bs: (m, *b, d, r).
        weights: (m,), or (m, *wb) for a leading part wb of *b: one weight row per batch entry,
            so the mixes of several agents (wb = (n,)) run as one call. On CPU each batch entry's
            result is bit-identical to mixing it alone (batched LAPACK and matmuls work matrix by
            matrix; tested at 1 and 2 threads).
        rank: rank of the output; None keeps r.
        split: one of ``SPLITS``.
    Returns:
        A (*b, rank, k), B (*b, d, rank) in the input dtype; QR/SVD run in float32 for half inputs.
    Raises:
        ValueError: mismatched shapes, rank < 1 or an unknown split.
    """
    rank = _prepare(As, Bs, weights, rank, split)
    P, Q, c = _thin_factors(As, Bs, weights, compute_dtype(As.dtype))
    A, B = _split(*_lowrank_svd(P, Q, c, rank), rank, split)
    return A.to(As.dtype), B.to(Bs.dtype)


def decaf_mix_ranks(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor, rank: int,
                    split: str = "balanced") -> tuple[Tensor, Tensor]:
    """``decaf_mix`` for neighbours of different ranks r_j: M = sum_j w_j B_j A_j has rank at
    most sum_j r_j, and agent i keeps its rank-``rank`` (its own r_i) TSVD. P and Q hold each
    neighbour's r_j columns, no zero padding, so M's factors are exact.

    Args:
        As: m tensors (*b, r_j, k). Bs: m tensors (*b, d, r_j). weights: (m,) or (m, *wb) as
            in ``decaf_mix``. rank: the output rank. split: one of ``SPLITS``.
    Returns:
        A (*b, rank, k), B (*b, d, rank) in the input dtype.
    """
    _check_ranks(As, Bs, weights)
    _prepare(As[0][None], Bs[0][None], weights[:1], rank, split)
    P, Q, c = _ragged_thin_factors(As, Bs, weights, compute_dtype(As[0].dtype))
    A, B = _split(*_lowrank_svd(P, Q, c, rank), rank, split)
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def pad_rank(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) zero-padded to ``rank`` >= r: A (*b, rank, k) with zero rows below, B (*b, d, rank)
    with zero columns after; B A is unchanged. The same tensors when r = rank."""
    pad = rank - A.shape[-2]
    return (A, B) if pad == 0 else (F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad)))


def hetlora_mix(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor, rank: int
                ) -> tuple[Tensor, Tensor]:
    """HetLoRA's sparsity-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated
    Fine-tuning of On-Device Foundation Models", EMNLP 2024, arXiv 2401.06432, Fig. 2), over
    agent i's neighbourhood instead of a server's clients:

    1. zero-pad every neighbour's factors to r_max = max_j r_j (``pad_rank``; B_j A_j unchanged);
    2. weigh neighbour j by v_j = pi_ij ||B_j A_j||_F / sum_l pi_il ||B_l A_l||_F, per module
       (by pi_ij alone where every product is zero, as at the start, B = 0);
    3. average the padded factors, A = sum_j v_j A_j, B = sum_j v_j B_j;
    4. truncate to agent i's rank: the first ``rank`` rows of A and columns of B.

    Args:
        As: m tensors (*b, r_j, k). Bs: m tensors (*b, d, r_j). weights: (m,), the pi_ij.
        rank: r_i, at most max_j r_j.
    Returns:
        A (*b, rank, k), B (*b, d, rank) in the input dtype (half inputs summed in float32).
    """
    _check_ranks(As, Bs, weights)
    if weights.ndim != 1:
        raise ValueError(f"weights (m,) expected, got {tuple(weights.shape)}")
    top = max(a.shape[-2] for a in As)
    if not 1 <= rank <= top:
        raise ValueError(f"rank must be in [1, {top}] (the largest neighbour's), got {rank}")
    ct = compute_dtype(As[0].dtype)
    padded = [pad_rank(a.to(ct), b.to(ct), top) for a, b in zip(As, Bs)]
    norms = torch.stack([_lowrank_fro(b, a.mT, a.new_ones(top)) for a, b in padded])  # (m, *b)
    pi = weights.to(As[0].device, ct).reshape(-1, *[1] * (norms.ndim - 1))
    total = (pi * norms).sum(0, keepdim=True)
    v = torch.where(total > 0, pi * norms / torch.where(total > 0, total, 1.0), pi)
    A = sum(w[..., None, None] * a for w, (a, _) in zip(v, padded))
    B = sum(w[..., None, None] * b for w, (_, b) in zip(v, padded))
    return A[..., :rank, :].to(As[0].dtype), B[..., :rank].to(Bs[0].dtype)


def decaf_mix_dense(As: Tensor, Bs: Tensor, weights: Tensor, rank: int | None = None,
                    split: str = "balanced") -> tuple[Tensor, Tensor]:
    """The paper's DeCAF step: form M = sum_j w_j B_j A_j (d x k) and take its dense SVD.

    The reference for ``decaf_mix``: same arguments, returns and errors. It costs O(dk min(d, k))
    time and O(dk) memory.
    """
    rank = _prepare(As, Bs, weights, rank, split)
    P, Q, c = _thin_factors(As, Bs, weights, compute_dtype(As.dtype))
    U, S, Vh = torch.linalg.svd((P * c) @ Q.mT, full_matrices=False)
    A, B = _split(U, S, Vh, rank, split)
    return A.to(As.dtype), B.to(Bs.dtype)


def interference(As: Tensor, Bs: Tensor, weights: Tensor) -> Tensor:
    """Model consensus interference (Definition 1; the E_T of Theorem 2) of one agent's mix.

    ||sum_j w_j B_j A_j - (sum_j w_j B_j)(sum_j w_j A_j)||_F, as ||U V^T||_F with
    U = [w_1 B_1 ... w_m B_m, -Bbar] (d, (m+1)r) and V = [A_1^T ... A_m^T, Abar^T] (k, (m+1)r).

    Args:
        As: (m, *b, r, k). Bs: (m, *b, d, r). weights: (m,).
    Returns:
        (*b,), in float32 for half inputs, else the input dtype.
    """
    _check(As, Bs, weights)
    ct = compute_dtype(As.dtype)
    P, Q, c = _thin_factors(As, Bs, weights, ct)
    Abar, Bbar = _weighted_sum(As, weights, ct), _weighted_sum(Bs, weights, ct)
    return _lowrank_fro(torch.cat([P, Bbar], -1), torch.cat([Q, Abar.mT], -1),
                        torch.cat([c, c.new_full((Bbar.shape[-1],), -1.0)]))


def tsvd_error(As: Tensor, Bs: Tensor, weights: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """||sum_j w_j B_j A_j - B A||_F, the left side of Proposition 1, without forming d x k.

    Args:
        As: (m, *b, r, k). Bs: (m, *b, d, r). weights: (m,).
        A: (*b, s, k). B: (*b, d, s), e.g. the output of ``decaf_mix`` (any s).
    Returns:
        (*b,), in float32 for half inputs, else the input dtype.
    """
    _check(As, Bs, weights)
    if (A.shape[:-2] != As.shape[1:-2] or A.shape[-1] != As.shape[-1]
            or B.shape[:-1] != Bs.shape[1:-1] or B.shape[-1] != A.shape[-2]):
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not match As {tuple(As.shape)}")
    ct = compute_dtype(As.dtype)
    P, Q, c = _thin_factors(As, Bs, weights, ct)
    return _lowrank_fro(torch.cat([P, B.to(ct)], -1), torch.cat([Q, A.to(ct).mT], -1),
                        torch.cat([c, c.new_full((B.shape[-1],), -1.0)]))


def prop1_bound(As: Tensor, Bs: Tensor, weights: Tensor, rank: int | None = None,
                ranks: Sequence[int] | None = None) -> Tensor:
    """Proposition 1's bound on the TSVD error: sqrt((m - 1) r) c^2.

    c = max_j max(sigma_1(A_j), sigma_1(B_j)) over the m neighbours (Assumption 2) and m = |Nb(i)|
    counts agent i itself. The proof bounds the error by sqrt(#discarded singular values) sigma_1(M),
    with sigma_1(M) <= sum_j w_j sigma_1(B_j) sigma_1(A_j) <= c^2, which needs weights >= 0 summing
    to 1. For a TSVD rank other than r the discarded count is at most mr - rank, so the factor is
    sqrt(max(mr - rank, 0)); rank None (= r) gives the paper's sqrt((m - 1) r). Neighbours of
    different ranks r_j, zero-padded to r (``pad_rank``; padding changes no sigma_1), give M a
    rank of at most sum_j r_j: ``ranks`` (their r_j) makes the factor sqrt(sum_j r_j - rank).

    Args:
        As: (m, *b, r, k). Bs: (m, *b, d, r). weights: (m,), only checked for shape.
        ranks: m ints, the neighbours' ranks before padding; None: r each.
    Returns:
        (*b,), in float32 for half inputs, else the input dtype.
    """
    _check(As, Bs, weights)
    m, r = As.shape[0], As.shape[-2]
    rank = r if rank is None else int(rank)
    total = m * r if ranks is None else sum(ranks)
    ct = compute_dtype(As.dtype)
    sigma = torch.maximum(torch.linalg.matrix_norm(As.to(ct), ord=2),
                          torch.linalg.matrix_norm(Bs.to(ct), ord=2))
    return math.sqrt(max(total - rank, 0)) * sigma.amax(0) ** 2
