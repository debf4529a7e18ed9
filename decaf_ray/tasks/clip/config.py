"""The CLIP task's config: which open_clip model, where LoRA goes, the classifier, the data.

``decaf_ray.tasks.pretrain_config`` builds one too, from a stand-in pretraining's data fields, so
that pretraining reads, splits and preprocesses the images exactly as the task will.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from decaf_ray.config import require
from decaf_ray.tasks import image_data

TARGETS = {"q": ("attn.q_proj",), "k": ("attn.k_proj",), "v": ("attn.v_proj",),
           "out": ("attn.out_proj",), "mlp": ("mlp.c_fc", "mlp.c_proj")}
"""LoRA target name -> the module names it adapts in each attention block."""
ENCODERS = ("vision", "text")


@dataclass(frozen=True)
class CLIPConfig:
    """``task: {kind: clip, dataset: ..., ...}``; see the docstrings of the package
    ``decaf_ray.tasks.clip`` and of ``decaf_ray.tasks.image_data``."""

    dataset: Literal["digits", "fashion_mnist", "imagefolder", "ucf101", "flowers102", "food101"]
    kind: str = "clip"
    # ---- model
    model: str = "ViT-B-16"
    """open_clip architecture name (ignored when ``model_config`` is given)."""
    pretrained: str | None = None
    """open_clip pretrained tag of ``model`` (e.g. ``openai``, the paper's); null = no tag."""
    checkpoint: str | None = None
    """Local weights of the architecture: .safetensors, or a torch file loaded weights_only; or
    ``pretrain:<preset or pretrain YAML>``, a stand-in from ``decaf_ray.pretrain`` that the driver
    resolves to its file once (``decaf_ray.pretrain.resolve_checkpoint``)."""
    model_config: dict[str, Any] | None = None
    """A custom architecture in open_clip's format: embed_dim, vision_cfg, text_cfg."""
    init_seed: int = 0
    """Seeds the random init of weights no tag or checkpoint provides (same on every host)."""
    # ---- LoRA placement
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    """Per block: q, k, v (separate adapters), out (attention output), mlp (c_fc and c_proj)."""
    encoders: list[str] = field(default_factory=lambda: ["vision", "text"])
    blocks: list[int] | None = None
    """Block indices adapted in each encoder (negative counts from the end); null = all."""
    # ---- classifier
    prompt: str = "a photo of a {}."
    logit_scale: float = 100.0
    class_names: list[str] | None = None
    """Override the dataset's class names (in label order)."""
    # ---- data
    root: str | None = None
    """Data folder: required for imagefolder and ucf101; torchvision datasets download here."""
    download: bool = True
    """torchvision datasets (flowers102, food101, fashion_mnist) download when missing."""
    split: Literal["auto", "official", "random"] = "auto"
    """auto: the dataset's own train/test split where it has one, else a seeded random split."""
    split_file: str | None = None
    """CoOp-style split JSON for file datasets (paths relative to ``root``)."""
    split_seed: int = 0
    test_fraction: float = 0.2
    max_per_class: int | None = None
    """Cap on training images per class (seeded; before the random split when there is one)."""
    test_samples: int | None = None
    """Cap on test images (a seeded subset)."""
    augment: bool = True
    """Training: RandomResizedCrop(crop_scale) + horizontal flip; else as test (resize, crop)."""
    hflip: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    mean: list[float] | None = None
    """Normalisation; null = the pretrained tag's, else OpenAI CLIP's."""
    std: list[float] | None = None
    cache_mb: int = 2048
    """Memory for decoded images and test crops (uint8)."""
    # ---- compute
    eval_batch_size: int = 256
    micro_batch: int | None = None
    """Split larger training batches (e.g. full-shard gradients) into chunks of this size."""
    device: str = "auto"
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """``auto``: bfloat16 autocast on CUDA, float32 on the CPU. Weights and LoRA factors stay
    float32 either way (the causal LM's names, which are torch's)."""

    def __post_init__(self):
        require(self.kind == "clip", "kind", "must be 'clip'")
        require(self.pretrained is None or self.checkpoint is None, "checkpoint",
                "give pretrained (a tag) or checkpoint (a file), not both")
        require(self.model_config is None or self.pretrained is None, "pretrained",
                "tags name weights of open_clip's own architectures; with model_config use "
                "checkpoint: <file> or pretrained: null (random init)")
        if self.model_config is not None:
            missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(self.model_config)
            require(not missing, "model_config", f"missing {', '.join(sorted(missing))}")
        require(bool(self.targets) and set(self.targets) <= set(TARGETS)
                and len(set(self.targets)) == len(self.targets), "targets",
                f"a non-empty list without repeats of {', '.join(TARGETS)} (got {self.targets})")
        require(bool(self.encoders) and set(self.encoders) <= set(ENCODERS)
                and len(set(self.encoders)) == len(self.encoders), "encoders",
                f"a non-empty list without repeats of {', '.join(ENCODERS)}")
        require(self.blocks is None or (bool(self.blocks) and all(
            isinstance(b, int) for b in self.blocks)), "blocks", "a non-empty list of ints or null")
        try:
            ok = "{}" in self.prompt and bool(self.prompt.format("x"))
        except (IndexError, KeyError, ValueError):
            ok = False
        require(ok, "prompt", "must contain one {} where the class name goes (and no other braces)")
        require(self.logit_scale > 0, "logit_scale", "must be > 0")
        require(self.class_names is None or bool(self.class_names), "class_names",
                "a non-empty list or null")
        require(self.dataset not in image_data.FOLDER_DATASETS or self.root is not None, "root",
                f"is required for dataset {self.dataset} (the folder of <class>/ subfolders)")
        require(self.split_file is None or self.dataset in image_data.IMAGE_FILE_DATASETS,
                "split_file", f"applies to {', '.join(image_data.IMAGE_FILE_DATASETS)}")
        require(self.split != "official" or self.dataset in image_data.SPLIT_DATASETS
                or self.split_file is not None, "split",
                f"{self.dataset} has no official split; use auto or random")
        require(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        require(self.max_per_class is None or self.max_per_class >= 1, "max_per_class",
                "must be >= 1 or null")
        require(self.test_samples is None or self.test_samples >= 1, "test_samples",
                "must be >= 1 or null")
        c = self.crop_scale
        require(len(c) == 2 and all(isinstance(x, (int, float)) for x in c)
                and 0.0 < c[0] <= c[1] <= 1.0, "crop_scale",
                "[min, max] with 0 < min <= max <= 1")
        for name in ("mean", "std"):
            v = getattr(self, name)
            require(v is None or (len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                                  and (name == "mean" or min(v) > 0)), name,
                    "three numbers (std > 0) or null")
        require(self.cache_mb >= 0, "cache_mb", "must be >= 0")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.micro_batch is None or self.micro_batch >= 1, "micro_batch",
                "must be >= 1 or null")
        require(self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device)
                is not None, "device", "auto, cpu, cuda, cuda:N or mps")
