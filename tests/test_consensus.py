"""Tests of decaf_ray.consensus against dense references (float64) and the paper's statements."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from decaf_ray.alignment import conserve_imbalance
from decaf_ray.consensus import (
    SPLITS,
    decaf_mix,
    decaf_mix_dense,
    decaf_mix_ranks,
    dlora_mix,
    factor_mix,
    hetlora_mix,
    interference,
    pad_rank,
    prop1_bound,
    tsvd_error,
)

F64 = torch.float64


def make(m, d, k, r, batch=(), seed=0, dtype=F64):
    """Random As (m, *batch, r, k), Bs (m, *batch, d, r) and positive weights (m,) summing to 1."""
    g = torch.Generator().manual_seed(seed)
    As = torch.randn(m, *batch, r, k, generator=g, dtype=dtype)
    Bs = torch.randn(m, *batch, d, r, generator=g, dtype=dtype)
    w = torch.rand(m, generator=g, dtype=F64) + 0.1
    return As, Bs, (w / w.sum()).to(dtype)


def dense_M(As, Bs, w):
    """sum_j w_j B_j A_j, formed explicitly."""
    return torch.einsum("m,m...dr,m...rk->...dk", w, Bs, As)


def best_rank(M, rank):
    """Eckart-Young: the best rank-`rank` approximation of M (d, k) and its singular values."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank], S


def rel(X, Y):
    return ((X - Y).norm() / Y.norm().clamp_min(1e-300)).item()


# (m, d, k, r, rank): generic, mr > d, mr > k, rank > available singular values, rank < r.
CASES = [
    (4, 30, 20, 3, None),
    (5, 6, 40, 2, None),
    (5, 40, 6, 2, None),
    (1, 12, 9, 3, None),
    (1, 12, 9, 2, 5),
    (4, 3, 4, 2, 6),
    (3, 25, 25, 4, 2),
]


@pytest.mark.parametrize("m,d,k,r,rank", CASES)
@pytest.mark.parametrize("split", SPLITS)
def test_decaf_mix_is_best_rank_approximation(m, d, k, r, rank, split):
    As, Bs, w = make(m, d, k, r, seed=m * d + k)
    A, B = decaf_mix(As, Bs, w, rank=rank, split=split)
    rk = r if rank is None else rank
    assert A.shape == (rk, k) and B.shape == (d, rk) and A.dtype == B.dtype == F64
    M = dense_M(As, Bs, w)
    ref, S = best_rank(M, rk)
    assert rel(B @ A, ref) < 1e-10
    n = min(rk, d, k, m * r)  # singular values the factored core can have; the rest are padding
    S_ref = torch.cat([S[:n], S.new_zeros(rk - n)])
    if split != "left":  # aligned and conserved are balanced until adjusted per agent
        # B^T B = A A^T = S: the paper's symmetric split.
        assert torch.allclose(B.mT @ B, torch.diag(S_ref), atol=1e-10 * S[0])
        assert torch.allclose(A @ A.mT, torch.diag(S_ref), atol=1e-10 * S[0])
    else:
        assert torch.allclose(B.norm(dim=0), S_ref, atol=1e-10 * S[0])
        assert torch.allclose(A[:n] @ A[:n].mT, torch.eye(n, dtype=F64), atol=1e-12)
        assert torch.all(A[n:] == 0)


def test_single_neighbour_is_exact():
    As, Bs, w = make(1, 15, 11, 3, seed=1)
    w = torch.ones(1, dtype=F64)
    A, B = decaf_mix(As, Bs, w)
    assert rel(B @ A, Bs[0] @ As[0]) < 1e-12
    assert tsvd_error(As, Bs, w, A, B).item() < 1e-12 * (Bs[0] @ As[0]).norm()
    assert prop1_bound(As, Bs, w).item() == 0.0


def test_identical_agents_rank_deficient():
    As, Bs, _ = make(1, 20, 16, 3, seed=2)
    As, Bs = As.expand(5, 3, 16).clone(), Bs.expand(5, 20, 3).clone()
    w = torch.full((5,), 0.2, dtype=F64)
    A, B = decaf_mix(As, Bs, w)
    assert rel(B @ A, Bs[0] @ As[0]) < 1e-10
    assert interference(As, Bs, w).item() < 1e-12 * (Bs[0] @ As[0]).norm()


