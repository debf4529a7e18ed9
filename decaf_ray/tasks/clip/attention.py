"""Attention with separate q, k, v and out projections, so LoRA can adapt each on its own.

open_clip's residual attention blocks hold one fused ``nn.MultiheadAttention`` (a single
``in_proj_weight`` for q, k and v); CLIP-LoRA adapts q, k and v separately, so ``adapt``
(``decaf_ray.tasks.clip.model``) swaps each selected block's attention for ``SplitAttention``,
the same function with four ``nn.Linear`` projections that peft can wrap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
