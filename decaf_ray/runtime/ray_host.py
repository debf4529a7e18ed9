"""``AgentHost``: the Ray actor that holds ``runtime.agents_per_host`` agents over one frozen base
model, built by the host itself (its own data and weights, loaded once); its methods mirror
``AgentGroup``'s. Factors leave and enter it as numpy arrays (a payload as its encoded
``compress.Message``: float32 shares the factors' memory), so object-store reads are zero-copy;
a host decodes each message it receives once, whatever number of its agents mix it.
The coordinator that drives hosts is ``decaf_ray.runtime.ray_runtime``.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import ray
import torch

from decaf_ray import compress, devices, placement
from decaf_ray.agents import AgentGroup
from decaf_ray.folding import BaseDelta
from decaf_ray.algorithms import ALGORITHMS
from decaf_ray.experiment_config import load_config
from decaf_ray.factors import Factors, Grads
from decaf_ray.optim import build_optimizer
from decaf_ray.runtime import weights

NumpyFactors = dict[str, tuple[Any, Any]]


def to_numpy(factors: Factors) -> NumpyFactors:
    """Tensors to numpy views; a factor that did not travel (None in a payload) stays None."""
    return {n: tuple(None if x is None else x.numpy() for x in pair)
            for n, pair in factors.items()}


def from_numpy(factors: NumpyFactors) -> Factors:
    # Arrays read from the object store are read-only views; the mix only reads them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {n: tuple(None if x is None else torch.from_numpy(x) for x in pair)
                for n, pair in factors.items()}



@ray.remote(concurrency_groups={"ping": 1})
class AgentHost:
    """Agents that share one frozen base model; methods mirror ``AgentGroup``'s."""

    def __init__(self, config: dict, shards: dict[int, np.ndarray],
                 shipped: weights.Shipped | None = None, ranks: tuple[int, ...] = ()):
        devices.hide_unassigned_gpus()  # before anything can touch CUDA
        self.config, self.shards, self.group = config, shards, None
        self.shipped, self.ranks = shipped, ranks  # ranks: every agent's (Plan.ranks)

    def setup(self) -> float:
        """Build the task and the agents, load the base model; returns the seconds it took."""
        start = time.perf_counter()
        cfg = load_config(weights.receive(self.config, self.shipped))
        torch.set_num_threads(placement.host_threads(cfg.runtime))
        devices.set_deterministic(cfg.runtime.deterministic)
        from decaf_ray.tasks import build_task

        task = build_task(cfg.task, cfg.lora, cfg.seed)
        load = getattr(task, "load", None)
        if load is not None:  # the one-off model load, timed apart from the rounds
            load()
        self.group = AgentGroup.build(cfg, task, ALGORITHMS[cfg.algorithm],
                                      build_optimizer(cfg.optim, cfg.total_steps), self.shards,
                                      self.ranks)
        return time.perf_counter() - start

    @ray.method(concurrency_group="ping")
    def where(self) -> dict[str, Any]:
        """This host's node, process, agents and accelerators (placement checks, liveness,
        fault injection in tests). Answers at once, even while the host is in a long step."""
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "pid": os.getpid(), "agents": sorted(self.shards),
                "gpu_ids": devices.assigned_gpu_ids(), "cuda_visible": devices.visible(),
                "device": str(devices.resolve("auto"))}

    def busy(self, seconds: float) -> None:
        """Occupy the host's call queue for ``seconds``, as a long step or evaluation would
        (fault injection in tests)."""
        time.sleep(seconds)

    def local_steps(self, t: int, count: int, steps: dict[int, int]) -> None:
        """``AgentGroup.quiet_steps``: ``steps`` holds this host's active agents' steps."""
        self.group.quiet_steps(t, count, steps)

    def publish(self, t: int, ids: list[int],
                steps: tuple[int, int, dict[int, int]] | None = None) -> tuple:
        """Agents ``ids`` (sorted, active) take their gradients and publish: one encoded
        message each, in ``ids``' order, then {agent: the message's bytes}. ``steps``: the
        round's quiet local steps (``local_steps``' arguments), sent along to save a round
        trip."""
        if steps is not None:
            self.local_steps(*steps)
        messages = self.group.messages(self.group.grads_and_payloads(t, ids))
        return (*[messages[i] for i in ids], {i: compress.nbytes(m) for i, m in messages.items()})

    def mix_and_apply(self, t: int, inbox: dict, diagnose: bool
                      ) -> tuple[dict[int, dict[str, float]], float]:
        """Fetch the neighbours' messages, decode each once, mix, apply; returns the
        diagnostics and the seconds spent mixing and applying (fetching excluded)."""
        refs = sorted({r for _, _, rs in inbox.values() for r in rs}, key=lambda r: r.hex())
        decoded = {r: compress.decode(m) for r, m in zip(refs, ray.get(refs))}
        local = {i: (ids, w, [decoded[r] for r in rs]) for i, (ids, w, rs) in inbox.items()}
        start = time.perf_counter()
        diags = self.group.mix_and_apply(t, local, diagnose)
        return diags, time.perf_counter() - start

    def evaluate(self, final: bool = False) -> dict[int, dict[str, Any]]:
        return self.group.evaluate(final)

    def factors(self) -> dict[int, NumpyFactors]:
        return {i: to_numpy(f) for i, f in self.group.factors().items()}

    def full_grads(self, factors: NumpyFactors) -> dict[int, Grads]:
        return self.group.full_grads(from_numpy(factors))

    def snapshot(self) -> dict[int, dict]:
        return self.group.snapshot()

    def restore(self, snapshot: dict[int, dict]) -> None:
        self.group.restore(snapshot)

    def base_delta(self) -> BaseDelta | None:
        return self.group.base_delta