@pytest.mark.parametrize("split", SPLITS)
def test_zero_B_gives_zero_product(split):
    As, Bs, w = make(4, 10, 7, 2, seed=3)
    A, B = decaf_mix(As, torch.zeros_like(Bs), w, split=split)
    assert A.shape == (2, 7) and B.shape == (10, 2)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert (B @ A).abs().max().item() == 0.0


@pytest.mark.parametrize("split", SPLITS)
def test_batched_equals_loop(split):
    As, Bs, w = make(4, 14, 9, 2, batch=(3,), seed=4)
    A, B = decaf_mix(As, Bs, w, split=split)
    assert A.shape == (3, 2, 9) and B.shape == (3, 14, 2)
    for i in range(3):
        Ai, Bi = decaf_mix(As[:, i], Bs[:, i], w, split=split)
        assert rel(B[i] @ A[i], Bi @ Ai) < 1e-12
    Ad, Bd = decaf_mix_dense(As, Bs, w, split=split)
    assert rel(B @ A, Bd @ Ad) < 1e-10
    for fn in (interference, prop1_bound):
        out = fn(As, Bs, w)
        assert out.shape == (3,)
        assert torch.allclose(out, torch.stack([fn(As[:, i], Bs[:, i], w) for i in range(3)]))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_per_agent_weights_batch_agents_bit_identically(split, dtype):
    # n agents, each with its own weight row: every slice of any batch equals its mix alone,
    # which is what lets runtimes group agents differently and still agree exactly.
    n, m = 5, 3
    As, Bs, _ = make(m, 14, 9, 2, batch=(n, 4), seed=6, dtype=dtype)
    W = torch.rand(m, n, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.1
    W = W / W.sum(0)
    A, B = decaf_mix(As, Bs, W, split=split)
    assert A.shape == (n, 4, 2, 9) and B.shape == (n, 4, 14, 2)
    for i in range(n):
        Ai, Bi = decaf_mix(As[:, i], Bs[:, i], W[:, i], split=split)
        assert A[i].equal(Ai) and B[i].equal(Bi)
    Ap, Bp = decaf_mix(As[:, 1:3], Bs[:, 1:3], W[:, 1:3], split=split)
    assert Ap.equal(A[1:3]) and Bp.equal(B[1:3])
    Ad, Bd = decaf_mix_dense(As, Bs, W, split=split)
    assert rel(B @ A, Bd @ Ad) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_per_agent_weights_must_lead_the_batch_dims():
    As, Bs, _ = make(3, 5, 6, 2, batch=(4,))
    with pytest.raises(ValueError, match="weights"):
        decaf_mix(As, Bs, torch.full((3, 5), 1 / 3, dtype=F64))
    with pytest.raises(ValueError, match="weights"):
        dlora_mix(As, Bs, torch.full((3, 4), 1 / 3, dtype=F64))  # per-agent rows: DeCAF only
    As, Bs, _ = make(3, 5, 6, 2)  # no batch dims: a weight row per r would be a silent misuse
    with pytest.raises(ValueError, match="weights"):
        decaf_mix(As, Bs, torch.full((3, 2), 1 / 3, dtype=F64))


@pytest.mark.parametrize("m,d,k,r,rank", CASES)
def test_dense_and_factored_agree(m, d, k, r, rank):
    As, Bs, w = make(m, d, k, r, seed=10 + m)
    A, B = decaf_mix(As, Bs, w, rank=rank)
    Ad, Bd = decaf_mix_dense(As, Bs, w, rank=rank)
    assert A.shape == Ad.shape and B.shape == Bd.shape
    assert rel(B @ A, Bd @ Ad) < 1e-10


def test_unknown_split_lists_valid_ones():
    As, Bs, w = make(2, 5, 5, 1)
    for fn in (decaf_mix, decaf_mix_dense):
        with pytest.raises(ValueError, match="balanced, left"):
            fn(As, Bs, w, split="right")


def test_shape_mismatch_raises():
    As, Bs, w = make(3, 5, 6, 2)
    with pytest.raises(ValueError):
        decaf_mix(As, Bs, w[:2])
    with pytest.raises(ValueError):
        dlora_mix(As, Bs[..., :1], w)
    with pytest.raises(ValueError):
        decaf_mix(As, Bs, w, rank=0)


def test_interference_zero_with_shared_factor():
    As, Bs, w = make(5, 18, 13, 3, seed=5)
    scale = dense_M(As, Bs, w).norm().item()
    shared_A = As[:1].expand_as(As).clone()
    shared_B = Bs[:1].expand_as(Bs).clone()
    # Theorem 6: freezing (sharing) A removes the interference; so does sharing B.
    assert interference(shared_A, Bs, w).item() < 1e-12 * scale
    assert interference(As, shared_B, w).item() < 1e-12 * scale
    assert interference(As, Bs, w).item() > 1e-3 * scale


@pytest.mark.parametrize("m,d,k,r", [(4, 30, 20, 3), (6, 5, 40, 2), (3, 8, 8, 4)])
def test_interference_matches_dense(m, d, k, r):
    As, Bs, w = make(m, d, k, r, seed=6 + m)
    Abar, Bbar = dlora_mix(As, Bs, w)
    ref = (dense_M(As, Bs, w) - Bbar @ Abar).norm()
    assert abs(interference(As, Bs, w).item() - ref.item()) < 1e-10 * ref.item()


@pytest.mark.parametrize("m,d,k,r,rank", CASES)
def test_tsvd_error_matches_dense(m, d, k, r, rank):
    As, Bs, w = make(m, d, k, r, seed=20 + d)
    A, B = decaf_mix(As, Bs, w, rank=rank)
    M = dense_M(As, Bs, w)
    ref = (M - B @ A).norm().item()
    assert abs(tsvd_error(As, Bs, w, A, B).item() - ref) < 1e-10 * M.norm().item()
    # An arbitrary (A, B), not only the TSVD.
    A2, B2 = dlora_mix(As, Bs, w)
    ref2 = (M - B2 @ A2).norm().item()
    assert abs(tsvd_error(As, Bs, w, A2, B2).item() - ref2) < 1e-10 * M.norm().item()


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 8), d=st.integers(1, 24), k=st.integers(1, 24), r=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_tsvd_error_within_prop1_bound(m, d, k, r, seed, scale):
    As, Bs, w = make(m, d, k, r, seed=seed)
    As, Bs = As * scale, Bs / scale**0.5
    A, B = decaf_mix(As, Bs, w)
    err = tsvd_error(As, Bs, w, A, B).item()
    bound = prop1_bound(As, Bs, w).item()
    c2 = max(torch.linalg.matrix_norm(As, 2).max().item(),
             torch.linalg.matrix_norm(Bs, 2).max().item()) ** 2
    assert bound == pytest.approx(((m - 1) * r) ** 0.5 * c2, rel=1e-12)
    assert err <= bound + 1e-10 * c2


