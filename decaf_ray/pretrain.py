"""Pretrain a small open_clip CLIP from scratch: a stand-in foundation model for the CLIP task.

A randomly initialised CLIP learns nothing across non-IID agents (10 agents holding one digit
each stay at chance under every algorithm); the same model first trained for a few minutes on
Fashion-MNIST is a usable base for them. ``pretrain`` trains ALL weights of an open_clip model
with the CLIP task's own classifier, the cosine similarity between the image features and the
text features of ``prompt.format(class_name)`` per class times a logit scale, under
cross-entropy, then evaluates on the test split and saves into ``out/``::

    model.safetensors   the open_clip state dict (safetensors only)
    model_config.json   the open_clip model config (embed_dim, vision_cfg, text_cfg)
    pretrain.json       the resolved config, test accuracy and loss, steps, wall time, losses

The directory appears whole or not at all (written to a temporary sibling, then renamed).

The data part reuses the CLIP task: a ``CLIPConfig`` is built from this config's data fields and
``decaf_ray.tasks.image_data`` loads, splits and preprocesses the images exactly as the task will
(same resize, crop, normalisation and tokenizer), so a checkpoint drops into the task as is::

    task:
      kind: clip
      dataset: digits
      checkpoint: <out>/model.safetensors      # checkpoint_task_fields(out) gives both fields
      model_config: {...}                      # the contents of <out>/model_config.json

``ensure_pretrained(name_or_cfg)`` trains a config once and caches it under
``${DECAF_RAY_CACHE:-~/.cache/decaf-ray}/pretrained/<name>-<hash of the config>``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from decaf_ray.config import ConfigError, load_as

FORMAT_VERSION = 1
"""Part of the cache hash: bump when a change to the training code changes the weights."""

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8,
                   "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4,
                 "layers": 2},
}
"""The 7.6M-parameter stand-in (6.3M of it the token embedding of open_clip's 49,408 tokens)."""

PRESETS: dict[str, dict[str, Any]] = {
    # The same model and recipe as sweeps/pretrain-fmnist.yaml (a test checks they hash equal).
    "pretrain-fmnist": {"name": "pretrain-fmnist", "dataset": "fashion_mnist"},
}
"""Names ``ensure_pretrained`` accepts besides a config, a mapping or a YAML path."""

DATASETS = ("digits", "fashion_mnist", "imagefolder", "ucf101", "flowers102", "food101")
FILE_DATASETS = ("imagefolder", "ucf101")
"""Datasets whose ``root`` is the data itself (part of the cache hash); for the others ``root``
only says where a standard dataset is stored."""

# Fields that change neither the weights nor the evaluation: left out of the cache hash.
_NOT_HASHED = ("name", "out", "threads", "device", "download", "root", "eval_batch_size")


@dataclass(frozen=True)
class PretrainConfig:
    """``decaf-ray pretrain CONFIG``: what to train, on what, for how long, and where it goes."""

    kind: Literal["pretrain"] = "pretrain"
    """Marks the file as a pretrain config (experiment and sweep files have no ``kind``)."""
    name: str | None = None
    """Names the cache entry (``<name>-<hash>``); null: ``clip-<dataset>``."""
    # ---- model
    model_config: dict[str, Any] = field(
        default_factory=lambda: copy.deepcopy(DEFAULT_MODEL_CONFIG))
    """open_clip model config (embed_dim, vision_cfg, text_cfg); random init from ``seed``."""
    # ---- data (the CLIP task's loaders; see decaf_ray.tasks.image_data)
    dataset: Literal["digits", "fashion_mnist", "imagefolder", "ucf101", "flowers102",
                     "food101"] = "fashion_mnist"
    root: str | None = None
    """Data folder. fashion_mnist: IDX files (.gz or plain) in root or root/FashionMNIST/raw;
    null tries /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), then
    ~/.cache/decaf_ray/data. Required for imagefolder and ucf101."""
    download: bool = True
    """torchvision datasets download into root when missing."""
    class_names: list[str] | None = None
    split_seed: int = 0
    test_fraction: float = 0.2
    """For datasets without an official split (digits, imagefolder): seeded stratified split."""
    max_per_class: int | None = None
    test_samples: int | None = None
    """Cap on the test images evaluated (a seeded subset); null = all."""
    prompt: str = "a photo of a {}."
    augment: bool = False
    """RandomResizedCrop(crop_scale) (+ flip when hflip) on training images. Off by default: in
    400-step pilots on Fashion-MNIST it cost 14 points of test accuracy (63% against 77%) and
    a third more time; the stand-in sees each image fewer than twice."""
    hflip: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    # ---- objective and optimiser
    logit_scale: float | None = 100.0
    """Fixed scale of the cosine logits (the CLIP task's default); null: learn the model's own
    ``logit_scale`` (exp, clamped at 100), as CLIP does."""
    steps: int = 1600
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    """AdamW decoupled decay on matrices and embeddings (not on biases, norms, logit_scale)."""
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    seed: int = 0
    """Seeds the init, the batch order and the augmentation."""
    log_every: int = 50
    """Steps per entry of the loss curve in pretrain.json."""
    # ---- where and how
    out: str | None = None
    """Output directory (must not exist or be empty); null with ``decaf-ray pretrain``: the
    cache of ``ensure_pretrained`` (reused if already there)."""
    threads: int | None = None
    """torch threads while training; null: torch's default."""
    device: str = "auto"
    eval_batch_size: int = 512

    def __post_init__(self):
        _require(self.kind == "pretrain", "kind", "must be 'pretrain'")
        _require(self.name is None or (isinstance(self.name, str) and
                                       re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)
                                       is not None), "name",
                 "letters, digits, '.', '_' and '-' (a directory name), or null")
        _check_model_config(self.model_config)
        _require(self.dataset in DATASETS, "dataset", f"got {self.dataset!r}; valid: "
                 f"{', '.join(DATASETS)}")
        _require(self.logit_scale is None or self.logit_scale > 0, "logit_scale",
                 "must be > 0 or null (learned)")
        _require(self.steps >= 1, "steps", f"must be >= 1 (got {self.steps})")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        _require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
                 "two numbers in [0, 1)")
        _require(self.schedule in ("constant", "cosine"), "schedule", "constant or cosine")
        _require(0 <= self.warmup_steps < self.steps, "warmup_steps", "must be in [0, steps)")
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        _require(self.out is None or (isinstance(self.out, str) and self.out.strip() != ""),
                 "out", "a directory path or null")
        self.data_config()  # the CLIP task's own checks of the data fields (same field names)

    def data_config(self):
        """The ``CLIPConfig`` of the data part: what ``image_data.load`` and the task read."""
        from decaf_ray.tasks.clip import CLIPConfig

        return CLIPConfig(dataset=self.dataset, model_config=self.model_config, prompt=self.prompt,
                          logit_scale=self.logit_scale or 100.0, class_names=self.class_names,
                          root=self.root, download=self.download, split_seed=self.split_seed,
                          test_fraction=self.test_fraction, max_per_class=self.max_per_class,
                          test_samples=self.test_samples, augment=self.augment, hflip=self.hflip,
                          crop_scale=list(self.crop_scale), eval_batch_size=self.eval_batch_size,
                          device=self.device)

    @property
    def resolved_name(self) -> str:
        return self.name or f"clip-{self.dataset}"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML/JSON-ready) that ``load_pretrain_config`` reads back equal."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


