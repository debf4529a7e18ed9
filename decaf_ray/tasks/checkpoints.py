"""Stand-in CLIP checkpoints on disk: the cache, atomic publishing, and reading them back.

A pretrained stand-in is a directory holding ``model.safetensors`` (the open_clip state dict),
``model_config.json`` (the open_clip model config) and ``pretrain.json`` (what trained it). The
cache keeps one per pretrain config under
``${DECAF_RAY_CACHE:-~/.cache/decaf-ray}/pretrained/<name>-<config hash>``.

Reading is here; training is ``decaf_ray.pretrain``. A CLIP task config may name a stand-in as
``checkpoint: pretrain:<preset or pretrain YAML>``: the driver resolves it once
(``decaf_ray.pretrain.resolve_checkpoint``, training on a miss) into the concrete
``model.safetensors`` path; a task build given the ``pretrain:`` form only reads the cache
(``cached_task_fields``) and never trains. ``checkpoint_digest`` lets a driver ship the bytes to
hosts on other nodes and check them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from decaf_ray.config import ConfigError
from decaf_ray.tasks.pretrain_config import as_config, config_hash

PRETRAIN_PREFIX = "pretrain:"
"""``task.checkpoint: pretrain:<spec>`` names a stand-in by its preset or pretrain YAML."""


# ---------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` or ``${DECAF_RAY_CACHE:-~/.cache/decaf-ray}``."""
    base = cache_dir if cache_dir is not None else os.environ.get("DECAF_RAY_CACHE") or \
        "~/.cache/decaf-ray"
    return Path(base).expanduser().absolute()


def cached_path(name_or_cfg: Any, cache_dir: str | Path | None = None) -> Path:
    """Where ``decaf_ray.pretrain.ensure_pretrained`` keeps a config's checkpoint (whether or not it exists yet)."""
    cfg = as_config(name_or_cfg)
    return cache_root(cache_dir) / "pretrained" / f"{cfg.resolved_name}-{config_hash(cfg)}"


def publish(files: dict[str, Any], target: Path, use_existing: bool) -> bool:
    """Write ``files`` into a temporary sibling of ``target`` and rename it to ``target``.

    Returns True when this call created ``target``; False when ``use_existing`` and a complete
    ``target`` appeared meanwhile (another process won the race; ours is discarded).
    """
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(files["model.safetensors"], str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "producer": "decaf_ray.pretrain"})
        for name in ("model_config.json", "pretrain.json"):
            (tmp / name).write_text(json.dumps(files[name], indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~umask)  # mkdtemp and safetensors make them private
        os.chmod(tmp, 0o777 & ~umask)
        try:
            os.rename(tmp, target)  # atomic; replaces only an empty directory
        except OSError:
            if use_existing and (target / "pretrain.json").is_file():
                return False
            raise ConfigError("out", f"{target} appeared while training and is not empty; "
                              "nothing was written") from None
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (fcntl) where available; a no-op elsewhere. Correctness never
    depends on it (the rename is atomic); it only saves a second caller from training again."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fh = open(path, "a+")
    except OSError:  # read-only or odd file system: go on without the lock
        yield
        return
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        fh.close()  # releases the lock


# ---------------------------------------------------------------------------- reading


def checkpoint_task_fields(out_dir: str | Path) -> dict[str, Any]:
    """``{"checkpoint": <abs path>/model.safetensors, "model_config": {...}}``: the CLIP task
    fields that load a pretrained directory (merge them into ``task:``).

    Raises:
        ConfigError: ``out_dir`` is not a complete pretrain output.
    """
    out = Path(out_dir).expanduser().absolute()
    ckpt, mc = out / "model.safetensors", out / "model_config.json"
    if not ckpt.is_file() or not mc.is_file():
        raise ConfigError("checkpoint", f"{out} has no model.safetensors and model_config.json "
                          "(not a decaf-ray pretrain output)")
    return {"checkpoint": str(ckpt), "model_config": json.loads(mc.read_text())}


def checkpoint_digest(path: str | Path) -> str:
    """The sha256 (64 hex digits) of a checkpoint file's bytes: equal digests, equal weights."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def standin_spec(checkpoint: str | None) -> str | None:
    """``<spec>`` of a ``pretrain:<spec>`` checkpoint value; None for anything else."""
    if checkpoint is None or not checkpoint.startswith(PRETRAIN_PREFIX):
        return None
    return checkpoint[len(PRETRAIN_PREFIX):]


def cached_task_fields(spec: str, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """``checkpoint_task_fields`` of the cached stand-in ``spec`` (a preset name or a pretrain
    YAML), read only: nothing is trained or written.

    Raises:
        ConfigError("task.checkpoint"): ``spec`` names no pretrain config, or its cache entry
            does not exist yet.
    """
    try:
        cfg = as_config(spec)
    except ConfigError as e:
        raise ConfigError("task.checkpoint", f"pretrain:{spec}: {e.message}") from None
    entry = cached_path(cfg, cache_dir)
    if not (entry / "pretrain.json").is_file():
        yaml = spec if Path(spec).expanduser().is_file() else f"sweeps/{spec}.yaml"
        raise ConfigError("task.checkpoint", f"pretrain:{spec} is not in the cache ({entry}) and "
                          f"a task build never trains; run `decaf-ray pretrain {yaml}` first, or "
                          "resolve it in the driver (decaf_ray.pretrain.resolve_checkpoint)")
    return checkpoint_task_fields(entry)