def test_fa_mix_is_exact_on_the_product():
    As, Bs, w = make(5, 16, 12, 3, seed=7)
    A = As[0]
    B = factor_mix(Bs, w)
    ref = torch.einsum("m,mdr->dr", w, Bs) @ A
    assert rel(B @ A, dense_M(A.expand_as(As), Bs, w)) < 1e-12
    assert rel(B @ A, ref) < 1e-12


def test_mixing_preserves_network_mean():
    # Ring of 6 agents, each averaging itself and its two neighbours: Pi is doubly stochastic.
    n, w = 6, torch.full((3,), 1 / 3, dtype=F64)
    As, Bs, _ = make(n, 9, 7, 2, seed=8)
    mixed = [dlora_mix(As[idx], Bs[idx], w) for idx in ([(i - 1) % n, i, (i + 1) % n]
                                                       for i in range(n))]
    A_new, B_new = torch.stack([a for a, _ in mixed]), torch.stack([b for _, b in mixed])
    assert torch.allclose(A_new.mean(0), As.mean(0), atol=1e-13)
    assert torch.allclose(B_new.mean(0), Bs.mean(0), atol=1e-13)
    B_fa = torch.stack([factor_mix(Bs[[(i - 1) % n, i, (i + 1) % n]], w) for i in range(n)])
    assert torch.allclose(B_fa.mean(0), Bs.mean(0), atol=1e-13)


