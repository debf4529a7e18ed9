"""CLIP few-shot classification with LoRA on both encoders: the CLIP-LoRA recipe the paper follows.

The model is an open_clip CLIP: a named architecture with a ``pretrained`` tag (``ViT-B-16`` +
``openai``, the paper's; downloaded by open_clip), a local ``checkpoint`` (safetensors, or a
``torch.load(weights_only=True)`` file), or a custom ``model_config`` dict in open_clip's format
(random init from ``init_seed`` unless a checkpoint is given). Every adapted attention block's
fused ``nn.MultiheadAttention`` is replaced by ``SplitAttention``, the same computation with
separate ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` linears, so q, k and v get separate
LoRA adapters (CLIP-LoRA; ViT-B/16 on both encoders: 92,160 trainable parameters per unit of rank).
LoRA comes from peft (``decaf_ray.tasks.peft_lora``).

The classifier is the cosine similarity between the image features and the text features of
``prompt.format(class_name)`` per class, times ``logit_scale``, under cross-entropy. The text
features are recomputed, with gradients, at every step because the text LoRA changes them.

Cheap until used: ``build`` reads labels and file lists and computes the adapted shapes on a
meta-device model (no weights, no download); the real model is made on the first
``loss_and_grads`` or ``evaluate``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decaf_ray.config import ConfigError, LoRAConfig
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks import image_data, peft_lora

TARGETS = {"q": ("attn.q_proj",), "k": ("attn.k_proj",), "v": ("attn.v_proj",),
           "out": ("attn.out_proj",), "mlp": ("mlp.c_fc", "mlp.c_proj")}
ENCODERS = ("vision", "text")
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class CLIPConfig:
    """``task: {kind: clip, dataset: ..., ...}``; see the module docstrings here and in
    ``decaf_ray.tasks.image_data``."""

    dataset: Literal["digits", "fashion_mnist", "imagefolder", "ucf101", "flowers102", "food101"]
    kind: str = "clip"
    # ---- model
    model: str = "ViT-B-16"
    """open_clip architecture name (ignored when ``model_config`` is given)."""
    pretrained: str | None = None
    """open_clip pretrained tag of ``model`` (e.g. ``openai``, the paper's); null = no tag."""
    checkpoint: str | None = None
    """Local weights of the architecture: .safetensors, or a torch file loaded weights_only."""
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
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, float32 on the CPU."""

    def __post_init__(self):
        _require(self.kind == "clip", "kind", "must be 'clip'")
        _require(self.pretrained is None or self.checkpoint is None, "checkpoint",
                 "give pretrained (a tag) or checkpoint (a file), not both")
        _require(self.model_config is None or self.pretrained is None, "pretrained",
                 "tags name weights of open_clip's own architectures; with model_config use "
                 "checkpoint: <file> or pretrained: null (random init)")
        if self.model_config is not None:
            missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(self.model_config)
            _require(not missing, "model_config", f"missing {', '.join(sorted(missing))}")
        _require(bool(self.targets) and set(self.targets) <= set(TARGETS)
                 and len(set(self.targets)) == len(self.targets), "targets",
                 f"a non-empty list without repeats of {', '.join(TARGETS)} (got {self.targets})")
        _require(bool(self.encoders) and set(self.encoders) <= set(ENCODERS)
                 and len(set(self.encoders)) == len(self.encoders), "encoders",
                 f"a non-empty list without repeats of {', '.join(ENCODERS)}")
        _require(self.blocks is None or (bool(self.blocks) and all(
            isinstance(b, int) for b in self.blocks)), "blocks", "a non-empty list of ints or null")
        try:
            ok = "{}" in self.prompt and bool(self.prompt.format("x"))
        except (IndexError, KeyError, ValueError):
            ok = False
        _require(ok, "prompt", "must contain one {} where the class name goes (and no other braces)")
        _require(self.logit_scale > 0, "logit_scale", "must be > 0")
        _require(self.class_names is None or bool(self.class_names), "class_names",
                 "a non-empty list or null")
        _require(self.dataset not in ("imagefolder", "ucf101") or self.root is not None, "root",
                 f"is required for dataset {self.dataset} (the folder of <class>/ subfolders)")
        _require(self.split_file is None or self.dataset in image_data.FILE_DATASETS,
                 "split_file", f"applies to {', '.join(image_data.FILE_DATASETS)}")
        _require(self.split != "official" or self.dataset in image_data.SPLIT_DATASETS
                 or self.split_file is not None, "split",
                 f"{self.dataset} has no official split; use auto or random")
        _require(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        _require(self.max_per_class is None or self.max_per_class >= 1, "max_per_class",
                 "must be >= 1 or null")
        _require(self.test_samples is None or self.test_samples >= 1, "test_samples",
                 "must be >= 1 or null")
        c = self.crop_scale
        _require(len(c) == 2 and all(isinstance(x, (int, float)) for x in c)
                 and 0.0 < c[0] <= c[1] <= 1.0, "crop_scale",
                 "[min, max] with 0 < min <= max <= 1")
        for name in ("mean", "std"):
            v = getattr(self, name)
            _require(v is None or (len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                                   and (name == "mean" or min(v) > 0)), name,
                     "three numbers (std > 0) or null")
        _require(self.cache_mb >= 0, "cache_mb", "must be >= 0")
        _require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _require(self.micro_batch is None or self.micro_batch >= 1, "micro_batch",
                 "must be >= 1 or null")
        _require(self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device)
                 is not None, "device", "auto, cpu, cuda, cuda:N or mps")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


# ---------------------------------------------------------------------------- attention


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (no dropout, same embed dim for q, k, v) with separate q, k, v
    and out projections: the same function, so LoRA can adapt each projection on its own.

    ``forward`` takes MultiheadAttention's arguments (batch_first or (L, N, E) inputs, additive or
    boolean ``attn_mask`` of shape (L, S) or (N * heads, L, S), ``key_padding_mask`` (N, S)) and
    returns ``(output, weights)``, weights averaged over heads when ``need_weights``.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.dropout != 0.0 or mha.bias_k is not None:
            raise ValueError("SplitAttention needs self-attention weights, no dropout, no bias_kv")
        d, dev, dt = mha.embed_dim, mha.in_proj_weight.device, mha.in_proj_weight.dtype
        self.embed_dim, self.num_heads, self.batch_first = d, mha.num_heads, mha.batch_first
        bias = mha.in_proj_bias is not None
        make = lambda b: nn.Linear(d, d, bias=b, device=dev, dtype=dt)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = make(bias), make(bias), make(bias)
        self.out_proj = make(mha.out_proj.bias is not None)
        if dev.type != "meta":
            with torch.no_grad():
                for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                    lin.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                    if bias:
                        lin.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
                self.out_proj.weight.copy_(mha.out_proj.weight)
                if self.out_proj.bias is not None:
                    self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        s, h = key.shape[1], self.num_heads
        hd = self.embed_dim // h
        q = self.q_proj(query).view(n, length, h, hd).transpose(1, 2)
        k = self.k_proj(key).view(n, s, h, hd).transpose(1, 2)
        v = self.v_proj(value).view(n, s, h, hd).transpose(1, 2)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(n, h, length, s)
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, q.dtype).view(n, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        if is_causal and mask is None:
            mask = torch.full((length, s), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            probs = (scores if mask is None else scores + mask).softmax(-1)
            out = probs @ v
            weights = probs.mean(1) if average_attn_weights else probs
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = masked out) as an additive one; float masks as they are."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


# ---------------------------------------------------------------------------- model


def architecture(cfg: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The open_clip model config dict and the pretrained tag's config (None without a tag).

    Raises ConfigError for an unknown architecture or tag. Never downloads.
    """
    import open_clip

    if cfg.model_config is not None:
        arch = copy.deepcopy(cfg.model_config)
    else:
        arch = open_clip.get_model_config(cfg.model)
        if arch is None:
            raise ConfigError("task.model", f"unknown open_clip model {cfg.model!r}; e.g. "
                              f"{', '.join(m for m in open_clip.list_models() if 'ViT-B' in m)}")
    tag = None
    if cfg.pretrained is not None:
        tag = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) or None
        if tag is None:
            raise ConfigError("task.pretrained", f"unknown tag for {cfg.model}; valid: "
                              f"{', '.join(open_clip.list_pretrained_tags_by_model(cfg.model))}")
        arch["quick_gelu"] = bool(tag.get("quick_gelu", False))
    if "multimodal_cfg" in arch or "timm_model_name" in arch.get("vision_cfg", {}):
        raise ConfigError("task.model", "only open_clip ViT CLIP towers are supported "
                          "(no CoCa, no timm vision towers)")
    return arch, tag


