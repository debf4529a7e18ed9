"""Config sections: YAML or dict -> frozen dataclasses, validated once at the edge.

Every section is a frozen dataclass, parsed by ``decaf_ray.config_parse`` (``from_dict`` /
``load_as`` reject unknown keys, wrong types and impossible values with a ``ConfigError`` naming
the field and what would be valid); past this edge the config is trusted. Tasks build their own sections from these parts
(``require``, ``load_as``); the whole experiment, with its task's section, is
``decaf_ray.experiment_config.ExperimentConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

# The parsing lives in config_parse; its names are re-exported here, where every module
# (tasks included) imports them from.
from decaf_ray.config_parse import (ConfigError, apply_override, first_difference, from_dict,
                                    load_as, read_yaml, require, require_name)

__all__ = ["ConfigError", "apply_override", "first_difference", "from_dict", "load_as",
           "read_yaml", "require", "require_name", "TopologyConfig", "MixingConfig",
           "DataConfig", "LoRAConfig", "OptimConfig", "ConsensusConfig", "RuntimeConfig"]


@dataclass(frozen=True)
class TopologyConfig:
    """The communication graph: a name from ``topology.TOPOLOGIES`` plus its parameters.

    YAML: ``topology: ring`` or ``topology: {name: erdos_renyi, p: 0.3, seed: 1}``.
    """

    name: str = "complete"
    """``complete``, ``ring``, ``bipartite`` (even against odd agents), ``star``, ``grid``,
    ``torus`` (``rows``), ``exponential`` (i ~ i +- 2^j), ``erdos_renyi`` (``p``, ``seed``; redrawn
    until connected), ``random_regular`` (``degree``, ``seed``), ``small_world`` (``k``, ``p``,
    ``seed``) or ``edges`` (``edges: [[0, 1], ...]`` or ``path``): parameters in brackets."""
    params: dict[str, Any] = field(default_factory=dict)
    """The graph's parameters, written beside ``name`` in YAML, not under ``params``."""

    @staticmethod
    def shorthand(data: Any, path: str) -> Any:
        """``topology: ring``; graph parameters live beside ``name``, not under ``params``."""
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, Mapping):
            key = f"{path}.params" if path else "params"
            require("params" not in data, key,
                    "put graph parameters beside name (e.g. {name: erdos_renyi, p: 0.3})")
            return {"name": data.get("name", "complete"),
                    "params": {k: v for k, v in data.items() if k != "name"}}
        return data


@dataclass(frozen=True)
class MixingConfig:
    """How Pi is built: ``uniform`` (the paper's A.4.1, regular graphs), ``metropolis``,
    ``max_degree``, or ``matrix`` (a user matrix: nested list or a .npy/.csv/.txt path).

    Metropolis-Hastings is the default because on a regular graph it equals the paper's uniform
    weights and, unlike them, is doubly stochastic on any graph.
    """

    scheme: Literal["uniform", "metropolis", "max_degree", "matrix"] = "metropolis"
    matrix: Any = None
    """``scheme: matrix`` only: nested list or a .npy/.csv/.txt path, symmetric doubly stochastic."""

    @staticmethod
    def shorthand(data: Any, path: str) -> Any:
        """``mixing: uniform``."""
        return {"scheme": data} if isinstance(data, str) else data

    def __post_init__(self):
        require((self.scheme == "matrix") == (self.matrix is not None), "matrix",
               "give a matrix (nested list or file path) exactly when scheme is 'matrix'")