def test_complete_graph_uniform_is_exact_average():
    As, Bs, _ = make(7, 10, 8, 3, batch=(2,), seed=9)
    A, B = dlora_mix(As, Bs, torch.full((7,), 1 / 7, dtype=F64))
    assert torch.allclose(A, As.mean(0), atol=1e-14)
    assert torch.allclose(B, Bs.mean(0), atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(dtype):
    As, Bs, w = make(4, 32, 24, 2, batch=(2,), seed=11)
    A, B = decaf_mix(As.to(dtype), Bs.to(dtype), w.to(dtype))
    assert A.dtype == B.dtype == dtype
    assert A.shape == (2, 2, 24) and B.shape == (2, 32, 2)
    A64, B64 = decaf_mix(As, Bs, w)
    assert rel(B.to(F64) @ A.to(F64), B64 @ A64) < 5e-2
    Ad, Bd = dlora_mix(As.to(dtype), Bs.to(dtype), w.to(dtype))
    assert Ad.dtype == Bd.dtype == dtype and Ad.shape == (2, 2, 24)
    assert interference(As.to(dtype), Bs.to(dtype), w.to(dtype)).dtype == torch.float32


def test_float32_stays_float32():
    As, Bs, w = make(3, 20, 20, 2, seed=12, dtype=torch.float32)
    A, B = decaf_mix(As, Bs, w)
    assert A.dtype == B.dtype == torch.float32
    Ad, Bd = decaf_mix_dense(As.double(), Bs.double(), w.double())
    assert rel(B.double() @ A.double(), Bd @ Ad) < 1e-5


def test_align_keeps_the_product_and_lands_near_the_reference():
    from decaf_ray.alignment import align, procrustes

    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 9, generator=g, dtype=torch.float64)
    B = torch.randn(7, 3, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    # the reference is the same factorization in another basis: align recovers it exactly
    A2, B2 = align(Q.T @ A, B @ Q, A, B)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-12)
    assert torch.allclose(A2, A, atol=1e-10) and torch.allclose(B2, B, atol=1e-10)
    R = procrustes(B @ Q, B)
    assert torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_aligned_split_gives_the_balanced_product():
    g = torch.Generator().manual_seed(4)
    As = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    Bs = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    A, B = decaf_mix(As, Bs, w, split="balanced")
    A2, B2 = decaf_mix(As, Bs, w, split="aligned")
    assert torch.allclose(B @ A, B2 @ A2, atol=1e-12)


@pytest.mark.parametrize("delta", [-40.0, -1.0, 0.0, 3.0])
def test_conserve_imbalance_sets_the_reference_imbalance_and_keeps_the_product(delta):
    g = torch.Generator().manual_seed(7)
    As = torch.randn(3, 2, 6, generator=g, dtype=F64)
    Bs = torch.randn(3, 5, 2, generator=g, dtype=F64)
    A, B = decaf_mix(As, Bs, torch.full((3,), 1 / 3, dtype=F64), split="balanced")
    # a reference whose ||B||^2 - ||A||^2 is delta
    A_ref = torch.zeros(2, 6, dtype=F64)
    A_ref[0, 0] = max(-delta, 0.0) ** 0.5
    B_ref = torch.zeros(5, 2, dtype=F64)
    B_ref[0, 0] = max(delta, 0.0) ** 0.5
    A2, B2 = conserve_imbalance(A, B, A_ref, B_ref)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-12)
    assert float(B2.square().sum() - A2.square().sum()) == pytest.approx(delta, abs=1e-9)
    # batched over modules, and a zero product stays zero (c = 1, no division by zero)
    Z = torch.zeros(2, 2, 6, dtype=F64), torch.zeros(2, 5, 2, dtype=F64)
    A3, B3 = conserve_imbalance(torch.stack([A, Z[0][0]]), torch.stack([B, Z[1][0]]),
                                torch.stack([A_ref, A_ref]), torch.stack([B_ref, B_ref]))
    assert torch.allclose(A3[0], A2) and torch.all(A3[1] == 0) and torch.all(B3[1] == 0)


