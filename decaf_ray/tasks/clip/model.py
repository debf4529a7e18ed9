"""The CLIP model the task and the stand-in pretraining share: an open_clip CLIP built from its
config, attention split into q, k, v, out projections, LoRA injected by peft.

``architecture`` reads the open_clip model config (and a pretrained tag's) without weights;
``instantiate`` builds it on the current device (``torch.device("meta")`` for shapes only);
``adapt`` replaces the fused ``nn.MultiheadAttention`` of the selected blocks by
``SplitAttention`` (``decaf_ray.tasks.clip.attention``) and injects LoRA; ``base_model`` is the
model with weights and split attention, before LoRA (what an exported adapter loads into);
``load_weights`` reads a local checkpoint; ``tokenizer`` and ``image_size`` are what the prompts
and the images are made for. ``cfg`` arguments are a ``CLIPConfig`` (only the model and
LoRA-placement fields are read).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from decaf_ray.config import ConfigError, LoRAConfig
from decaf_ray.tasks import peft_lora
from decaf_ray.tasks.clip.attention import SplitAttention
from decaf_ray.tasks.clip.config import ENCODERS, TARGETS

# OpenAI CLIP's normalisation: the default when neither the config nor a pretrained tag gives one.
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def architecture(cfg) -> tuple[dict[str, Any], dict[str, Any] | None]:
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


def adapt(model: nn.Module, cfg, lora_cfg: LoRAConfig) -> dict[str, nn.Module]:
    """Split the attention of the selected blocks, inject peft LoRA; returns the LoRA layers.
    Blocks already split (a ``base_model``) stay as they are."""
    from peft import inject_adapter_in_model

    names = _split(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    pcfg = peft_lora.peft_config(lora_cfg, names)
    pcfg.target_modules = "|".join(re.escape(n) for n in names)  # exact names: a full match
    inject_adapter_in_model(pcfg, model)
    layers = peft_lora.lora_layers(model)
    assert set(layers) == set(names), sorted(set(layers) ^ set(names))
    return layers


def _split(model: nn.Module, cfg) -> list[str]:
    """Put ``SplitAttention`` in the selected blocks (where a target is in the attention and it
    is not there yet); returns the names of the modules LoRA goes on."""
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
            split = any(t in cfg.targets for t in ("q", "k", "v", "out"))
            if split and not isinstance(block.attn, SplitAttention):
                block.attn = SplitAttention(block.attn)
            names += [f"{name}.{leaf}" for t in cfg.targets for leaf in TARGETS[t]]
    return names


def base_model(cfg, weights: bool = True) -> nn.Module:
    """The open_clip model the CLIP task adapts, before LoRA: the selected blocks' attention split
    into q, k, v, out projections (``SplitAttention``, the same computation), eval mode, float32.

    This is the base a ``decaf-ray export`` adapter loads into, the one call a user needs besides
    peft's: ``PeftModel.from_pretrained(base_model(cfg), DIR)``, ``cfg`` the run's ``task``
    section (``decaf_ray.results.load_run_config(RUN).task``).

    ``weights``: made as the task makes them: the pretrained tag's (open_clip downloads them),
    the checkpoint's (a ``pretrain:`` stand-in from its cache), else drawn from ``init_seed``;
    on the CPU. False: none, on the current device (``torch.device("meta")``: names and shapes).
    """
    import dataclasses

    import open_clip

    from decaf_ray.tasks import checkpoints
    from decaf_ray.tasks.step_rng import step_rng

    spec = checkpoints.standin_spec(cfg.checkpoint)
    if spec is not None:
        cfg = dataclasses.replace(cfg, **checkpoints.cached_task_fields(spec))
    arch, tag = architecture(cfg)
    if not weights:
        model = instantiate(arch)
    else:
        with step_rng(cfg.init_seed, torch.device("cpu")):  # as the task: weights on the CPU
            if tag is not None:
                model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained,
                                               force_quick_gelu=arch["quick_gelu"])
            else:
                model = instantiate(arch)
                if cfg.checkpoint is not None:
                    load_weights(model, cfg.checkpoint)
    _split(model, cfg)
    return model.eval()


def load_weights(model: nn.Module, path: str) -> None:
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


def tokenizer(cfg, arch: dict[str, Any]):
    """The tokenizer the prompts go through: open_clip's for the named architecture
    ``cfg.model``; for a custom ``cfg.model_config`` (``arch``), its Hugging Face tokenizer
    (``text_cfg.hf_tokenizer_name``) or open_clip's BPE, cut at the text tower's context length."""
    import open_clip

    if cfg.model_config is None:
        return open_clip.get_tokenizer(cfg.model)
    text = arch["text_cfg"]
    if "hf_tokenizer_name" in text:
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"],
                                               context_length=text.get("context_length", 77))
    return open_clip.tokenizer.SimpleTokenizer(context_length=text.get("context_length", 77))


def image_size(arch: dict[str, Any]) -> int:
    """The side S of the square images (3, S, S) the vision tower of ``arch`` takes."""
    size = arch["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])