def instantiate(arch: dict[str, Any]) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP) from a model config, on the current device."""
    from open_clip.model import CLIP, CustomTextCLIP

    arch = copy.deepcopy(arch)
    custom = arch.pop("custom_text", False) or "hf_model_name" in arch.get("text_cfg", {})
    return (CustomTextCLIP if custom else CLIP)(**arch)


def attention_blocks(model: nn.Module) -> dict[str, list[tuple[int, str]]]:
    """Encoder -> [(block index, module name)] of the open_clip residual attention blocks."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    out: dict[str, list[tuple[int, str]]] = {e: [] for e in ENCODERS}
    for name, mod in model.named_modules():
        if isinstance(mod, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
            if isinstance(mod, CustomResidualAttentionBlock) or hasattr(mod, "ln_1_kv"):
                raise ConfigError("task.model", f"{name}: only plain self-attention blocks "
                                  "(open_clip ResidualAttentionBlock) are supported")
            out["vision" if name.startswith("visual.") else "text"].append(
                (int(name.rsplit(".", 1)[1]), name))
    return out


def adapt(model: nn.Module, cfg: CLIPConfig, lora_cfg: LoRAConfig) -> dict[str, nn.Module]:
    """Split the attention of the selected blocks, inject peft LoRA; returns the LoRA layers."""
    from peft import inject_adapter_in_model

    blocks = attention_blocks(model)
    names = []
    for enc in cfg.encoders:
        found = blocks[enc]
        if not found:
            raise ConfigError("task.encoders", f"the model's {enc} encoder has no open_clip "
                              "attention blocks to adapt")
        n = len(found)
        want = range(n) if cfg.blocks is None else cfg.blocks
        bad = [b for b in want if not -n <= b < n]
        if bad:
            raise ConfigError("task.blocks", f"{bad} out of range for the {n} {enc} blocks")
        chosen = sorted({b % n for b in want})
        for idx, name in found:
            if idx not in chosen:
                continue
            block = model.get_submodule(name)
            if any(t in cfg.targets for t in ("q", "k", "v", "out")):
                block.attn = SplitAttention(block.attn)
            names += [f"{name}.{leaf}" for t in cfg.targets for leaf in TARGETS[t]]
    for p in model.parameters():
        p.requires_grad_(False)
    pcfg = peft_lora.peft_config(lora_cfg, names)
    pcfg.target_modules = "|".join(re.escape(n) for n in names)  # exact names: a full match
    inject_adapter_in_model(pcfg, model)
    layers = peft_lora.lora_layers(model)
    assert set(layers) == set(names), sorted(set(layers) ^ set(names))
    return layers


# ---------------------------------------------------------------------------- the task


class CLIPTask:
    """The built task; ``model`` and ``layers`` exist after ``materialise()``."""

    def __init__(self, cfg: CLIPConfig, lora_cfg: LoRAConfig, seed: int):
        self.cfg, self.lora_cfg, self.seed = cfg, lora_cfg, seed
        self.arch, self.tag = architecture(cfg)
        try:
            self.data = image_data.load(cfg)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise ConfigError("task", f"dataset {cfg.dataset}: {e}") from None
        except OSError as e:  # a download without network (urllib's URLError is an OSError)
            raise ConfigError("task.root", f"could not download {cfg.dataset} into {cfg.root} "
                              f"({getattr(e, 'reason', e)}); put a copy there and set "
                              "download: false") from None
        self.class_names = self.data.class_names
        self.num_classes: int | None = len(self.class_names)
        self.train_labels: np.ndarray = self.data.train.labels
        self.test_labels: np.ndarray = self.data.test.labels
        self.prompts = [cfg.prompt.format(c) for c in self.class_names]
        text = self.arch["text_cfg"]
        if "hf_tokenizer_name" not in text and text.get("vocab_size", 49408) < 49408:
            raise ConfigError("task.model_config", "text_cfg.vocab_size must be >= 49408, the "
                              "size of open_clip's tokenizer")
        size = self.arch["vision_cfg"].get("image_size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        mean = cfg.mean or (self.tag or {}).get("mean") or OPENAI_MEAN
        std = cfg.std or (self.tag or {}).get("std") or OPENAI_STD
        self.preprocess = image_data.Preprocess(self.image_size, mean, std, cfg.augment,
                                                cfg.hflip, tuple(cfg.crop_scale), cfg.cache_mb)
        with torch.device("meta"):
            meta = instantiate(self.arch)
        self._shapes = peft_lora.shapes(adapt(meta, cfg, lora_cfg))
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}
        self._text_cache: Tensor | None = None
        self._test_features: Tensor | None = None

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """``<block>.attn.{q,k,v}_proj`` (and out_proj, mlp.c_fc/c_proj) -> (d, k); vision first."""
        return dict(self._shapes)

    # ------------------------------------------------------------------ model

    def materialise(self) -> nn.Module:
        """Make the real model once: weights (tag, checkpoint or seeded init), split attention,
        LoRA, device. Leaves torch's global RNG as it was."""
        if self.model is not None:
            return self.model
        import open_clip

        cfg = self.cfg
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                           if cfg.device == "auto" else cfg.device)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(cfg.init_seed)
            if self.tag is not None:
                model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained,
                                               force_quick_gelu=self.arch["quick_gelu"])
            else:
                model = instantiate(self.arch)
                if cfg.checkpoint is not None:
                    _load_weights(model, cfg.checkpoint)
            layers = adapt(model, cfg, self.lora_cfg)
        model.eval().to(dev)
        if cfg.model_config is None:
            tokenizer = open_clip.get_tokenizer(cfg.model)
        elif "hf_tokenizer_name" in self.arch["text_cfg"]:
            tokenizer = open_clip.tokenizer.HFTokenizer(
                self.arch["text_cfg"]["hf_tokenizer_name"],
                context_length=self.arch["text_cfg"].get("context_length", 77))
        else:
            tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=self.arch["text_cfg"].get("context_length", 77))
        self.tokens = tokenizer(self.prompts).to(dev)
        self.device = dev
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.model, self.layers = model, layers
        return model

    def _set_training(self, training: bool) -> None:
        """Train mode (LoRA dropout on) for steps, eval mode for evaluation, switched only on a
        change: ``nn.Module.train`` walks every submodule, about 1 ms on even a small CLIP, which
        consecutive agent steps would otherwise pay twice each. Only the root's flag is read:
        nothing else may switch a submodule's mode."""
        if self.model.training != training:
            self.model.train(training)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _text_features(self) -> Tensor:
        """(C, e) normalised prompt features; cached when the text encoder is not adapted."""
        if "text" in self.cfg.encoders:
            return self.model.encode_text(self.tokens, normalize=True)
        if self._text_cache is None:
            with torch.no_grad(), self._autocast():
                self._text_cache = self.model.encode_text(self.tokens, normalize=True)
        return self._text_cache

    def logits(self, images: Tensor) -> Tensor:
        """(m, C) float32 logits of normalised images (m, 3, S, S) at the current factors, in
        the model's current mode (train after a step: LoRA dropout on)."""
        with self._autocast():
            img = self.model.encode_image(images.to(self.device), normalize=True)
            txt = self._text_features()
            return self.cfg.logit_scale * (img @ txt.T).float()

    # ------------------------------------------------------------------ Task protocol

    def loss_and_grads(self, factors: Factors, indices: np.ndarray, train_A: bool = True
                       ) -> tuple[float, Grads]:
        """Mean cross-entropy on training images ``indices`` at ``factors``, and its gradient.

        LoRA dropout and augmentation draw from torch's default generator (seeded by the runtime
        per agent and step). Chunks of ``micro_batch`` accumulate the mean gradient (the same one
        without dropout and augmentation, whose draws depend on the chunking).
        Returns (loss, {module: (grad A (r, k) or None, grad B (d, r))}), float32 on the CPU.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise ValueError("loss_and_grads needs at least one index")
        model = self.materialise()
        peft_lora.set_factors(self.layers, factors)
        peft_lora.set_trainable(self.layers, train_A)
        peft_lora.zero_grads(self.layers)
        self._set_training(True)
        chunk = self.cfg.micro_batch or idx.size
        total = 0.0
        for start in range(0, idx.size, chunk):
            part = idx[start:start + chunk]
            x = self.preprocess.batch(self.data.train, part, train=True)
            y = torch.as_tensor(self.train_labels[part], device=self.device)
            loss = F.cross_entropy(self.logits(x), y, reduction="sum") / idx.size
            loss.backward()
            total += float(loss.detach())
        grads = peft_lora.get_grads(self.layers, train_A)
        peft_lora.zero_grads(self.layers)
        return total, grads

    def loss_and_grads_many(self, factors: list[Factors], indices: list[np.ndarray],
                            train_A: bool, seeds: list[int]) -> list[tuple[float, Grads]]:
        """``loss_and_grads`` of n agents in one forward and backward pass.

        The agents' image batches go through the encoders together, each adapted layer adding
        each agent's LoRA delta on that agent's rows (``peft_lora.StackedLoRA``); the prompts go
        through the text encoder once per agent. The summed per-agent mean losses are
        differentiated once, which gives each agent its own gradient. ``seeds[k]`` seeds agent
        k's augmentation and LoRA dropout as the runtime seeds ``loss_and_grads`` (torch's default
        generator), so an agent's draws do not depend on who shares the pass and, on the CPU,
        are the ones ``loss_and_grads`` makes: the results equal it up to float rounding (the
        frozen layers multiply more rows at once). ``micro_batch`` does not apply here: the pass
        holds every agent's activations.
        Returns [(loss, grads)] in agent order.
        """
        model = self.materialise()
        xs, ys, gens = [], [], []
        for idx, seed in zip(indices, seeds):
            idx = np.asarray(idx, dtype=np.int64)
            if idx.size == 0:
                raise ValueError("loss_and_grads_many needs at least one index per agent")
            torch.random.default_generator.manual_seed(seed)
            xs.append(self.preprocess.batch(self.data.train, idx, train=True))
            ys.append(torch.as_tensor(self.train_labels[idx], device=self.device))
            gens.append(_dropout_generator(self.device, seed))
        n, counts = len(factors), [len(y) for y in ys]
        self._set_training(True)
        with peft_lora.StackedLoRA(self.layers, factors, train_A, gens) as lora, self._autocast():
            lora.rows = counts
            img = model.encode_image(torch.cat(xs).to(self.device), normalize=True)
            if "text" in self.cfg.encoders:
                lora.rows = [len(self.tokens)] * n
                txt = model.encode_text(self.tokens.repeat(n, 1), normalize=True)
                txt = txt.view(n, len(self.tokens), -1)
            else:
                txt = self._text_features().expand(n, -1, -1)
            losses = [F.cross_entropy(self.cfg.logit_scale * (part @ txt[k].T).float(), ys[k])
                      for k, part in enumerate(img.split(counts))]
        torch.stack(losses).sum().backward()
        grads = lora.grads()
        return [(float(loss.detach()), g) for loss, g in zip(losses, grads)]

    @torch.no_grad()
    def evaluate(self, factors: Factors) -> dict[str, float]:
        """``test_loss`` (mean cross-entropy) and ``test_accuracy`` over the test set."""
        model = self.materialise()
        peft_lora.set_factors(self.layers, factors)
        self._set_training(False)
        n = len(self.test_labels)
        if n == 0:
            return {}
        txt = None
        loss_sum, correct = 0.0, 0
        for start in range(0, n, self.cfg.eval_batch_size):
            part = np.arange(start, min(n, start + self.cfg.eval_batch_size))
            y = torch.as_tensor(self.test_labels[part], device=self.device)
            with self._autocast():
                txt = self._text_features() if txt is None else txt
                img = self._test_image_features(part)
                logits = self.cfg.logit_scale * (img @ txt.T).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return {"test_loss": loss_sum / n, "test_accuracy": correct / n}

    def _test_image_features(self, part: np.ndarray) -> Tensor:
        """Normalised test image features; all of them cached when the vision tower is frozen."""
        if "vision" in self.cfg.encoders:
            return self._encode_test(part)
        if self._test_features is None:
            n, bs = len(self.test_labels), self.cfg.eval_batch_size
            self._test_features = torch.cat([self._encode_test(np.arange(s, min(n, s + bs)))
                                             for s in range(0, n, bs)])
        return self._test_features[torch.as_tensor(part, device=self.device)]

    def _encode_test(self, part: np.ndarray) -> Tensor:
        x = self.preprocess.batch(self.data.test, part, train=False).to(self.device)
        return self.model.encode_image(x, normalize=True)


def _dropout_generator(device: torch.device, seed: int) -> torch.Generator:
    """Where agent k's dropout draws from in a batched pass. On the CPU: torch's default
    generator as it stands after the agent's augmentation, which is where ``loss_and_grads``'s
    dropout draws from, so the masks are the same. Elsewhere a generator seeded alike (fused
    dropout kernels draw differently from ``bernoulli_``)."""
    if device.type == "cpu":
        gen = torch.Generator()
        gen.set_state(torch.random.default_generator.get_state())
        return gen
    return torch.Generator(device).manual_seed(seed)


def _load_weights(model: nn.Module, path: str) -> None:
    """A state dict from safetensors or a weights-only torch file, loaded strictly."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError("task.checkpoint", f"{path} does not fit the architecture: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")