def _check_model_config(mc: Any) -> None:
    _require(isinstance(mc, Mapping), "model_config", "an open_clip model config mapping")
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(mc)
    _require(not missing, "model_config", f"missing {', '.join(sorted(missing))}")
    _require(isinstance(mc["vision_cfg"], Mapping) and isinstance(mc["text_cfg"], Mapping),
             "model_config", "vision_cfg and text_cfg must be mappings")
    text = mc["text_cfg"]
    _require("hf_tokenizer_name" in text or text.get("vocab_size", 49408) >= 49408,
             "model_config.text_cfg.vocab_size", "must be >= 49408, the size of open_clip's "
             "tokenizer")
    _require("multimodal_cfg" not in mc and "timm_model_name" not in mc["vision_cfg"],
             "model_config", "only open_clip ViT CLIP towers (no CoCa, no timm vision towers)")


# ---------------------------------------------------------------------------- config I/O


def load_pretrain_config(source: str | Path | Mapping[str, Any],
                         overrides: list[str] | None = None) -> PretrainConfig:
    """A ``PretrainConfig`` from a YAML file (safe loader) or a mapping, with ``key=value``
    overrides (YAML values, like ``--set``); errors name the field."""
    return load_as(PretrainConfig, source, overrides)


def config_hash(cfg: PretrainConfig) -> str:
    """12 hex digits identifying what the config trains (the fields that change the weights or
    the test accuracy; not name, out, threads, device, download, eval batch, nor the root of a
    standard dataset)."""
    d = cfg.to_dict()
    for key in _NOT_HASHED:
        d.pop(key)
    if cfg.dataset in FILE_DATASETS:
        d["root"] = str(Path(cfg.root).expanduser().resolve())
    d["format_version"] = FORMAT_VERSION
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _as_config(name_or_cfg: Any) -> PretrainConfig:
    if isinstance(name_or_cfg, PretrainConfig):
        return name_or_cfg
    if isinstance(name_or_cfg, Mapping):
        return load_pretrain_config(name_or_cfg)
    if isinstance(name_or_cfg, (str, Path)):
        path = Path(name_or_cfg).expanduser()
        if path.is_file():
            return load_pretrain_config(path)
        if str(name_or_cfg) in PRESETS:
            return load_pretrain_config(PRESETS[str(name_or_cfg)])
        raise ConfigError("pretrained", f"{str(name_or_cfg)!r} is neither a config file nor a "
                          f"preset ({', '.join(PRESETS)})")
    raise TypeError(f"expected a PretrainConfig, a mapping, a YAML path or a preset name, got "
                    f"{type(name_or_cfg).__name__}")


