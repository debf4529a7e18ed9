"""Compressed messages: round trips, each kind's rule, real byte counts, error feedback."""

import math
import pickle

import numpy as np
import pytest
import torch

from decaf_ray.compress import KINDS, Message, decode, encode, encode_with_feedback, nbytes
from decaf_ray.tracking import tracker_of, with_tracker

D, K, R = 24, 40, 3


def payload(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"q": (torch.randn(R, K, generator=g) * scale, torch.randn(D, R, generator=g) * scale),
            "v": (torch.randn(R, K, generator=g) * scale, torch.randn(D, R, generator=g) * scale)}


def float32_bytes(p):
    return sum(4 * x.numel() for pair in p.values() for x in pair if x is not None)


@pytest.mark.parametrize("kind,ratio", [(k, 0.1 if k == "topk" else None) for k in KINDS])
def test_round_trip_keeps_structure_and_none(kind, ratio):
    p = {"q": (None, torch.randn(D, R)), "v": (torch.randn(R, K), torch.randn(D, R))}
    out = decode(encode(p, kind, ratio))
    assert list(out) == ["q", "v"] and out["q"][0] is None
    for n in p:
        for x, y in zip(p[n], out[n]):
            if x is not None:
                assert y.dtype == torch.float32 and y.shape == x.shape


def test_float32_is_bit_exact_and_shares_memory():
    p = payload()
    m = encode(p)
    out = decode(m)
    for n in p:
        for x, y in zip(p[n], out[n]):
            assert torch.equal(x, y)
            assert np.shares_memory(y.numpy(), x.numpy())
    assert nbytes(m) == float32_bytes(p)


def test_float16_is_numpy_half_and_half_the_bytes():
    p = payload()
    m = encode(p, "float16")
    assert nbytes(m) * 2 == float32_bytes(p)
    a = p["q"][0]
    assert torch.equal(decode(m)["q"][0], a.half().float())


def test_bfloat16_is_torch_rounding_exactly():
    p = payload(scale=3.7)
    m = encode(p, "bfloat16")
    assert nbytes(m) * 2 == float32_bytes(p)
    assert m.factors["q"][1].data.dtype == np.uint16
    out = decode(m)
    for n in p:
        for x, y in zip(p[n], out[n]):
            assert torch.equal(y, x.to(torch.bfloat16).to(torch.float32))


def test_int8_error_bound_scales_per_rank_component_and_bytes():
    p = payload(seed=1, scale=5.0)
    m = encode(p, "int8")
    out = decode(m)
    a, b = p["q"]
    sa, sb = m.factors["q"][0].scale, m.factors["q"][1].scale
    assert sa.shape == (R,) and sb.shape == (R,) and sa.dtype == np.float32
    assert np.allclose(sa, a.abs().amax(1).numpy() / 127)       # per row of A (r, k)
    assert np.allclose(sb, b.abs().amax(0).numpy() / 127)       # per column of B (d, r)
    tol = 1e-6 * 5.0
    assert ((a - out["q"][0]).abs() <= torch.from_numpy(sa)[:, None] / 2 + tol).all()
    assert ((b - out["q"][1]).abs() <= torch.from_numpy(sb)[None, :] / 2 + tol).all()
    # one byte per entry plus 4 bytes per rank component of each factor
    assert nbytes(m) == float32_bytes(p) // 4 + 4 * R * 2 * len(p)


def test_int8_zero_component_decodes_to_zero():
    a = torch.randn(R, K)
    a[1] = 0
    b = torch.zeros(D, R)
    m = encode({"q": (a, b)}, "int8")
    out = decode(m)["q"]
    assert m.factors["q"][0].scale[1] == 0 and (m.factors["q"][1].scale == 0).all()
    assert (out[0][1] == 0).all() and (out[1] == 0).all()
    assert (out[0][0] - a[0]).abs().max() <= a[0].abs().max() / 254 + 1e-6


def test_topk_keeps_the_k_largest_and_breaks_ties_by_index():
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(3))
    ratio = 0.1
    k = math.ceil(ratio * x.numel())
    m = encode({"q": (x, None)}, "topk", ratio)
    packed = m.factors["q"][0]
    assert packed.index.dtype == np.uint8 and packed.data.dtype == np.float32   # 120 entries
    assert nbytes(m) == k * (1 + 4)
    y = decode(m)["q"][0]
    kept = y != 0
    assert kept.sum() == k and torch.equal(y[kept], x[kept])
    assert x[kept].abs().min() >= x[~kept].abs().max()
    ties = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0]])
    out = decode(encode({"t": (ties, None)}, "topk", 0.4))["t"][0]
    assert torch.equal(out, torch.tensor([[0.0, -2.0, 2.0, 0.0, 0.0]]))
    assert decode(encode({"t": (ties, None)}, "topk", 1e-9))["t"][0].count_nonzero() == 1


