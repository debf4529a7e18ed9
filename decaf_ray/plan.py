"""What a config resolves to before anything runs, and what a run returns: the data layer every
runtime shares (``Plan``, ``RunResult``, ``Row``, ``RunFailed``).

``prepare`` resolves everything a config implies that can still be wrong (the graph, Pi, the
partition) before anything runs or is written, so bad input fails fast as a ``ConfigError``.
The runtimes (``decaf_ray.runtime``) run a ``Plan``; ``decaf_ray.experiment.run`` picks one;
``decaf_ray.results`` saves the ``RunResult``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import psutil
from scipy import sparse

from decaf_ray import partition, topology
from decaf_ray.algorithms import ALGORITHMS, Algorithm
from decaf_ray.folding import BaseDelta
from decaf_ray.tracking import tracking
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig
from decaf_ray.factors import Factors
from decaf_ray.network import Schedule
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
    pi: sparse.csr_array
    """(N, N) CSR mixing matrix the algorithm uses (FedAvg: 1/N everywhere, Local: identity);
    it stores the positive weights and the diagonal (``decaf_ray.topology``)."""
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

    ranks: tuple[int, ...] = field(default=(), compare=False)
    """Each agent's LoRA rank r_i (``lora.ranks``, ``lora.rank_rule``; all ``lora.rank`` by
    default)."""

    schedule: Schedule | None = field(default=None, repr=False, compare=False)
    """The network of each round (``network:``): who is active, whose links are up, the
    round's Pi (``decaf_ray.network``). The default network's every round is this plan's own
    graph and ``neighbourhoods``."""

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
    generations: list[dict[str, Any]] = field(default_factory=list)
    """What the task generated at the final evaluation (``evaluate_final``; the instruct task's
    benchmark answers), one record per prompt with its ``agent``; ``results`` writes them to
    ``generations.jsonl``."""
    base_delta: BaseDelta | None = None
    """S of a run whose algorithm folds into the base weights (``fedex``, ``flora``): module ->
    (d, k) float32 tensor, the frozen weights being W0 + S; None for every
    other algorithm, and for a diverged run whose last finite factors are of an earlier round
    (its S is not kept). ``results`` writes it to ``base_delta.safetensors``."""


def prepare(cfg: ExperimentConfig, task: Task | None = None) -> Plan:
    """Build the graph, Pi, the task's labels and the partition; errors name the config field."""
    algorithm = ALGORITHMS[cfg.algorithm]
    if cfg.optim.name == "adam_tracked":  # Algorithm 4: the tracker travels, and is counted
        try:
            algorithm = tracking(algorithm)
        except ValueError as e:
            raise ConfigError("optim.name", str(e)) from None
    n = 1 if algorithm.centralized else cfg.agents
    if algorithm.centralized and cfg.runtime.kind == "ray" and \
            cfg.runtime.train_workers > cfg.data.batch_size:
        raise ConfigError("runtime.train_workers", f"must be <= data.batch_size "
                          f"({cfg.data.batch_size}): each Ray Train worker takes part of a batch")
    try:
        _check_plan_memory(cfg, algorithm, n)  # from the params alone, before building
        graph = topology.build_topology(cfg.topology.name, n, **cfg.topology.params)
    except ConfigError:
        raise
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
    cap = min(min(dk) for dk in task.lora_shapes().values())
    ranks = cfg.lora.agent_ranks([int(graph.degree(i)) + 1 for i in range(n)], cap)
    if cfg.runtime.batch_agents > 1 and not hasattr(task, "loss_and_grads_many"):
        raise ConfigError("runtime.batch_agents", f"task kind {cfg.task.kind} has no batched "
                          "step (clip has); use 1")
    if cfg.runtime.batch_agents > 1 and getattr(cfg.task, "micro_batch", None) is not None:
        raise ConfigError("runtime.batch_agents", "a batched pass holds every agent's whole "
                          "batch, so task.micro_batch cannot cap it; set batch_agents: 1 or "
                          "micro_batch: null")
    pi = algorithm.mixing(graph_pi)
    nb = topology.neighbourhoods(pi)
    try:
        schedule = Schedule(graph, pi, n, cfg.network, cfg.mixing, algorithm.pi, cfg.seed,
                            cfg.local_steps, cfg.topology, neighbourhoods=nb)
    except ValueError as e:  # what ExperimentConfig refuses already, for a config built alone
        raise ConfigError("network", str(e)) from None
    return Plan(cfg, algorithm, graph, pi, make_shards(cfg, task, n), task, nb, ranks, schedule)


