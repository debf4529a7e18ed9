"""Which accelerator a process may use: exactly what Ray assigned to it.

On a GPU node Ray sets ``CUDA_VISIBLE_DEVICES`` for a worker that reserved GPUs, so that worker's
``cuda:0`` is its first assigned GPU, and fractional reservations of one GPU share its id. A worker
that reserved none is *not* hidden from the node's GPUs (Ray 2.60), so without care every such
process (a zero-GPU host, a sweep trial's driver, the coordinator) would pick ``cuda:0`` and load
its model there. ``hide_unassigned_gpus`` closes that: called first thing in every decaf-ray actor,
it leaves such a process seeing no GPU at all, and ``resolve("auto")`` then gives the CPU.

Outside Ray (a driver, ``runtime.kind: inprocess``) nothing is hidden: ``auto`` is CUDA when torch
sees a GPU.
"""

from __future__ import annotations

import os

import torch

NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
"""Set on a cluster, Ray leaves ``CUDA_VISIBLE_DEVICES`` alone; ids then index all the node's GPUs."""


def assigned_gpu_ids() -> list[str] | None:
    """The GPU ids Ray assigned to this worker process (``[]`` if it reserved none), or None
    when this process is not a Ray worker (a driver, or no Ray at all)."""
    import sys

    if "ray" not in sys.modules:  # a process that never imported Ray is no Ray worker
        return None
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    return list(ctx.get_accelerator_ids().get("GPU", []))


def hide_unassigned_gpus() -> None:
    """In a Ray worker that reserved no GPU, hide every GPU from this process (before CUDA is
    initialised; afterwards it is too late, and this raises). A no-op in a driver and in a
    worker that holds GPUs (Ray already restricted what it sees)."""
    ids = assigned_gpu_ids()
    if ids is None or ids:
        return
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in a Ray worker that reserved no GPU; call "
                           "devices.hide_unassigned_gpus() before anything touches CUDA")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def resolve(spec: str) -> torch.device:
    """The torch device a task config's ``device`` names.

    ``auto``: in a Ray worker, the first GPU Ray assigned to it when torch can see it, else the
    CPU (a worker that reserved no GPU always gets the CPU); outside Ray, ``cuda`` if available,
    else the CPU. ``cpu``, ``cuda``, ``cuda:N``, ``mps`` are taken as given (``cuda:N`` counts the
    GPUs this process sees: in a Ray worker, the ones assigned to it).
    """
    if spec != "auto":
        return torch.device(spec)
    ids = assigned_gpu_ids()
    if ids is not None and not ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if ids and os.environ.get(NOSET, "0") not in ("", "0"):
        return torch.device(f"cuda:{ids[0]}")  # Ray left every GPU visible: index by its id
    return torch.device("cuda")


def visible() -> str | None:
    """This process's ``CUDA_VISIBLE_DEVICES`` (None when unset: every GPU is visible)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def set_deterministic(on: bool) -> None:
    """``runtime.deterministic``: deterministic kernels in this process (before CUDA starts, so
    cuBLAS reads its workspace setting)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)  # off again for the next run of this process
