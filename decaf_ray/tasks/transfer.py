"""Many small tensors between the host and a GPU in one copy each way.

A step moves every adapted module's factors to the GPU and every gradient back: for a model
with hundreds of LoRA modules, one copy (and, coming back, one synchronisation) per tensor costs
more than the arithmetic. ``to_device`` packs the host tensors into one pinned flat buffer and
copies it once; ``to_host`` concatenates the device tensors on the device and copies them back
once. Off CUDA (the CPU path) both are the plain per-tensor copies, so CPU numbers are exactly
those of ``tensor.to(device)`` / ``tensor.float().cpu()``; on CUDA the values are the same too
(the packing only concatenates; no arithmetic).

The pinned buffers are kept per (device, direction) and reused; an event recorded after each copy
makes the next use wait until the GPU has finished reading (or writing) the previous contents.
"""

from __future__ import annotations

import torch
from torch import Tensor

_PINNED: dict[tuple[str, str], tuple[Tensor, torch.cuda.Event | None]] = {}
"""(device and dtype, direction) -> the pinned host buffer and the event of its last copy."""


def _pinned(device: torch.device, direction: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A pinned host buffer of ``numel`` elements of ``dtype``, free to overwrite: the copy that
    last went through it has finished."""
    key = (f"{device}:{dtype}", direction)
    buf, event = _PINNED.get(key, (None, None))
    if event is not None:
        event.synchronize()
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, pin_memory=True)
    _PINNED[key] = (buf, None)
    return buf[:numel]


def _queued(device: torch.device, direction: str, dtype: torch.dtype) -> torch.cuda.Event:
    """Record that a copy through (device, direction)'s buffer was just queued on the current
    stream; the returned event completes when it has run."""
    key = (f"{device}:{dtype}", direction)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    _PINNED[key] = (_PINNED[key][0], event)
    return event


def to_device(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """``[t.to(device) for t in tensors]``, as one host-to-device copy when ``device`` is CUDA
    and the tensors are host tensors of one dtype (else tensor by tensor). Shapes and dtypes are
    kept; the results on CUDA are views of one device buffer."""
    if (device.type != "cuda" or not tensors or any(t.device.type != "cpu" for t in tensors)
            or len({t.dtype for t in tensors}) != 1):
        return [t.to(device) for t in tensors]
    dtype = tensors[0].dtype
    total = sum(t.numel() for t in tensors)
    host = _pinned(device, "h2d", total, dtype)
    torch.cat([t.detach().reshape(-1) for t in tensors], out=host)
    flat = host.to(device, non_blocking=True)
    _queued(device, "h2d", dtype)  # the next step waits for it before refilling the buffer
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def to_host(tensors: list[Tensor]) -> list[Tensor]:
    """``[t.detach().float().cpu().clone() for t in tensors]``: float32 host copies with storage
    of their own; from CUDA as one device-to-host copy and one synchronisation."""
    if not tensors or any(t.device.type != "cuda" for t in tensors) or \
            len({t.device for t in tensors}) != 1:
        return [t.detach().float().cpu().clone() for t in tensors]
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    host = _pinned(device, "d2h", flat.numel(), torch.float32)
    host.copy_(flat, non_blocking=True)
    _queued(device, "d2h", torch.float32).synchronize()  # the values are needed now
    out, offset = [], 0
    for t in tensors:
        out.append(host[offset:offset + t.numel()].view(t.shape).clone())
        offset += t.numel()
    return out