def build(task_cfg: CLIPConfig, lora_cfg: LoRAConfig, seed: int) -> CLIPTask:
    """The task of ``task_cfg`` with ``lora_cfg``'s rank, alpha, dropout and scaling; cheap (no
    weights are made or downloaded until the first ``loss_and_grads`` or ``evaluate``).

    ``checkpoint: pretrain:<name or pretrain YAML>`` uses a stand-in model made by
    ``decaf_ray.pretrain`` on first use and cached (every host finds the same cache entry)."""
    return CLIPTask(resolve_pretrained(task_cfg), lora_cfg, seed)


PRETRAIN_PREFIX = "pretrain:"


def resolve_pretrained(cfg: CLIPConfig) -> CLIPConfig:
    """Replace ``checkpoint: pretrain:<spec>`` by the cached checkpoint and its model config."""
    if cfg.checkpoint is None or not cfg.checkpoint.startswith(PRETRAIN_PREFIX):
        return cfg
    from decaf_ray.pretrain import checkpoint_task_fields, ensure_pretrained

    spec = cfg.checkpoint[len(PRETRAIN_PREFIX):]
    try:
        fields = checkpoint_task_fields(ensure_pretrained(spec))
    except FileNotFoundError as e:
        raise ConfigError("task.checkpoint", f"{spec}: {e}") from None
    return dataclasses.replace(cfg, **fields)
