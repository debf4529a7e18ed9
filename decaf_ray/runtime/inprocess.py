"""In-process runtime: every agent in this process, one ``AgentGroup``. The reference that other
runtimes must match number for number."""

from __future__ import annotations

import time
from typing import Any

import torch

from decaf_ray import devices
from decaf_ray.agents import AgentGroup, Inbox
from decaf_ray.plan import Plan
from decaf_ray.factors import Factors, Grads
from decaf_ray.optim import build_optimizer


class InProcessHosts:
    """``Hosts`` (see ``runtime.loop``) backed by one local group; payloads pass by reference."""

    def __init__(self, plan: Plan):
        cfg = plan.config
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.plan = plan
        devices.set_deterministic(cfg.runtime.deterministic)
        start = time.perf_counter()
        load = getattr(plan.task, "load", None)
        if load is not None:  # the one-off model load, timed apart from the rounds
            load()
        self.group = AgentGroup.build(cfg, plan.task, plan.algorithm,
                                      build_optimizer(cfg.optim, cfg.total_steps),
                                      dict(enumerate(plan.shards)), plan.ranks)
        self.load_s, self.mix_s = time.perf_counter() - start, 0.0

    def local_steps(self, t: int, count: int) -> None:
        for step in range(t, t + count):
            self.group.local_step(step)

    def communicate(self, t: int, diagnose: bool) -> dict[int, dict[str, float]]:
        payloads = self.group.grads_and_payloads(t)
        inbox: Inbox = {}
        for i in payloads:
            ids, weights = self.plan.neighbours(i)
            inbox[i] = (ids, weights, [payloads[j] for j in ids])
        start = time.perf_counter()
        diags = self.group.mix_and_apply(t, inbox, diagnose)
        self.mix_s = time.perf_counter() - start
        return diags

    def evaluate(self, final: bool = False) -> dict[int, dict[str, Any]]:
        return self.group.evaluate(final)

    def factors(self) -> dict[int, Factors]:
        return self.group.factors()

    def full_grads(self, factors: Factors) -> dict[int, Grads]:
        return self.group.full_grads(factors)

    def end_round(self, rnd: int) -> None:
        pass

    def snapshot(self) -> dict[int, dict]:
        return self.group.snapshot()

    def restore(self, agents: dict[int, dict]) -> None:
        self.group.restore(agents)

    def close(self) -> None:
        pass
