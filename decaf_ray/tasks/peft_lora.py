"""The bridge between peft LoRA layers and the core's adapters ``{module: (A, B)}``.

peft keeps, for each adapted ``nn.Linear``, ``lora_A[name].weight`` (r, k) and
``lora_B[name].weight`` (d, r): exactly the core's A and B. A task holds one peft model (one frozen
base per host) and swaps agents in by copying their factors into these weights before each
forward pass; gradients are read back from the same parameters. Copying r (d + k) floats per
module is negligible next to a forward pass, and it lets every agent on a host share the base.
On a GPU the copies go as one transfer each way per step (``decaf_ray.tasks.transfer``), not one
per module; on the CPU they are the plain per-module copies.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks.transfer import to_device, to_host

ADAPTER = "default"


def peft_config(lora_cfg, target_modules: Iterable[str]):
    """A peft ``LoraConfig`` from the experiment's ``LoRAConfig``: same rank, alpha, dropout, and
    scaling (``alpha/sqrt(r)`` is peft's rsLoRA)."""
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=list(target_modules), bias="none",
                      use_rslora=lora_cfg.scaling == "alpha/sqrt(r)")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted module name (peft's ``base_model.model.`` prefix removed) -> its LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            out[name.removeprefix("base_model.model.")] = module
    return out


def shapes(layers: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """Module name -> (d, k): out and in features of each adapted weight."""
    return {n: (m.lora_B[ADAPTER].weight.shape[0], m.lora_A[ADAPTER].weight.shape[1])
            for n, m in layers.items()}


@torch.no_grad()
def set_factors(layers: dict[str, nn.Module], factors: Factors) -> None:
    """Copy an agent's factors into the peft weights (exact: same dtype round trip on float32);
    on a GPU as one host-to-device transfer for all modules."""
    targets = [w for name in factors for w in (layers[name].lora_A[ADAPTER].weight,
                                                 layers[name].lora_B[ADAPTER].weight)]
    sources = [t for pair in factors.values() for t in pair]
    if targets and targets[0].device.type == "cuda":
        sources = to_device(sources, targets[0].device)
    for weight, src in zip(targets, sources):
        weight.copy_(src)


def fill_factors(layers: dict[str, nn.Module], factors: Factors) -> None:
    """``set_factors`` into a weightless model's layers (LoRA weights on the meta device, e.g.
    from ``causal_lm_model.meta_peft_model``): their LoRA weights are made on the CPU first, and
    nothing else of the model is."""
    for name in factors:
        layers[name].lora_A.to_empty(device="cpu")
        layers[name].lora_B.to_empty(device="cpu")
    set_factors(layers, factors)


def begin_step(layers: dict[str, nn.Module], factors: Factors, train_A: bool) -> None:
    """Swap an agent in for a training step: its factors in, A trainable or frozen (the FA
    variants), gradients cleared."""
    set_factors(layers, factors)
    set_trainable(layers, train_A)
    zero_grads(layers)


def get_factors(layers: dict[str, nn.Module]) -> Factors:
    """The factors currently in the peft weights, as float32 CPU copies."""
    return {n: (m.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                m.lora_B[ADAPTER].weight.detach().float().cpu().clone()) for n, m in layers.items()}


def set_trainable(layers: dict[str, nn.Module], train_A: bool) -> None:
    """Only LoRA factors train; A too unless the algorithm freezes it (FA variants)."""
    for m in layers.values():
        m.lora_A[ADAPTER].weight.requires_grad_(train_A)
        m.lora_B[ADAPTER].weight.requires_grad_(True)


def zero_grads(layers: dict[str, nn.Module]) -> None:
    for m in layers.values():
        m.lora_A[ADAPTER].weight.grad = None
        m.lora_B[ADAPTER].weight.grad = None


def get_grads(layers: dict[str, nn.Module], train_A: bool) -> Grads:
    """Gradients of the last backward pass per module, float32 on the CPU (None for frozen A);
    from a GPU as one device-to-host transfer for all modules."""
    device_grads = []
    for m in layers.values():
        ga = m.lora_A[ADAPTER].weight.grad
        gb = m.lora_B[ADAPTER].weight.grad
        gb = torch.zeros_like(m.lora_B[ADAPTER].weight) if gb is None else gb
        if train_A:
            device_grads.append(torch.zeros_like(m.lora_A[ADAPTER].weight) if ga is None else ga)
        device_grads.append(gb)
    host = iter(to_host(device_grads))
    return {n: ((next(host) if train_A else None), next(host)) for n in layers}


def set_adapters_off(layer: nn.Module, off: bool) -> bool:
    """Switch a peft LoRA layer's adapters off (its forward is then its base layer's alone) or
    back on; returns whether they were off before, to restore. ``requires_grad`` is left as it is.

    peft's public switch, ``layer.enable_adapters(enabled)``, also sets ``requires_grad``: off
    freezes every adapter weight, on unfreezes them all, A included, which would make the FA
    variants' frozen A train. So this sets the flag that switch sets, peft's private
    ``_disable_adapters``, in this one place, and checks through peft's public read-only
    ``disable_adapters`` that the flag still means what it meant: should peft rename it, the
    adapters would otherwise apply twice (theirs and a caller's hook) with no error.
    """
    import peft

    if not (hasattr(layer, "_disable_adapters") and hasattr(layer, "disable_adapters")):
        raise RuntimeError(f"peft {peft.__version__}: a LoRA layer lacks _disable_adapters or "
                           "disable_adapters; decaf_ray.tasks.peft_lora.set_adapters_off needs "
                           "updating")
    was = bool(layer.disable_adapters)
    layer._disable_adapters = bool(off)
    if bool(layer.disable_adapters) != bool(off):
        raise RuntimeError(f"peft {peft.__version__}: setting _disable_adapters no longer switches "
                           "a LoRA layer's adapters (disable_adapters did not follow); "
                           "decaf_ray.tasks.peft_lora.set_adapters_off needs updating")
    return was


@torch.no_grad()
def set_base_delta(layers: dict[str, nn.Module], originals: dict[str, torch.Tensor],
                   delta: dict[str, torch.Tensor] | None) -> None:
    """Each adapted layer's frozen weight (peft's ``base_layer.weight``) set to W0 +
    ``delta[name]`` ((d, k) float32; None: W0 again): summed in float32 and rounded once to the
    weight's dtype, from W0, never added in place, so the same delta gives the same weights
    whatever came before (a restored run). ``originals`` keeps each W0, copied on the first
    call that changes it (so only runs that fold pay for the copy: the adapted weights once
    more, on their device)."""
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        if name not in originals:
            if delta is None:
                continue
            originals[name] = weight.detach().clone()
        w0 = originals[name]
        weight.copy_(w0 if delta is None else
                     (w0.float() + delta[name].to(w0.device, torch.float32)).to(w0.dtype))


def merged_delta(layer: nn.Module) -> torch.Tensor:
    """s B A of one layer, (d, k): what ``merge_and_unload`` adds to the frozen weight."""
    return layer.scaling[ADAPTER] * (layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight)