# ---------------------------------------------------------------------------- training


def pretrain(cfg: PretrainConfig, out: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train all weights of ``cfg.model_config`` on ``cfg.dataset``, evaluate, save into ``out``
    (default ``cfg.out``), and return what ``pretrain.json`` holds plus ``out`` and
    ``checkpoint`` paths.

    Raises:
        ConfigError: no output directory, or one that already holds files; the data cannot be
            loaded; the model config does not build. Raised before any training or writing.
    """
    target = out if out is not None else cfg.out
    if target is None:
        raise ConfigError("out", "is required (or use ensure_pretrained(cfg) to train into the "
                          "cache)")
    target = Path(target).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError("out", f"{target} already exists and is not empty; choose another "
                          "directory or remove it")
    result, files = _train(dataclasses.replace(cfg, out=str(target)), progress)
    _publish(files, target, use_existing=False)
    return {**result, "out": str(target), "checkpoint": str(target / "model.safetensors")}


def _train(cfg: PretrainConfig, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and evaluate in memory; returns (pretrain.json contents, {file name: content})."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from decaf_ray.tasks import clip, image_data

    data_cfg = cfg.data_config()
    arch, _ = clip.architecture(data_cfg)
    try:
        data = image_data.load(data_cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise ConfigError("dataset", f"{cfg.dataset}: {e}") from None
    if len(data.train) == 0 or len(data.test) == 0:
        raise ConfigError("dataset", f"{cfg.dataset}: empty train or test split")
    size = arch["vision_cfg"].get("image_size", 224)
    size = int(size if isinstance(size, int) else size[0])
    pre = image_data.Preprocess(size, clip.OPENAI_MEAN, clip.OPENAI_STD, cfg.augment, cfg.hflip,
                                tuple(cfg.crop_scale), cache_mb=1024)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if cfg.device == "auto" else cfg.device)
    prompts = [cfg.prompt.format(c) for c in data.class_names]
    tokens = _tokenizer(arch)(prompts).to(dev)
    labels = torch.as_tensor(data.train.labels)

    start = time.perf_counter()
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))  # leave the caller's RNG alone
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
            stack.callback(torch.set_num_threads, threads)
        torch.manual_seed(cfg.seed)
        try:
            model = clip.instantiate(arch).to(dev)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise ConfigError("model_config", f"open_clip cannot build it: {e}") from None
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                betas=tuple(cfg.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
        order = _batches(len(labels), cfg.batch_size, cfg.steps, cfg.seed)
        losses: list[list[float]] = []
        window: list[float] = []
        model.train()
        bar = tqdm(total=cfg.steps, desc=f"pretrain {cfg.resolved_name}", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        for step in range(1, cfg.steps + 1):
            idx = next(order)
            x = pre.batch(data.train, idx, train=True).to(dev)
            y = labels[idx].to(dev)
            img = model.encode_image(x, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            loss = F.cross_entropy(_scale(model, cfg) * img @ txt.T, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"pretrain loss is {value} at step {step}; lower lr")
            window.append(value)
            if step % cfg.log_every == 0 or step == cfg.steps:
                losses.append([step, float(np.mean(window))])
                bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
                window = []
            bar.update(1)
        bar.close()
        train_time = time.perf_counter() - start
        metrics = _evaluate(model, pre, data.test, tokens, _scale(model, cfg), cfg.eval_batch_size,
                            dev)
    wall = time.perf_counter() - start

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    result = {
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "steps": cfg.steps,
        "wall_time_s": round(wall, 2),
        "train_time_s": round(train_time, 2),
        "dataset": cfg.dataset,
        "class_names": list(data.class_names),
        "n_train": len(data.train),
        "n_test": len(data.test),
        "params": n_params,
        "logit_scale": float(torch.as_tensor(_scale(model, cfg)).detach()),
        "losses": losses,
        "config_hash": config_hash(cfg),
        "config": cfg.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "threads": cfg.threads or threads,
        "device": str(dev),
    }
    files = {"model.safetensors": state, "model_config.json": arch, "pretrain.json": result}
    return result, files


def _tokenizer(arch: dict[str, Any]):
    """The tokenizer the CLIP task uses for a custom ``model_config``."""
    import open_clip

    text = arch["text_cfg"]
    if "hf_tokenizer_name" in text:
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"],
                                               context_length=text.get("context_length", 77))
    return open_clip.tokenizer.SimpleTokenizer(context_length=text.get("context_length", 77))


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no decay on biases, norms, logit_scale and other 1-d parameters."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "logit_scale" in name or ".ln_" in f".{name}" or "bias" in name
        (plain if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def _lr_factor(cfg: PretrainConfig, step: int) -> float:
    """Multiplier of ``lr`` for the update after ``step`` updates (LambdaLR's convention)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Batches of training indices: seeded epochs of permutations, batches may span epochs."""
    rng = np.random.default_rng([seed, 7])
    buf = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(buf) < batch_size:
            buf = np.concatenate([buf, rng.permutation(n)])
        idx, buf = buf[:batch_size], buf[batch_size:]
        yield idx


def _scale(model, cfg: PretrainConfig):
    """The logit scale: fixed, or the model's learned one (exp, clamped at 100, as CLIP)."""
    if cfg.logit_scale is not None:
        return cfg.logit_scale
    return model.logit_scale.exp().clamp(max=100.0)


def _evaluate(model, pre, test, tokens, scale, batch_size: int, dev) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    n = len(test)
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        scale = float(scale)
        txt = model.encode_text(tokens, normalize=True)
        for s in range(0, n, batch_size):
            part = np.arange(s, min(n, s + batch_size))
            img = model.encode_image(pre.batch(test, part, train=False).to(dev), normalize=True)
            logits = scale * img @ txt.T
            y = torch.as_tensor(test.labels[part], device=dev)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return {"test_accuracy": correct / n, "test_loss": loss_sum / n}


def _versions() -> dict[str, str]:
    import open_clip
    import torch

    return {"torch": torch.__version__, "open_clip": open_clip.__version__}


# ---------------------------------------------------------------------------- saving


def _publish(files: dict[str, Any], target: Path, use_existing: bool) -> bool:
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


# ---------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` or ``${DECAF_RAY_CACHE:-~/.cache/decaf-ray}``."""
    base = cache_dir if cache_dir is not None else os.environ.get("DECAF_RAY_CACHE") or \
        "~/.cache/decaf-ray"
    return Path(base).expanduser().absolute()


def cached_path(name_or_cfg: Any, cache_dir: str | Path | None = None) -> Path:
    """Where ``ensure_pretrained`` keeps a config's checkpoint (whether or not it exists yet)."""
    cfg = _as_config(name_or_cfg)
    return cache_root(cache_dir) / "pretrained" / f"{cfg.resolved_name}-{config_hash(cfg)}"


def ensure_pretrained(name_or_cfg: Any, cache_dir: str | Path | None = None,
                      progress: bool = True) -> Path:
    """The checkpoint directory of a pretrain config, trained on first use and cached.

    ``name_or_cfg``: a ``PretrainConfig``, a mapping, a YAML path, or a preset name from
    ``PRESETS`` (``pretrain-fmnist``). The directory is
    ``<cache_dir or ${DECAF_RAY_CACHE:-~/.cache/decaf-ray}>/pretrained/<name>-<hash>`` and holds
    model.safetensors, model_config.json, pretrain.json. Concurrent callers do not corrupt it:
    training goes to a temporary directory renamed into place; a caller finding the directory
    complete uses it; callers on the same machine wait for one another (a file lock) instead of
    training twice.
    """
    cfg = _as_config(name_or_cfg)
    final = cached_path(cfg, cache_dir)
    if (final / "pretrain.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / "pretrain.json").is_file():  # trained by whoever held the lock
            return final
        if final.exists() and not any(final.iterdir()):
            final.rmdir()
        _, files = _train(dataclasses.replace(cfg, out=str(final)), progress)
        _publish(files, final, use_existing=True)
    return final


@contextlib.contextmanager
def _file_lock(path: Path):
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


# ---------------------------------------------------------------------------- the CLIP task


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


# ---------------------------------------------------------------------------- CLI


def cli_pretrain(config_path: str, overrides: list[str], out: str | None) -> int:
    """``decaf-ray pretrain CONFIG [--set KEY=VALUE ...] [--out DIR]``.

    With ``--out`` (or ``out:`` in the config) trains into that directory (which must not exist
    or be empty); without, trains into the cache (``ensure_pretrained``; an existing entry is
    reused, not retrained). Prints the checkpoint, its test accuracy and the CLIP task fields.
    ConfigError propagates (the CLI maps it to exit status 2; nothing is written).
    """
    cfg = load_pretrain_config(config_path, overrides)
    if out is not None:
        cfg = dataclasses.replace(cfg, out=out)
    if cfg.out is None:
        cached = (cached_path(cfg) / "pretrain.json").is_file()
        target = ensure_pretrained(cfg)
        note = " (cached: already trained)" if cached else ""
    else:
        target = Path(pretrain(cfg)["out"])
        note = ""
    info = json.loads((target / "pretrain.json").read_text())
    fields = checkpoint_task_fields(target)
    print(f"pretrained {info['config'].get('name') or cfg.resolved_name}: {info['dataset']}, "
          f"{info['steps']} steps in {info['wall_time_s']:.1f}s{note}; "
          f"test_accuracy {info['test_accuracy']:.4f}, test_loss {info['test_loss']:.4f}")
    print(f"checkpoint: {fields['checkpoint']}")
    print("CLIP task fields (task: kind: clip, ...):")
    print(f"  checkpoint: {fields['checkpoint']}")
    print(f"  model_config: {json.dumps(fields['model_config'])}")
    return 0


__all__ = ["PretrainConfig", "DEFAULT_MODEL_CONFIG", "PRESETS", "load_pretrain_config",
           "config_hash", "pretrain", "ensure_pretrained", "cached_path", "cache_root",
           "checkpoint_task_fields", "cli_pretrain"]