def test_topk_index_type_grows_with_numel():
    big = torch.randn(4, 20000)
    assert encode({"b": (big, None)}, "topk", 0.01).factors["b"][0].index.dtype == np.uint32
    mid = torch.randn(4, 300)
    assert encode({"m": (mid, None)}, "topk", 0.01).factors["m"][0].index.dtype == np.uint16


def test_tracked_payload_travels_and_comes_back():
    p = with_tracker(payload(0), {n: (a.abs(), b.abs()) for n, (a, b) in payload(1).items()})
    out = decode(encode(p, "float16"))
    assert set(out) == set(p)
    for n, (a, b) in tracker_of(out).items():
        assert torch.equal(a, tracker_of(p)[n][0].half().float())


@pytest.mark.parametrize("kind", ["float32", "int8", "topk"])
def test_message_pickles_like_ray_does(kind):
    m = encode(payload(), kind, 0.2 if kind == "topk" else None)
    back = pickle.loads(pickle.dumps(m, protocol=5))
    assert isinstance(back, Message) and nbytes(back) == nbytes(m)
    for n, pair in decode(m).items():
        for x, y in zip(pair, decode(back)[n]):
            assert torch.equal(x, y)


def test_read_only_arrays_decode():
    m = encode(payload())
    for pair in m.factors.values():
        for p in pair:
            p.data.flags.writeable = False
    assert torch.equal(decode(m)["q"][0], payload()["q"][0])


def _add(total, p):
    return p if total is None else {n: tuple(x + y for x, y in zip(total[n], p[n])) for n in p}


@pytest.mark.parametrize("kind,ratio", [("topk", 0.05), ("int8", None), ("bfloat16", None)])
def test_error_feedback_residual_identity_and_running_sums(kind, ratio):
    residual, sent, arrived, plain = None, None, None, None
    for t in range(30):
        p = payload(seed=t)
        before = residual
        m, residual = encode_with_feedback(p, residual, kind, ratio)
        got = decode(m)
        for n in p:
            for f in range(2):
                prev = 0 if before is None else before[n][f]
                assert torch.allclose(got[n][f] + residual[n][f], p[n][f] + prev, atol=1e-6)
        sent, arrived = _add(sent, p), _add(arrived, got)
        plain = _add(plain, decode(encode(p, kind, ratio)))
    # sum of arrivals = sum of inputs - the last residual, and it is much closer to the sum
    # of inputs than the sum of messages compressed without feedback
    for n in sent:
        for f in range(2):
            assert torch.allclose(arrived[n][f] + residual[n][f], sent[n][f], atol=1e-4)
            gap = (arrived[n][f] - sent[n][f]).norm()
            assert gap < 0.5 * (plain[n][f] - sent[n][f]).norm()


def test_error_feedback_keeps_the_residual_of_a_factor_that_did_not_travel():
    p = payload()
    _, residual = encode_with_feedback(p, None, "topk", 0.1)
    only_b = {n: (None, b) for n, (_, b) in p.items()}
    _, after = encode_with_feedback(only_b, residual, "topk", 0.1)
    assert all(after[n][0] is residual[n][0] for n in p)
    with pytest.raises(ValueError, match="residual"):
        encode_with_feedback({"q": (torch.randn(R + 1, K), None)}, residual, "topk", 0.1)


@pytest.mark.parametrize("kind,ratio", [("int4", None), ("topk", None), ("topk", 0.0),
                                        ("topk", 1.5), ("int8", 0.1)])
def test_bad_kind_or_ratio(kind, ratio):
    with pytest.raises(ValueError):
        encode(payload(), kind, ratio)


def test_deterministic():
    p = payload(scale=2.0)
    for kind, ratio in [("int8", None), ("topk", 0.3)]:
        a, b = encode(p, kind, ratio), encode(p, kind, ratio)
        for n in p:
            for x, y in zip(a.factors[n], b.factors[n]):
                assert np.array_equal(x.data, y.data)
