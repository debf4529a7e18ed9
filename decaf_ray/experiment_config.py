"""The whole experiment's config: ``ExperimentConfig`` (every section of ``decaf_ray.config`` plus
the task's own section) and ``load_config``, YAML or dict -> a validated, frozen config.

It sits above the tasks: a ``task:`` section is the dataclass its kind registers in
``decaf_ray.tasks.TASKS``, imported only when that kind is used.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from decaf_ray.algorithms import ALGORITHMS
from decaf_ray.config import (ConfigError, ConsensusConfig, DataConfig, LoRAConfig, MixingConfig,
                              OptimConfig, RuntimeConfig, TopologyConfig, load_as, require,
                              require_name)
from decaf_ray.network_config import NetworkConfig, check_experiment, read_trace
from decaf_ray.tasks import TASKS, task_config_class


def _task_class(value: Any, path: str) -> type:
    kind = value if isinstance(value, str) else (value or {}).get("kind")
    if kind not in TASKS:
        raise ConfigError(f"{path}.kind" if path else "kind",
                          f"unknown task kind {kind!r}; valid: {', '.join(TASKS)}")
    return task_config_class(kind)


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: N agents, a graph, an algorithm and a task, run for ``rounds`` rounds.

    A round is ``local_steps`` (tau) gradient steps, the last of which communicates; evaluation
    happens every ``eval_every`` rounds and after the last.
    """

    task: Any = field(metadata={"section": _task_class})
    """What is trained, on what data: the section of its ``kind`` (the model, data, loss)."""
    algorithm: str = "decaf"
    """``decaf``, ``dlora``, ``dlora_fa``, ``fedsa``, ``alternating``, ``hetlora``, ``fedavg``,
    ``fedavg_fa``, ``fedex``, ``flora``, ``local``, ``local_fa`` or ``centralized``
    (``decaf_ray.algorithms.ALGORITHMS``); the FA variants keep A frozen, ``fedsa`` sends only
    A, ``alternating`` trains and sends B in odd rounds and A in even ones, ``hetlora`` mixes
    agents of different ranks (``lora.ranks``); ``fedex`` and ``flora`` are server algorithms
    that fold into the frozen base weights (FedEx-LoRA's residual, FLoRA's stacked product)."""
    agents: int = 10
    """N, the number of agents."""
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    """The communication graph."""
    mixing: MixingConfig = field(default_factory=MixingConfig)
    """How the mixing matrix Pi is built from the graph."""
    rounds: int = 100
    """Communication rounds."""
    local_steps: int = 1
    """Gradient steps per round (tau); the last of them communicates."""
    eval_every: int = 1
    """Evaluate every so many rounds, and after the last."""
    seed: int = 0
    """One seed for the data split, the initial adapter, batch order and dropout."""
    data: DataConfig = field(default_factory=DataConfig)
    """How the training set is cut into the agents' shards."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """The adapters. Every agent starts from the same one: A Gaussian from the seed, B = 0."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Each agent's optimizer."""
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    """DeCAF's re-factorization after each mix."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Where the agents live: in this process or on Ray, and what each host reserves."""
    grad_norm: bool = True
    """Evaluate ||grad f||^2 at the network-average adapter (Theorem 1's measure); it costs a
    full-shard gradient per agent per evaluation, so turn it off for large models."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """The network each round runs on: time-varying graphs, partial participation, churn, link
    failures, stragglers, compressed messages and a simulated clock (default: the fixed graph,
    everyone present, float32)."""
    name: str | None = None
    """The run's name: ``decaf-ray run`` without ``--out`` writes to runs/<name>-<time> (null:
    the algorithm's name)."""

    def __post_init__(self):
        require(self.algorithm in ALGORITHMS, "algorithm",
               f"unknown algorithm {self.algorithm!r}; valid: {', '.join(ALGORITHMS)}")
        require(self.agents >= 1, "agents", f"must be >= 1 (got {self.agents})")
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.local_steps >= 1, "local_steps", "must be >= 1")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(0 <= self.seed < 2**63, "seed", f"must be between 0 and 2^63 - 1 (got {self.seed})")
        require_name(self.name, "name")
        self._check_ranks()
        algorithm = ALGORITHMS[self.algorithm]
        check_experiment(self.network, agents=self.agents, rounds=self.rounds, kind=algorithm.pi,
                         centralized=algorithm.centralized, scheme=self.mixing.scheme,
                         topology=self.topology.name)

    def _check_ranks(self) -> None:
        """Per-agent ranks (``lora.ranks``, ``lora.rank_rule``) need an algorithm whose mix is
        defined across ranks and a task that takes any rank per call."""
        field = self.lora.per_agent
        if field is None:
            return
        algorithm, key = ALGORITHMS[self.algorithm], f"lora.{field}"
        why = "trains one agent" if algorithm.centralized else "averages factors of one shape"
        able = ", ".join(n for n, a in ALGORITHMS.items() if a.mixed_ranks)
        require(algorithm.mixed_ranks, key,
                f"{self.algorithm} {why}; agents of different ranks need one of {able}")
        require(self.lora.ranks is None or len(self.lora.ranks) == self.agents, key,
                f"one rank per agent: {len(self.lora.ranks or [])} given for {self.agents} agents")
        require(getattr(self.task, "any_rank", False), key,
                f"task kind {self.task.kind} builds one LoRA rank into its model; per-agent ranks "
                f"need a task that takes any rank per call (synthetic)")

    @property
    def total_steps(self) -> int:
        """T in Algorithm 1: rounds x local_steps."""
        return self.rounds * self.local_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready) that ``from_dict`` reads back to an equal config."""
        out = dataclasses.asdict(self)
        out["topology"] = {"name": self.topology.name, **self.topology.params}
        out["optim"]["betas"] = list(self.optim.betas)
        return out


def load_config(source: str | Path | Mapping[str, Any],
                overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment config from a YAML file or a mapping; see ``load_as``."""
    return load_as(ExperimentConfig, source, overrides)


def self_contained(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the files it names by path read into it: a user mixing matrix
    (``mixing.matrix``), an edge list (``topology: {name: edges, path: ...}``) and an
    availability trace (``network.availability.trace``), so that the
    ``config.json`` a run writes re-runs anywhere, not only from the folder the path was
    relative to. Same graph, same Pi: float64 values round-trip exactly through JSON."""
    from decaf_ray import topology, topology_graphs

    if isinstance(cfg.mixing.matrix, (str, os.PathLike)):
        matrix = topology.read_matrix(cfg.mixing.matrix).tolist()
        cfg = dataclasses.replace(cfg, mixing=dataclasses.replace(cfg.mixing, matrix=matrix))
    params = cfg.topology.params
    if cfg.topology.name == "edges" and params.get("path") is not None:
        edges = topology_graphs.read_edges(params["path"])
        rest = {k: v for k, v in params.items() if k != "path"}
        cfg = dataclasses.replace(cfg, topology=dataclasses.replace(
            cfg.topology, params={**rest, "edges": [list(e) for e in edges]}))
    available = cfg.network.availability
    if available is not None and isinstance(available.trace, (str, os.PathLike)):
        available = dataclasses.replace(available, trace=read_trace(available.trace))
        cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network,
                                                                   availability=available))
    return cfg
