"""Compressed messages (``network.compress``): how a payload's factors travel, and their real size.

A payload is ``Factors``-like, ``{module name: (A (r, k) | None, B (d, r) | None)}`` (a factor
that does not travel is None; a tracked payload carries the tracker's pairs under
``tracking.TRACKER``-prefixed names, and they are compressed like any other pair). ``encode``
turns it into a ``Message`` built only of numpy arrays and small Python metadata, so it crosses
Ray's object store zero-copy and ``nbytes(message)`` is the size of what really travels;
``decode`` turns it back into float32 tensors of the same structure. Kinds:

- ``float32``: the arrays themselves (no copy for CPU float32 tensors); decoding is bit exact,
  so the default reproduces the uncompressed runs.
- ``float16``: IEEE half (numpy's round to nearest even), half the bytes.
- ``bfloat16``: torch's bfloat16 rounding, carried as its uint16 bits (numpy has no bf16) and
  decoded exactly as torch's bf16 -> float32 (the bits shifted into the high half).
- ``int8``: symmetric, one float32 scale per rank component: per row of A (r, k) and per column
  of B (d, r), scale = max|v| / 127, q = round(v / scale) in [-127, 127], so
  |v - q scale| <= scale / 2 entrywise; an all-zero component has scale 0 and decodes to 0.
  Scales along the rank axis cost 4 r bytes per factor, so a factor is numel + 4 r bytes, about a
  quarter of float32; one scale per row of B (d, r) would cost 4 d bytes, as much as B itself in
  int8 when r = 4.
- ``topk``: per matrix the k = max(1, ceil(ratio numel)) entries of largest |x| (ties go to the
  lower flat index), sent as ascending flat indices in the smallest unsigned integer type that
  holds numel - 1 and float32 values; the rest decode to 0.

Error feedback (EF-SGD, Karimireddy et al. 2019; the sender's side of Choco-gossip, Koloskova
et al. 2019): ``encode_with_feedback`` compresses payload + residual and keeps what the message
lost as the next residual, so over rounds the sum of decoded messages tracks the sum of
payloads up to one residual. Everything here is deterministic (no RNG) and Ray-free.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

KINDS = ("float32", "float16", "bfloat16", "int8", "topk")
"""Every ``network.compress`` kind; all but float32 are lossy."""

RANK_AXIS = (0, 1)
"""The rank axis of each factor of a pair: A (r, k) has r rows, B (d, r) has r columns."""

Payload = dict[str, tuple["Tensor | None", "Tensor | None"]]
"""module name -> (A (r, k) or None, B (d, r) or None), as ``Algorithm.payload`` builds it."""


@dataclass(frozen=True)
class Packed:
    """One factor as it travels.

    ``data``: float32 / float16 (shape ``shape``), uint16 bf16 bits (``shape``), int8 (``shape``)
    or topk's float32 values (k,). ``scale``: int8's float32 scales, one per rank component.
    ``index``: topk's ascending flat indices (k,).
    """
    shape: tuple[int, ...]
    data: np.ndarray
    scale: np.ndarray | None = None
    index: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scale, self.index) if a is not None)


@dataclass(frozen=True)
class Message:
    """A compressed payload: ``factors`` mirrors the payload's structure, None stays None."""
    kind: str
    factors: dict[str, tuple[Packed | None, Packed | None]]


def nbytes(message: Message) -> int:
    """Bytes of every array the message carries (its metadata, a few names, not counted)."""
    return sum(p.nbytes for pair in message.factors.values() for p in pair if p is not None)


def check(kind: str, ratio: float | None = None) -> None:
    """ValueError unless ``kind`` is one of KINDS and topk (only topk) has 0 < ratio <= 1."""
    if kind not in KINDS:
        raise ValueError(f"compression kind {kind!r}: one of {', '.join(KINDS)}")
    if kind == "topk" and (ratio is None or not 0.0 < ratio <= 1.0):
        raise ValueError(f"topk's ratio must be in (0, 1], got {ratio!r}")
    if kind != "topk" and ratio is not None:
        raise ValueError(f"ratio applies to topk only, not {kind!r}")


def encode(payload: Payload, kind: str = "float32", ratio: float | None = None) -> Message:
    """The message that carries ``payload`` compressed by ``kind`` (``ratio`` for topk).

    For float32 the message's arrays share memory with the payload's CPU float32 tensors, so a
    sender must not change its factors in place while the message may still be read.
    """
    check(kind, ratio)
    return Message(kind, {n: tuple(None if x is None else _pack(x, kind, ratio, RANK_AXIS[f])
                                   for f, x in enumerate(pair))
                          for n, pair in payload.items()})


def decode(message: Message) -> Payload:
    """The payload a message carries, as float32 tensors; float32 messages decode bit exact
    (as views of the message's arrays, read-only when they came from Ray's object store)."""
    return {n: tuple(None if p is None else _unpack(p, message.kind, RANK_AXIS[f])
                     for f, p in enumerate(pair))
            for n, pair in message.factors.items()}