def test_conserve_imbalance_is_finite_when_the_product_is_tiny_in_float32():
    # early in training: ||A||^2 ~ 1e2 while the product's norm is ~1e-10
    g = torch.Generator().manual_seed(8)
    As, Bs = torch.randn(2, 2, 6, generator=g) * 1e-5, torch.randn(2, 5, 2, generator=g) * 1e-5
    A, B = decaf_mix(As, Bs, torch.full((2,), 0.5), split="balanced")
    A_ref = torch.randn(2, 6, generator=g) * 4.0
    A2, B2 = conserve_imbalance(A, B, A_ref, torch.zeros(5, 2))
    assert torch.isfinite(A2).all() and torch.isfinite(B2).all()
    assert torch.allclose(B2 @ A2, B @ A, rtol=1e-4, atol=1e-16)
    want = -float(A_ref.square().sum())
    assert float(B2.square().sum() - A2.square().sum()) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("scale,delta", [(1e-12, 0.0), (1e-12, 3e-26), (1e18, -1e37)])
def test_conserve_imbalance_extreme_scales_in_float32(scale, delta):
    # s = ||A||^2 ~ scale^2 under- or overflows once squared again; t = delta / s does not
    A = torch.zeros(2, 6)
    B = torch.zeros(5, 2)
    A[0, 0], B[0, 0] = scale, scale
    A_ref, B_ref = torch.zeros(2, 6), torch.zeros(5, 2)
    (A_ref if delta < 0 else B_ref)[0, 0] = abs(delta) ** 0.5
    A2, B2 = conserve_imbalance(A, B, A_ref, B_ref)
    assert torch.isfinite(A2).all() and torch.isfinite(B2).all()
    assert float(B2[0, 0] * A2[0, 0]) == pytest.approx(scale * scale, rel=1e-5)
    assert float(B2.square().sum() - A2.square().sum()) == pytest.approx(delta, rel=1e-4, abs=1e-30)


def _flipped_svd(svd, seed):
    """torch.linalg.svd with each singular pair's sign flipped at random: an equally valid SVD."""
    g = torch.Generator().manual_seed(seed)

    def flipped(X, *args, **kwargs):
        U, S, Vh = svd(X, *args, **kwargs)
        sign = (torch.randint(0, 2, S.shape, generator=g) * 2 - 1).to(U.dtype)
        return U * sign[..., None, :], S, Vh * sign[..., :, None]
    return flipped


@pytest.mark.parametrize("split", ["balanced", "left"])
@pytest.mark.parametrize("mix", [decaf_mix, decaf_mix_dense])
def test_sign_flipped_svd_gives_identical_factors(monkeypatch, split, mix):
    As, Bs, w = make(3, 7, 6, 2, batch=(4,), seed=5)
    A, B = mix(As, Bs, w, split=split)
    for seed in range(3):
        monkeypatch.setattr(torch.linalg, "svd", _flipped_svd(torch.linalg.svd, seed))
        Af, Bf = mix(As, Bs, w, split=split)
        monkeypatch.undo()
        assert torch.equal(A, Af) and torch.equal(B, Bf)
    pivot = B.gather(-2, B.abs().argmax(dim=-2, keepdim=True))  # the convention itself
    assert torch.all(pivot > 0)


@pytest.mark.parametrize("split", ["balanced", "left"])
def test_dense_and_factored_agree_on_the_factors(split):
    # With the sign convention the factors themselves, not only their product, agree.
    As, Bs, w = make(3, 9, 8, 2, batch=(2,), seed=8)
    A, B = decaf_mix(As, Bs, w, split=split)
    Ad, Bd = decaf_mix_dense(As, Bs, w, split=split)
    assert torch.allclose(A, Ad, atol=1e-10) and torch.allclose(B, Bd, atol=1e-10)


# ------------------------------------------------------------------ neighbours of different ranks


def ragged(ranks, d=7, k=6, batch=(), seed=0):
    """Random As[j] (*batch, r_j, k), Bs[j] (*batch, d, r_j) and positive weights summing to 1."""
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(*batch, r, k, generator=g, dtype=F64) for r in ranks]
    Bs = [torch.randn(*batch, d, r, generator=g, dtype=F64) for r in ranks]
    w = torch.rand(len(ranks), generator=g, dtype=F64) + 0.1
    return As, Bs, w / w.sum()