# What a plan holds, in bytes, measured with tracemalloc (CPython 3.11, networkx 3, scipy 1.17)
# and rounded up: per agent a networkx node (~265), its neighbourhood's tuples and its shard
# (~120 each); per edge ~160-225 of networkx dicts; per stored Pi entry 16 (float, index), ~210
# at the peak while the graph's Pi is built and checked; per neighbourhood entry ~110 at the peak
# (two tuple slots, a float, an int, and the lists they are sliced from).
AGENT_BYTES, EDGE_BYTES, PI_ENTRY_BYTES, PI_PEAK_BYTES, NEIGHBOUR_BYTES = 600, 250, 16, 220, 120


def plan_bytes(cfg: ExperimentConfig, algorithm: Algorithm, n: int) -> int:
    """Peak bytes of the graph, the mixing matrices and the neighbourhoods of ``n`` agents, from
    the config alone (nothing is built): ~0.15 GB for 10^5 agents on a ring, ~2.6 TB on a
    complete graph. FedAvg's Pi is dense by nature (each agent averages all N): N^2 entries."""
    edges = topology.edge_count(cfg.topology.name, n, **cfg.topology.params)
    return _peak_bytes(n, edges, algorithm, cfg.mixing.scheme)


def _peak_bytes(n: int, edges: int, algorithm: Algorithm, scheme: str) -> int:
    graph_nnz = n + 2 * edges
    used = {"graph": graph_nnz, "identity": n, "server": n * n}[algorithm.pi]
    held = AGENT_BYTES * n + EDGE_BYTES * edges
    if scheme == "matrix":
        held += 3 * 8 * n * n  # the user's dense (n, n) matrix, clipped, then symmetrized
    building_pi = held + PI_PEAK_BYTES * graph_nnz
    reading_pi = held + PI_ENTRY_BYTES * (graph_nnz + (used if algorithm.pi != "graph" else 0)) \
        + NEIGHBOUR_BYTES * used
    return max(building_pi, reading_pi)


def _check_plan_memory(cfg: ExperimentConfig, algorithm: Algorithm, n: int) -> None:
    """Refuse, before building anything, a plan that would not fit in half of this machine's
    available memory (``plan_bytes``); ValueError for bad topology params, as building would."""
    need, have = plan_bytes(cfg, algorithm, n), psutil.virtual_memory().available
    if need <= have / 2:
        return
    edges = topology.edge_count(cfg.topology.name, n, **cfg.topology.params)
    lo, hi = 1, n  # bisect the most agents that fit, topology and algorithm kept
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            m_edges = topology.edge_count(cfg.topology.name, mid, **cfg.topology.params)
        except ValueError:  # rows, degree or k that suit n only: those graphs grow linearly
            m_edges = edges * mid // n
        lo, hi = (mid, hi) if _peak_bytes(mid, m_edges, algorithm, cfg.mixing.scheme) <= have / 2 \
            else (lo, mid - 1)
    raise ConfigError("agents", f"{n} agents on {cfg.topology.name} with {algorithm.name} need "
                      f"about {need / 1e9:.1f} GB (graph, mixing matrices, neighbourhoods); this "
                      f"machine has {have / 1e9:.1f} GB available (at most about {lo} agents)")


def _check_rank(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    """LoRA's rank cannot exceed min(d, k) of any adapted (d, k) weight: B A would have more
    factors than the weight has rank, and the extra directions only cost memory."""
    name, (d, k) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(d, k):
        raise ConfigError("lora.rank", f"{rank} exceeds min(d, k) = {min(d, k)} of the adapted "
                          f"weight {name} ({d} x {k}); use at most {min(d, k)}")


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