def encode_with_feedback(payload: Payload, residual: Payload | None, kind: str,
                         ratio: float | None = None) -> tuple[Message, Payload]:
    """Error-feedback compression: encode x + e, and keep e' = (x + e) - decode(message).

    ``residual`` is the previous call's (None at the start: e = 0); it has the payload's
    structure and float32 tensors. A factor that does not travel this time (None in the payload,
    as FedSA's A or an alternating phase's idle factor) keeps its residual for the next time it
    does. Identity, per travelling factor: decode(message) + e' == x + e (up to float32 rounding
    of the subtraction), so after T calls sum_t decode_t = sum_t x_t + e_0 - e_T: the running
    sum of what arrived tracks the running sum of what was meant to, within one residual.

    For DeCAF what travels is the factors (A_j, B_j), compressed before the receiver forms
    B_j A_j, so each factor has its own residual; this is exact for DLoRA's factor averages but
    not for DeCAF's product: the receiver gets (B - e_B)(A - e_A) = B A - e_B A - B e_A + e_B e_A,
    and feeding e_A and e_B back separately does not cancel the cross terms. Also DeCAF's TSVD
    re-factorizes every round, so (A, B) is only defined up to an r x r change of basis; a
    residual kept in one round's basis is added to factors that may be in another. Error
    feedback is therefore a heuristic for DeCAF, with no guarantee on the product.
    """
    residual = residual or {}
    target: Payload = {}
    for n, pair in payload.items():
        kept = residual.get(n, (None, None))
        target[n] = tuple(None if x is None else _plus(x, e, n) for x, e in zip(pair, kept))
    message = encode(target, kind, ratio)
    got = decode(message)
    new: Payload = dict(residual)
    for n, pair in target.items():
        kept = residual.get(n, (None, None))
        new[n] = tuple(e if t is None else t - g for t, g, e in zip(pair, got[n], kept))
    return message, new


def _plus(x: Tensor, e: Tensor | None, name: str) -> Tensor:
    x = x.detach().to("cpu", torch.float32)
    if e is None:
        return x
    if e.shape != x.shape:
        raise ValueError(f"residual of {name!r} has shape {tuple(e.shape)}, the factor "
                         f"{tuple(x.shape)}: a residual belongs to one agent's factors")
    return x + e


def _pack(x: Tensor, kind: str, ratio: float | None, axis: int) -> Packed:
    x = x.detach().to("cpu", torch.float32)
    shape = tuple(x.shape)
    if kind == "float32":
        return Packed(shape, x.numpy())
    if kind == "float16":
        return Packed(shape, x.numpy().astype(np.float16))
    if kind == "bfloat16":
        return Packed(shape, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    if kind == "int8":
        return _pack_int8(x.numpy(), axis)
    return _pack_topk(x.numpy(), ratio)


def _pack_int8(v: np.ndarray, axis: int) -> Packed:
    if v.ndim != 2:
        raise ValueError(f"int8 compresses 2-D factors, got shape {v.shape}")
    scale = (np.abs(v).max(axis=1 - axis, initial=0.0) / 127.0).astype(np.float32)
    div = np.expand_dims(np.where(scale > 0, scale, 1.0), 1 - axis)
    q = np.clip(np.rint(v / div), -127, 127).astype(np.int8)
    return Packed(v.shape, q, scale=scale)


def _pack_topk(v: np.ndarray, ratio: float) -> Packed:
    flat = v.reshape(-1)
    n = flat.size
    k = min(n, max(1, math.ceil(ratio * n)))
    itype = np.min_scalar_type(max(n - 1, 0))
    if k == n:
        idx = np.arange(n)
    else:
        mag = np.abs(flat)
        threshold = np.partition(mag, n - k)[n - k]           # the k-th largest |x|
        above = np.flatnonzero(mag > threshold)
        ties = np.flatnonzero(mag == threshold)[:k - above.size]  # lowest indices win ties
        idx = np.sort(np.concatenate([above, ties]))
    return Packed(v.shape, flat[idx].astype(np.float32), index=idx.astype(itype))


def _unpack(p: Packed, kind: str, axis: int) -> Tensor:
    if kind == "float32":
        # Arrays read from Ray's object store are read-only views; a mix only reads them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(p.data)
    if kind == "float16":
        out = p.data.astype(np.float32)
    elif kind == "bfloat16":
        out = (p.data.astype(np.uint32) << 16).view(np.float32)
    elif kind == "int8":
        out = p.data.astype(np.float32) * np.expand_dims(p.scale, 1 - axis)
    else:
        out = np.zeros(math.prod(p.shape), dtype=np.float32)
        out[p.index] = p.data
        out = out.reshape(p.shape)
    return torch.from_numpy(out)