@pytest.mark.parametrize("rank", [1, 2, 3, 6])
def test_decaf_mix_ranks_keeps_the_agents_rank_and_is_exact_when_it_covers_the_product(rank):
    # neighbours of ranks 1, 3, 2: M has rank 6 <= min(d, k); rank 6 keeps all of it
    As, Bs, w = ragged([1, 3, 2])
    M = sum(wj * b @ a for wj, a, b in zip(w, As, Bs))
    A, B = decaf_mix_ranks(As, Bs, w, rank)
    assert A.shape == (rank, 6) and B.shape == (7, rank)
    best, S = best_rank(M, rank)
    assert rel(B @ A, best) < 1e-12  # Eckart-Young at the agent's own rank
    if rank == 6:
        assert rel(B @ A, M) < 1e-12
    # zero-padding the neighbours to a common rank leaves M, hence the TSVD, unchanged
    padded = [pad_rank(a, b, 3) for a, b in zip(As, Bs)]
    A2, B2 = decaf_mix(torch.stack([a for a, _ in padded]), torch.stack([b for _, b in padded]),
                       w, rank)
    assert rel(B2 @ A2, B @ A) < 1e-10


def test_decaf_mix_ranks_batches_agents_bit_identically():
    As, Bs, _ = ragged([2, 1, 3], batch=(2, 4))  # 2 agents, 4 modules each
    W = torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.2, 0.5]], dtype=F64)
    A, B = decaf_mix_ranks(As, Bs, W, 2)
    for a in range(2):
        A1, B1 = decaf_mix_ranks([x[a] for x in As], [x[a] for x in Bs], W[:, a], 2)
        assert A[a].equal(A1) and B[a].equal(B1)


def test_hetlora_mix_by_hand():
    # two neighbours of ranks 1 and 2 on a 2 x 2 weight, pi = (1/2, 1/2):
    # B_1 A_1 = [[2], [0]] [[1, 0]] has norm 2; B_2 A_2 = I has norm sqrt(2)
    A1, B1 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[2.0], [0.0]], dtype=F64)
    A2, B2 = torch.eye(2, dtype=F64), torch.eye(2, dtype=F64)
    w = torch.tensor([0.5, 0.5], dtype=F64)
    v1, v2 = 2 / (2 + 2 ** 0.5), 2 ** 0.5 / (2 + 2 ** 0.5)  # pi_ij ||B_j A_j|| normalised
    A1p = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)  # A_1 zero-padded to rank 2
    B1p = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64)
    A, B = hetlora_mix([A1, A2], [B1, B2], w, rank=2)
    assert torch.allclose(A, v1 * A1p + v2 * A2) and torch.allclose(B, v1 * B1p + v2 * B2)
    A, B = hetlora_mix([A1, A2], [B1, B2], w, rank=1)  # truncated to the first rank
    assert torch.allclose(A, (v1 * A1p + v2 * A2)[:1])
    assert torch.allclose(B, (v1 * B1p + v2 * B2)[:, :1])
    # all products zero (B = 0, the start): the weights fall back to pi
    A, B = hetlora_mix([A1, A2], [0 * B1, 0 * B2], w, rank=2)
    assert torch.allclose(A, 0.5 * A1p + 0.5 * A2) and B.abs().sum() == 0
    with pytest.raises(ValueError, match="rank must be in"):
        hetlora_mix([A1, A2], [B1, B2], w, rank=3)


def test_hetlora_weights_each_module_by_its_own_product():
    As, Bs, w = ragged([2, 1], batch=(3,))  # 3 modules
    A, B = hetlora_mix(As, Bs, w, rank=1)
    for i in range(3):
        A1, B1 = hetlora_mix([a[i] for a in As], [b[i] for b in Bs], w, rank=1)
        assert torch.allclose(A[i], A1) and torch.allclose(B[i], B1)


def test_prop1_bound_counts_the_neighbours_own_ranks():
    As, Bs, w = ragged([1, 3, 2])
    padded = [pad_rank(a, b, 3) for a, b in zip(As, Bs)]
    Ap, Bp = torch.stack([a for a, _ in padded]), torch.stack([b for _, b in padded])
    plain = prop1_bound(Ap, Bp, w, rank=2)  # as if every neighbour had rank 3: sqrt(9 - 2)
    own = prop1_bound(Ap, Bp, w, rank=2, ranks=[1, 3, 2])  # sqrt(6 - 2)
    assert float(own) == pytest.approx(float(plain) * (4 / 7) ** 0.5)
    A, B = decaf_mix_ranks(As, Bs, w, 2)
    assert float(tsvd_error(Ap, Bp, w, A, B)) <= float(own)
