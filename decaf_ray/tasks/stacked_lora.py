"""Several agents' LoRA adapters in one forward pass over one shared frozen base model
(``runtime.batch_agents``): a forward hook per peft LoRA layer adds each agent's delta on that
agent's rows, so n agents cost one pass of the base model instead of n.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks.peft_lora import ADAPTER, set_adapters_off
from decaf_ray.tasks.transfer import to_device, to_host


class StackedLoRA:
    """Several agents' adapters in one forward pass over the shared frozen base model.

    Inside ``with StackedLoRA(...) as lora:`` peft's own adapter weights are switched off and a
    forward hook on each LoRA layer adds, to the frozen layer's output, every agent's delta on
    that agent's rows of the input: ``y[rows_k] += s * dropout_k(x[rows_k]) @ A_k^T @ B_k^T``,
    as one ``bmm`` over the agents when they have equally many rows. The input's first dimension
    must hold the agents' rows one agent after another (batch-first layouts); set ``lora.rows``
    to each agent's row count before a pass whose layout differs from the last (e.g. images,
    then prompts). The agents' factors are leaves of stacked tensors A (n, r, k) and B (n, d, r),
    so a backward pass of the summed per-agent losses gives each agent its own gradient.

    Dropout (peft's ``lora_dropout`` probability) draws from ``generators[k]`` for agent k, so an
    agent's masks do not depend on who shares its pass.
    """

    def __init__(self, layers: dict[str, nn.Module], factors: list[Factors], train_A: bool,
                 generators: list[torch.Generator] | None = None):
        self.layers, self.train_A, self.generators = layers, train_A, generators
        self.n, self.rows = len(factors), [0] * len(factors)
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        like = {n: layer.lora_A[ADAPTER].weight for n, layer in layers.items()}
        stacked = [torch.stack([f[n][k] for f in factors]).to(like[n].dtype)
                   for n in layers for k in (0, 1)]
        if like and next(iter(like.values())).device.type == "cuda":
            stacked = to_device(stacked, next(iter(like.values())).device)  # one transfer
        for (name, w), a, b in zip(like.items(), stacked[0::2], stacked[1::2]):
            self.A[name] = a.to(w.device).requires_grad_(train_A)
            self.B[name] = b.to(w.device).requires_grad_(True)
        self._hooks: list = []
        self._disabled: dict[str, bool] = {}

    def __enter__(self) -> "StackedLoRA":
        for name, layer in self.layers.items():
            # the base layer alone (A keeps its requires_grad); the hook adds the deltas
            self._disabled[name] = set_adapters_off(layer, True)
            self._hooks.append(layer.register_forward_hook(self._hook(name, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        for name, layer in self.layers.items():
            set_adapters_off(layer, self._disabled[name])
        self._hooks = []

    def _hook(self, name: str, layer: nn.Module):
        a, b = self.A[name], self.B[name]
        scaling = layer.scaling[ADAPTER]
        drop = layer.lora_dropout[ADAPTER]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0

        def hook(module, args, out: Tensor) -> Tensor:
            x = args[0]
            if x.shape[0] != sum(self.rows):
                raise RuntimeError(f"{name}: input has {x.shape[0]} rows, the agents "
                                   f"{sum(self.rows)} ({self.rows}); set StackedLoRA.rows")
            x = x.to(a.dtype)
            if p > 0 and module.training:
                x = torch.cat([self._dropout(part, p, k)
                               for k, part in enumerate(x.split(self.rows))])
            if len(set(self.rows)) == 1:  # one bmm over agents: (n, M, k) (n, k, r) (n, r, d)
                xs = x.reshape(self.n, -1, x.shape[-1])
                delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
            else:
                delta = torch.cat([(part @ a[k].T) @ b[k].T
                                   for k, part in enumerate(x.split(self.rows))])
            return out + (delta.reshape(out.shape) * scaling).to(out.dtype)

        return hook

    def _dropout(self, x: Tensor, p: float, k: int) -> Tensor:
        gen = self.generators[k] if self.generators else None
        # nn.Dropout's own arithmetic on the CPU, so the same generator state gives the same result
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)
        return x * keep

    def grads(self) -> list[Grads]:
        """Each agent's gradients after ``backward``, float32 on the CPU (as ``get_grads``)."""
        out: list[Grads] = [{} for _ in range(self.n)]
        device_grads = []
        for name in self.layers:
            ga, gb = self.A[name].grad, self.B[name].grad
            if self.train_A:
                device_grads.append(torch.zeros_like(self.A[name]) if ga is None else ga)
            device_grads.append(torch.zeros_like(self.B[name]) if gb is None else gb)
        host = iter(to_host(device_grads))  # on a GPU one transfer for all modules
        for name in self.layers:
            ga = next(host) if self.train_A else None
            gb = next(host)
            for k in range(self.n):
                out[k][name] = (None if ga is None else ga[k].clone(), gb[k].clone())
        return out
