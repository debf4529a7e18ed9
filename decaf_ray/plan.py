"""What a config resolves to before anything runs, and what a run returns: the data layer every
runtime shares (``Plan``, ``RunResult``, ``Row``, ``RunFailed``).

``prepare`` resolves everything a config implies that can still be wrong (the graph, Pi, the
partition) before anything runs or is written, so bad input fails fast as a ``ConfigError``.
The runtimes (``decaf_ray.runtime``) run a ``Plan``; ``decaf_ray.experiment.run`` picks one;
``decaf_ray.results`` saves the ``RunResult``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import psutil

from decaf_ray import partition, topology
from decaf_ray.algorithms import ALGORITHMS, Algorithm
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig
from decaf_ray.factors import Factors
from decaf_ray.tasks import Task, build_task

Row = dict[str, Any]
"""One long-form metric row: round, step, agent (-1 for network-level), metric, value."""


class RunFailed(RuntimeError):
    """A run that could not finish, e.g. hosts died more often than the runtime allows."""


@dataclass(frozen=True)
class Plan:
    """What a config resolves to before training: every runtime runs a Plan."""

    config: ExperimentConfig
    algorithm: Algorithm
    graph: nx.Graph
    pi: np.ndarray
    """(N, N) mixing matrix the algorithm uses (FedAvg: 1/N everywhere, Local: identity)."""
    shards: list[np.ndarray]
    """Training indices of each agent."""
    task: Task = field(repr=False, compare=False)

    @property
    def agents(self) -> int:
        return len(self.shards)

    neighbourhoods: tuple[tuple[tuple[int, ...], tuple[float, ...]], ...] = field(
        default=(), repr=False, compare=False)
    """Per agent: neighbours j with pi_ij > 0 (self included) and their weights, read from Pi
    once so the runtimes' per-round loops do not."""

    def neighbours(self, i: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Agent i's neighbours j with pi_ij > 0 (self included) and their weights."""
        return self.neighbourhoods[i]

    def degree(self, i: int) -> int:
        return int(self.graph.degree(i)) if self.graph.number_of_nodes() > i else 0


@dataclass
class RunResult:
    """What a run returns; ``results.save`` writes it, the analysis reads what was written."""

    config: ExperimentConfig
    status: str
    """``completed``, ``diverged`` or ``interrupted``."""
    rows: list[Row]
    summary: dict[str, Any]
    factors: dict[int, Factors]


def prepare(cfg: ExperimentConfig, task: Task | None = None) -> Plan:
    """Build the graph, Pi, the task's labels and the partition; errors name the config field."""
    algorithm = ALGORITHMS[cfg.algorithm]
    n = 1 if algorithm.centralized else cfg.agents
    if algorithm.centralized and cfg.runtime.kind == "ray" and \
            cfg.runtime.train_workers > cfg.data.batch_size:
        raise ConfigError("runtime.train_workers", f"must be <= data.batch_size "
                          f"({cfg.data.batch_size}): each Ray Train worker takes part of a batch")
    _check_plan_memory(n)
    try:
        graph = topology.build_topology(cfg.topology.name, n, **cfg.topology.params)
    except (ValueError, TypeError) as e:
        raise ConfigError("topology", str(e)) from None
    try:
        graph_pi = topology.mixing_matrix(graph, cfg.mixing.scheme, cfg.mixing.matrix)
    except (ValueError, OSError) as e:
        raise ConfigError("mixing", str(e)) from None
    device = getattr(cfg.task, "device", "auto")
    if cfg.runtime.kind == "ray" and device.startswith("cuda") and not cfg.runtime.gpus_per_host:
        raise ConfigError("task.device", f"{device} on Ray needs GPUs reserved per host: set "
                          "runtime.gpus_per_host (a host that reserves none runs on the CPU and "
                          "sees no GPU), or device: auto")
    task = task if task is not None else build_task(cfg.task, cfg.lora, cfg.seed)
    _check_rank(cfg.lora.rank, task.lora_shapes())
    if cfg.runtime.batch_agents > 1 and not hasattr(task, "loss_and_grads_many"):
        raise ConfigError("runtime.batch_agents", f"task kind {cfg.task.kind} has no batched "
                          "step (clip has); use 1")
    if cfg.runtime.batch_agents > 1 and getattr(cfg.task, "micro_batch", None) is not None:
        raise ConfigError("runtime.batch_agents", "a batched pass holds every agent's whole "
                          "batch, so task.micro_batch cannot cap it; set batch_agents: 1 or "
                          "micro_batch: null")
    pi = algorithm.mixing(graph_pi)
    return Plan(cfg, algorithm, graph, pi, make_shards(cfg, task, n), task,
                tuple(_neighbourhood(pi, i) for i in range(n)))


PI_BYTES_PER_ENTRY = 8 * 2
"""Pi is a dense (N, N) float64 matrix, made twice over (the graph's, then the algorithm's)."""


def _check_plan_memory(n: int) -> None:
    """Refuse, before allocating, a plan whose mixing matrices would not fit in half of this
    machine's available memory (10^5 agents need 160 GB)."""
    need = PI_BYTES_PER_ENTRY * n * n
    have = psutil.virtual_memory().available
    if need > have / 2:
        raise ConfigError("agents", f"{n} agents need {need / 1e9:.1f} GB for the dense N x N "
                          f"mixing matrices; this machine has {have / 1e9:.1f} GB available "
                          f"(at most about {math.isqrt(int(have / 2 / PI_BYTES_PER_ENTRY))} "
                          "agents)")


def _check_rank(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    """LoRA's rank cannot exceed min(d, k) of any adapted (d, k) weight: B A would have more
    factors than the weight has rank, and the extra directions only cost memory."""
    name, (d, k) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(d, k):
        raise ConfigError("lora.rank", f"{rank} exceeds min(d, k) = {min(d, k)} of the adapted "
                          f"weight {name} ({d} x {k}); use at most {min(d, k)}")


def _neighbourhood(pi: np.ndarray, i: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    ids, w = topology.neighbours(pi, i)
    return tuple(int(j) for j in ids), tuple(float(x) for x in w)


def make_shards(cfg: ExperimentConfig, task: Task, n: int) -> list[np.ndarray]:
    """Few-shot subsample, then the configured partition into ``n`` shards (one for
    Centralized, which trains one agent on everything)."""
    labels = np.asarray(task.train_labels)
    try:
        pool = partition.few_shot(labels, cfg.data.shots, cfg.seed)
        if n == 1:
            return [pool]
        parts = partition.partition(labels[pool], n, cfg.data.partition, cfg.seed,
                                    **cfg.data.partition_params())
    except ValueError as e:
        raise ConfigError("data", str(e)) from None
    return [pool[p] for p in parts]
