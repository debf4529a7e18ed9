"""The config of a stand-in CLIP pretraining (``decaf-ray pretrain CONFIG``) and its identity.

``PretrainConfig`` says what ``decaf_ray.pretrain`` trains, on what data, for how long;
``config_hash`` names what it trains (the fields that change the weights or the test accuracy),
which keys the checkpoint cache (``decaf_ray.tasks.checkpoints``). Its own module so that the
cache can be read (by a CLIP task build) without importing the training code.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from decaf_ray.config import ConfigError, load_as, require
from decaf_ray.tasks.clip.config import CLIPConfig
from decaf_ray.tasks.image_data import FOLDER_DATASETS

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
"""Names ``as_config`` (and so ``decaf_ray.pretrain.ensure_pretrained``) accepts besides a config,
a mapping or a YAML path."""

DATASETS = ("digits", "fashion_mnist", "imagefolder", "ucf101", "flowers102", "food101")

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
    cache of ``decaf_ray.pretrain.ensure_pretrained`` (reused if already there)."""
    threads: int | None = None
    """torch threads while training; null: torch's default."""
    device: str = "auto"
    eval_batch_size: int = 512

    def __post_init__(self):
        require(self.kind == "pretrain", "kind", "must be 'pretrain'")
        require(self.name is None or (isinstance(self.name, str) and
                                      re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)
                                      is not None), "name",
                "letters, digits, '.', '_' and '-' (a directory name), or null")
        _check_model_config(self.model_config)
        require(self.dataset in DATASETS, "dataset", f"got {self.dataset!r}; valid: "
                f"{', '.join(DATASETS)}")
        require(self.logit_scale is None or self.logit_scale > 0, "logit_scale",
                "must be > 0 or null (learned)")
        require(self.steps >= 1, "steps", f"must be >= 1 (got {self.steps})")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
                "two numbers in [0, 1)")
        require(self.schedule in ("constant", "cosine"), "schedule", "constant or cosine")
        require(0 <= self.warmup_steps < self.steps, "warmup_steps", "must be in [0, steps)")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        require(self.out is None or (isinstance(self.out, str) and self.out.strip() != ""),
                "out", "a directory path or null")
        self.data_config()  # the CLIP task's own checks of the data fields (same field names)

    def data_config(self):
        """The ``CLIPConfig`` of the data part: what ``image_data.load`` and the task read."""
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


def _check_model_config(mc: Any) -> None:
    require(isinstance(mc, Mapping), "model_config", "an open_clip model config mapping")
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(mc)
    require(not missing, "model_config", f"missing {', '.join(sorted(missing))}")
    require(isinstance(mc["vision_cfg"], Mapping) and isinstance(mc["text_cfg"], Mapping),
            "model_config", "vision_cfg and text_cfg must be mappings")
    text = mc["text_cfg"]
    require("hf_tokenizer_name" in text or text.get("vocab_size", 49408) >= 49408,
            "model_config.text_cfg.vocab_size", "must be >= 49408, the size of open_clip's "
            "tokenizer")
    require("multimodal_cfg" not in mc and "timm_model_name" not in mc["vision_cfg"],
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
    if cfg.dataset in FOLDER_DATASETS:  # root is the data itself; elsewhere only where it is kept
        d["root"] = str(Path(cfg.root).expanduser().resolve())
    d["format_version"] = FORMAT_VERSION
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def as_config(name_or_cfg: Any) -> PretrainConfig:
    """A ``PretrainConfig`` from itself, a mapping, a YAML path, or a preset name (``PRESETS``).

    Raises:
        ConfigError("pretrained"): a string that is neither a file nor a preset.
    """
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