@dataclass(frozen=True)
class DataConfig:
    """How the training set is cut into agents' shards (``decaf_ray.partition``)."""

    partition: Literal["iid", "classes_per_agent", "dirichlet", "shards"] = "iid"
    shots: int | None = None
    """Few-shot subsample per class taken before partitioning (the paper: 40); None = all."""
    classes_per_agent: int = 1
    """``classes_per_agent`` (the paper's non-IID split): the classes each agent holds."""
    alpha: float = 0.5
    """``dirichlet``: the concentration over classes; smaller is more skewed."""
    min_size: int = 1
    """``dirichlet``: the least examples an agent gets (the draw is repeated until it does)."""
    shards_per_agent: int = 2
    """``shards``: label-sorted shards dealt to each agent."""
    batch_size: int = 32
    """Examples per gradient step, per agent."""

    def __post_init__(self):
        require(self.shots is None or self.shots >= 1, "shots", "must be >= 1 or null (all)")
        require(self.classes_per_agent >= 1, "classes_per_agent", "must be >= 1")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(self.min_size >= 1, "min_size", "must be >= 1")
        require(self.shards_per_agent >= 1, "shards_per_agent", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")

    def partition_params(self) -> dict[str, Any]:
        """The keyword arguments of the chosen partitioner."""
        return {"iid": {},
                "classes_per_agent": {"classes_per_agent": self.classes_per_agent},
                "dirichlet": {"alpha": self.alpha, "min_size": self.min_size},
                "shards": {"shards_per_agent": self.shards_per_agent}}[self.partition]


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters: W = W0 + s B A with A (r, k), B (d, r) (paper, Eq. 1)."""

    rank: int = 4
    alpha: float = 8.0
    """The scale s is alpha / r (or alpha / sqrt(r), per ``scaling``)."""
    dropout: float = 0.0
    """LoRA dropout on the adapter's input."""
    scaling: Literal["alpha/r", "alpha/sqrt(r)"] = "alpha/r"
    init_std: float | None = None
    """Std of the Gaussian A at init; null = 1/sqrt(3k), the scale of peft's default init."""
    ranks: list[int] | None = None
    """Per-agent ranks [r_0, ..., r_{N-1}], one per agent: agent i holds A_i (r_i, k), B_i
    (d, r_i). null: ``rank_rule`` decides. ``rank`` still sets the scale s for every agent, so
    s B_i A_i means the same weight change whatever r_i (products of different ranks mix)."""
    rank_rule: Literal["uniform", "neighbourhood"] = "uniform"
    """``uniform``: every agent has ``rank``. ``neighbourhood``: agent i's rank grows with its
    neighbourhood, r_i = min(rank_max, max(1, floor(rank m_i / mean_j m_j + 1/2))) with
    m_i = |N_b(i)| = its degree in the graph + 1 (itself): the agents' mean rank stays near
    ``rank``, and an agent that mixes more products keeps more of their rank: DeCAF's TSVD
    error is bounded by sqrt(sum_{j in N_b(i)} r_j - r_i) c^2 (Proposition 1, whose
    sqrt((m_i - 1) r) c^2 is the case of equal ranks), which grows with m_i at a fixed r_i."""
    rank_max: int | None = None
    """``neighbourhood`` only: the largest rank it gives; null: min(d, k) of the smallest
    adapted weight (the most a rank can be)."""

    def __post_init__(self):
        require(self.rank >= 1, "rank", f"must be >= 1 (got {self.rank})")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self.init_std is None or self.init_std > 0, "init_std", "must be > 0 or null")
        require(self.ranks is None or (len(self.ranks) >= 1 and all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.ranks)),
            "ranks", f"must be a list of integers >= 1, one per agent, or null (got {self.ranks})")
        require(self.ranks is None or self.rank_rule == "uniform", "ranks",
                f"give per-agent ranks or rank_rule {self.rank_rule}, not both")
        require(self.rank_max is None or self.rank_rule == "neighbourhood", "rank_max",
                "only rank_rule neighbourhood reads it; leave it null")
        require(self.rank_max is None or self.rank_max >= 1, "rank_max", "must be >= 1 or null")

    @property
    def per_agent(self) -> str | None:
        """The field that gives agents their own ranks (``ranks`` or ``rank_rule``); None when
        every agent has ``rank``."""
        return "ranks" if self.ranks is not None else (
            "rank_rule" if self.rank_rule != "uniform" else None)

    def agent_ranks(self, sizes: list[int], cap: int) -> tuple[int, ...]:
        """Each agent's rank, given m_i = |N_b(i)| (``sizes``, N of them) and the largest rank
        the adapted weights allow (``cap``, min(d, k)); see ``rank_rule``.

        Raises:
            ConfigError: ``ranks`` above ``cap``.
        """
        n = len(sizes)
        if self.ranks is not None:  # its length is checked with the agents' count, at the edge
            require(max(self.ranks) <= cap, "lora.ranks", f"{max(self.ranks)} exceeds min(d, k) "
                    f"= {cap} of the smallest adapted weight")
            return tuple(self.ranks)
        if self.rank_rule == "uniform":
            return (self.rank,) * n
        top, total = self.max_rank(cap), sum(sizes)
        # floor(rank m / (total / n) + 1/2) in integers, so a tie rounds up on every machine
        return tuple(min(top, max(1, (2 * self.rank * m * n + total) // (2 * total)))
                     for m in sizes)

    def max_rank(self, cap: int) -> int:
        """The largest rank any agent may hold, given min(d, k) of the smallest adapted weight
        (``cap``): ``rank``, the largest of ``ranks`` (``agent_ranks`` refuses one above
        ``cap``), or ``neighbourhood``'s ``rank_max``, else ``cap``."""
        if self.ranks is not None:
            return max(self.ranks)
        if self.rank_rule == "uniform":
            return self.rank
        return min(cap, self.rank_max or cap)

    @property
    def scale(self) -> float:
        """s in W0 + s B A: alpha / r, or alpha / sqrt(r) (rank-stabilised LoRA)."""
        r = self.rank if self.scaling == "alpha/r" else math.sqrt(self.rank)
        return self.alpha / r


@dataclass(frozen=True)
class OptimConfig:
    """Per-agent optimizer: ``sgd`` (Algorithm 1), ``momentum`` (heavy ball, Algorithm 3),
    ``adam`` / ``adamw`` (local Adam: bias-corrected, each agent's moments its own, never
    mixed), or ``adam_tracked`` (the paper's Algorithm 4, DLoRA-Adam / DeCAF-Adam: a
    second-moment tracker mixed with the factors at every communication, which doubles what
    an agent sends; decaf, dlora and dlora_fa only). See ``decaf_ray.optim``."""

    name: Literal["sgd", "momentum", "adam", "adamw", "adam_tracked"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    """Adam's eps, added to sqrt(v); ``adam_tracked`` floors the tracker at eps instead."""
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    h: Literal["adam", "amsgrad"] = "adam"
    """``adam_tracked``'s second-moment rule h_t: ``adam``, the moving average
    V_t = b2 V_{t-1} + (1 - b2) g_t^2, or ``amsgrad``, the running max of that average."""

    def __post_init__(self):
        require(self.h == "adam" or self.name == "adam_tracked", "h",
                "only optim.name adam_tracked reads it; leave it adam")
        require(self.lr > 0, "lr", "must be > 0")
        require(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        require(all(0.0 <= b < 1.0 for b in self.betas), "betas", "both must be in [0, 1)")
        require(self.eps > 0, "eps", "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0.0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")


@dataclass(frozen=True)
class ConsensusConfig:
    """DeCAF's re-factorization: which split of the TSVD each agent keeps, and what happens to
    its optimizer state (momentum, Adam moments) when the factors change basis.

    The default, ``conserved`` with ``keep``, was chosen by the studies in
    docs/results/README.md; the paper's DeCAF is ``balanced``/``keep`` (its sweeps pin it).
    """

    split: Literal["balanced", "left", "aligned", "conserved"] = "conserved"
    """``balanced`` (U S^1/2, S^1/2 V^T: the paper), ``left`` (U S, V^T), ``aligned`` (balanced,
    then rotated by orthogonal Procrustes onto the agent's previous factors; same product),
    ``conserved`` (aligned, then A / c, c B with the scalar c that keeps the agent's
    ||B||^2 - ||A||^2, which gradient flow conserves)."""
    state: Literal["keep", "rotate", "reset"] = "keep"
    """``keep`` the moments as they are, ``rotate`` them with the best orthogonal map from the
    old factors to the new (the same as ``keep`` after ``aligned``), or ``reset`` them to zero."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Where agents live.

    ``ray`` (default): a Coordinator actor and AgentHost actors on the Ray cluster at
    ``RAY_ADDRESS``, or on an embedded local Ray; ``inprocess``: every agent in this process (the
    reference). Both give the same numbers for the same config and seed.
    """

    kind: Literal["ray", "inprocess"] = "ray"
    agents_per_host: int = 1
    """Agents sharing one host actor (one frozen base model); 1 is the paper's picture."""
    cpus_per_host: float | None = None
    """CPUs reserved per host; null shares the cluster's CPUs evenly, at most 1 per host."""
    gpus_per_host: float = 0.0
    """GPUs reserved per host (fractional packs several hosts on one GPU). A host uses exactly
    the GPUs Ray assigned to it (``device: auto``); with 0 it runs on the CPU and sees no GPU."""
    placement_timeout_s: float = 600.0
    """How long a run waits for its hosts to be placed (busy nodes, an autoscaler adding one)
    before it ends with a line naming the pending resources. A request no node could ever hold
    fails at once instead."""
    max_host_restarts: int = 3
    """Host deaths the run recovers from (restart, restore the last round, replay)."""
    checkpoint_every: int = 10
    """Rounds between the snapshots a crashed host is restored from (recovery replays at most
    this many rounds; the numbers are the same whatever its value)."""
    batch_agents: int = 1
    """Agents of a host whose training steps run as one forward and backward pass over the
    shared base model (each adding its own LoRA delta on its own rows): fewer, larger matrix
    products, so faster where one agent's batch leaves the hardware idle; activations grow as
    many times. At most ``agents_per_host``; the in-process runtime groups agents the same way.
    On the CPU the numbers equal unbatched steps up to float rounding (the same augmentation and
    LoRA dropout draws); on a GPU, and with open_clip's patch dropout, the dropout draws differ
    (same distribution). Not with the task's ``micro_batch``. Tasks with a batched step: clip."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms`` in every process that trains (and cuBLAS's
    workspace set for it): on GPUs, the same config and seed then give the same numbers run to
    run, at some speed cost. Bit-exactness across runtimes and restarts is a CPU promise; on a
    GPU without this, kernels (atomics in backward passes) may round differently each run."""
    threads: int | None = None
    """torch threads per process; null: torch's default in-process, the host's CPUs on Ray."""
    train_workers: int = 1
    """Centralized on Ray runs as a Ray Train ``TorchTrainer`` with this many data-parallel
    workers (each with ``cpus_per_host``/``gpus_per_host``): every batch is split between them
    and their gradients averaged. One worker gives the in-process numbers exactly; more agree
    with them to float rounding (the batch gradient is summed in chunks)."""

    def __post_init__(self):
        require(self.agents_per_host >= 1, "agents_per_host", "must be >= 1")
        require(1 <= self.batch_agents <= self.agents_per_host, "batch_agents",
               f"must be between 1 and agents_per_host ({self.agents_per_host}): agents batched "
               "together share a host")
        require(self.train_workers >= 1, "train_workers", "must be >= 1")
        require(self.cpus_per_host is None or self.cpus_per_host > 0, "cpus_per_host",
               "must be > 0 or null")
        require(self.gpus_per_host >= 0, "gpus_per_host", "must be >= 0")
        require(self.gpus_per_host <= 1 or float(self.gpus_per_host).is_integer(),
               "gpus_per_host", f"a fraction of one GPU or a whole number (got "
               f"{self.gpus_per_host}): Ray places fractions above 1 on no node")
        require(self.placement_timeout_s > 0, "placement_timeout_s", "must be > 0")
        require(self.max_host_restarts >= 0, "max_host_restarts", "must be >= 0")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        require(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
