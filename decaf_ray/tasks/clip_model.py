"""The CLIP model the task and the stand-in pretraining share: built from an open_clip config,
attention split into q, k, v, out projections, LoRA injected by peft.

``architecture`` reads the open_clip model config (and a pretrained tag's) without weights;
``instantiate`` builds it on the current device (``torch.device("meta")`` for shapes only);
``adapt`` replaces the fused ``nn.MultiheadAttention`` of the selected blocks by
``SplitAttention`` (the same function, separate projections, so q, k and v get separate LoRA
adapters, as CLIP-LoRA) and injects LoRA; ``load_weights`` reads a local checkpoint;
``tokenizer`` is the one the prompts go through. ``cfg`` arguments are a ``CLIPConfig`` (only the
model and LoRA-placement fields are read).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decaf_ray.config import ConfigError, LoRAConfig
from decaf_ray.tasks import peft_lora
from decaf_ray.tasks.clip_config import ENCODERS, TARGETS

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


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



def tokenizer(arch: dict[str, Any], model: str | None):
    """The tokenizer of open_clip architecture ``model``, or, for a custom ``arch`` (``model``
    None), its Hugging Face tokenizer (``text_cfg.hf_tokenizer_name``) or open_clip's BPE, cut at
    the text tower's context length."""
    import open_clip

    if model is not None:
        return open_clip.get_tokenizer(model)
    text = arch["text_cfg"]
    if "hf_tokenizer_name" in text:
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"],
                                               context_length=text.get("context_length", 77))
    return open_clip.tokenizer.SimpleTokenizer(context_length=text.get("context_length", 77))
