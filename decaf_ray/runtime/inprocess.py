"""In-process runtime: every agent in this process, one ``AgentGroup``. The reference that other
runtimes must match number for number. Float32 payloads pass by reference; compressed ones are
encoded once per sender and decoded once per message, as on a Ray host."""

from __future__ import annotations

import time
from typing import Any

import torch

from decaf_ray import compress, devices
from decaf_ray.agents import AgentGroup, Inbox
from decaf_ray.folding import BaseDelta
from decaf_ray.plan import Plan
from decaf_ray.factors import Factors, Grads
from decaf_ray.network import RoundNet
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
        self.sent_bytes: dict[int, int] = {}

    def local_steps(self, t: int, count: int, net: RoundNet) -> None:
        self.group.quiet_steps(t, count, net.steps)

    def communicate(self, t: int, diagnose: bool, net: RoundNet) -> dict[int, dict[str, float]]:
        payloads = self.group.grads_and_payloads(t, net.active)
        messages = self.group.messages(payloads)
        self.sent_bytes = {i: compress.nbytes(m) for i, m in messages.items()}
        received = {j: compress.decode(m) for j, m in messages.items()} \
            if self.group.lossy else payloads
        inbox: Inbox = {i: (ids, weights, [received[j] for j in ids])
                        for i, (ids, weights) in self.plan.schedule.inboxes(net).items()}
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

    def base_delta(self) -> BaseDelta | None:
        return self.group.base_delta

    def close(self) -> None:
        pass
