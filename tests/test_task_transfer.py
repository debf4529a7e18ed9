"""Host <-> device transfers of a step's factors and gradients (``tasks.transfer``): the same
values as tensor-by-tensor copies. The one-copy CUDA path runs only where torch sees a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decaf_ray.tasks.transfer import to_device, to_host

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in [(2, 5), (7, 2), (3,), (1, 1)]]


def test_on_the_cpu_they_are_the_plain_copies():
    src = _tensors(0) + [torch.arange(4, dtype=torch.float64).view(2, 2)]
    back = to_host(src)
    for s, b in zip(src, back):
        assert b.dtype == torch.float32 and torch.equal(b, s.float())
        assert b.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()  # own storage
    moved = to_device(src, torch.device("cpu"))
    assert all(m.dtype == s.dtype and torch.equal(m, s) for m, s in zip(moved, src))
    assert to_host([]) == [] and to_device([], torch.device("cpu")) == []


@CUDA
def test_one_copy_each_way_gives_the_per_tensor_values():
    dev = torch.device("cuda")
    for seed in range(3):  # the pinned buffers are reused between calls
        src = _tensors(seed)
        moved = to_device(src, dev)
        assert all(m.device.type == "cuda" and m.shape == s.shape and torch.equal(m.cpu(), s)
                   for m, s in zip(moved, src))
        half = [m.to(torch.bfloat16) for m in moved]
        back = to_host(half)
        assert all(b.device.type == "cpu" and torch.equal(b, h.float().cpu())
                   for b, h in zip(back, half))
    first = to_host(moved)
    to_host([m + 1 for m in moved])  # a later transfer does not change an earlier result
    assert all(torch.equal(f, m.cpu()) for f, m in zip(first, moved))


@CUDA
def test_peft_bridge_on_a_gpu_matches_the_cpu_exactly():
    """The CLIP task's set_factors / get_grads through one transfer each way, on the GPU, give
    the factors back exactly and gradients equal to a per-module read."""
    from decaf_ray.config import LoRAConfig, from_dict
    from decaf_ray.tasks import peft_lora
    from decaf_ray.tasks.clip import CLIPConfig, build

    tiny = {"embed_dim": 32,
            "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8,
                           "head_width": 16},
            "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 2}}
    task = build(from_dict(CLIPConfig, {"dataset": "digits", "model_config": tiny,
                                        "test_samples": 20, "device": "cuda",
                                        "precision": "float32"}),
                 LoRAConfig(rank=2, alpha=1.0, dropout=0.0), 0)
    g = torch.Generator().manual_seed(1)
    factors = {n: (torch.randn(2, k, generator=g), torch.randn(d, 2, generator=g))
               for n, (d, k) in task.lora_shapes().items()}
    task.load()
    peft_lora.set_factors(task.layers, factors)
    back = peft_lora.get_factors(task.layers)
    assert all(torch.equal(back[n][0], a) and torch.equal(back[n][1], b)
               for n, (a, b) in factors.items())
    peft_lora.set_trainable(task.layers, True)
    peft_lora.zero_grads(task.layers)
    x = task.preprocess.batch(task.data.train, np.arange(8), train=False)
    task.logits(x).square().mean().backward()
    grads = peft_lora.get_grads(task.layers, True)
    for n, layer in task.layers.items():
        for k, part in enumerate(("lora_A", "lora_B")):
            ref = getattr(layer, part)[peft_lora.ADAPTER].weight.grad.float().cpu()
            assert grads[n][k].device.type == "cpu" and torch.equal(grads[n][k], ref)
    loss, _ = task.loss_and_grads(factors, np.arange(8), True, 0)
    assert np.isfinite(loss)
