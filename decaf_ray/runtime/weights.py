"""A CLIP task's checkpoint file travels with the run, through Ray's object store, not by path.

A path is only good on the node that has the file: a sweep trial or a host on another node of a
cluster would find nothing there, or, worse, a different stand-in cached under the same name (a
stand-in trained on another CPU type differs; see docs/results). So the driver resolves
``pretrain:<spec>`` once (``pretrain.resolve_checkpoint``), puts the file's bytes in the object
store with their sha256 (``ship``), and every process that builds the task writes them to a local
file named by that digest (``receive``) and points ``task.checkpoint`` at it: every host on every
node loads the same bytes, checked.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decaf_ray.experiment_config import ExperimentConfig

ENV_DIR = "DECAF_RAY_WEIGHTS_DIR"
"""Where received checkpoints are written (default: ``<tmp>/decaf-ray-weights``)."""


@dataclass(frozen=True)
class Shipped:
    """A checkpoint file in the object store: ``ref`` to its bytes, their sha256, its suffix."""

    ref: Any
    digest: str
    suffix: str


def ship(cfg: ExperimentConfig) -> Shipped | None:
    """Put the CLIP checkpoint file of ``cfg`` in the object store; None when the task has no
    local checkpoint file (other tasks, open_clip tags, random init). Call on the driver, after
    ``pretrain.resolve_checkpoint``, with Ray connected."""
    import ray

    path = getattr(cfg.task, "checkpoint", None)
    if getattr(cfg.task, "kind", None) != "clip" or not path:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        return None  # the task build names the problem (task.checkpoint)
    data = path.read_bytes()
    return Shipped(ray.put(data), hashlib.sha256(data).hexdigest(), path.suffix)


def receive(config: dict, shipped: Shipped | None) -> dict:
    """``config`` (a plain config dict) with ``task.checkpoint`` pointing at a local copy of the
    shipped bytes, written once per node and digest; unchanged when nothing was shipped.

    Raises:
        RuntimeError: the bytes read back do not have the digest they were shipped with.
    """
    if shipped is None:
        return config
    import ray

    folder = Path(os.environ.get(ENV_DIR) or Path(tempfile.gettempdir()) / "decaf-ray-weights")
    target = folder / f"{shipped.digest}{shipped.suffix}"
    if not target.is_file():
        data = ray.get(shipped.ref)
        if hashlib.sha256(data).hexdigest() != shipped.digest:
            raise RuntimeError(f"checkpoint bytes arrived corrupted (sha256 is not "
                               f"{shipped.digest})")
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)  # atomic: processes of one node may receive at once
    return {**config, "task": {**config["task"], "checkpoint": str(target)}}
