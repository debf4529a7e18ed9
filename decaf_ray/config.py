"""Config sections: YAML or dict -> frozen dataclasses, validated once at the edge.

Every section is a frozen dataclass. ``from_dict`` / ``load_as`` reject unknown keys, wrong
types and impossible values with a ``ConfigError`` whose text names the field and what would be
valid; past this module the config is trusted. Tasks build their own sections from these parts
(``require``, ``load_as``); the whole experiment, with its task's section, is
``decaf_ray.experiment_config.ExperimentConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """A bad config value: ``field`` is the dotted path, ``message`` what would be valid."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message

    def __reduce__(self):  # crosses process boundaries (raised in a Ray actor, shown here)
        return type(self), (self.field, self.message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


def require(ok: bool, name: str, message: str) -> None:
    """Raise ``ConfigError(name, message)`` unless ``ok``: the check every section's
    ``__post_init__`` makes, tasks' sections included."""
    if not ok:
        raise ConfigError(name, message)


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

    def __post_init__(self):
        require(self.rank >= 1, "rank", f"must be >= 1 (got {self.rank})")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self.init_std is None or self.init_std > 0, "init_std", "must be > 0 or null")

    @property
    def scale(self) -> float:
        """s in W0 + s B A: alpha / r, or alpha / sqrt(r) (rank-stabilised LoRA)."""
        r = self.rank if self.scaling == "alpha/r" else math.sqrt(self.rank)
        return self.alpha / r


@dataclass(frozen=True)
class OptimConfig:
    """Per-agent optimizer (Algorithms 1, 3, 4): sgd, momentum (heavy ball), adam, adamw."""

    name: Literal["sgd", "momentum", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
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


# ---------------------------------------------------------------------------- loading


def load_as(cls: type, source: str | Path | Mapping[str, Any],
            overrides: list[str] | None = None) -> Any:
    """Read a YAML file (safe loader) or a mapping, apply ``key.path=value`` overrides, and
    validate into the dataclass ``cls``.

    Raises:
        ConfigError: naming the field (or the file) and what would be valid.
    """
    data = read_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    for item in overrides or []:
        data = apply_override(data, item)
    return from_dict(cls, data)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML lets the last
    win silently, so a duplicated ``lora:`` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with file-level errors as ConfigError (``FILE:LINE`` where
    YAML says where)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "no such config file")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(where, f"not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must hold a YAML mapping of config keys")
    return data


def apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` set; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError("--set", f"expected key.path=value, got {item!r}")
    value = yaml.safe_load(raw) if raw else None
    out = dict(data)
    node = out
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part in ("topology", "mixing", "task"):
            child = {"name" if part == "topology" else ("scheme" if part == "mixing" else "kind"): child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section; cannot set a key under it")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value
    return out


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types; errors name the field."""
    data = _normalise_section(cls, data, path)
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_join(path, str(key)), f"unknown key; valid: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name), cls, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise (e.under(path) if path else e) from None


def _normalise_section(cls: type, data: Any, path: str) -> Any:
    """Shorthands: ``topology: ring``, ``mixing: uniform``, ``task: synthetic``; topology
    parameters live beside ``name``."""
    if cls is TopologyConfig:
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, Mapping):
            require("params" not in data, _join(path, "params"),
                   "put graph parameters beside name (e.g. {name: erdos_renyi, p: 0.3})")
            return {"name": data.get("name", "complete"),
                    "params": {k: v for k, v in data.items() if k != "name"}}
    if cls is MixingConfig and isinstance(data, str):
        return {"scheme": data}
    return data


def _coerce(value: Any, tp: Any, path: str, owner: type, name: str) -> Any:
    section = _field(owner, name).metadata.get("section")
    if section is not None:  # a section whose class the value names, e.g. ``task: {kind: clip}``
        return from_dict(section(value, path), {"kind": value} if isinstance(value, str)
                         else value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, owner, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"got {value!r}; valid: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(path, f"expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]", owner, name) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, dict) or tp is Any:
        if origin is list and not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {value!r}")
        if origin is dict and not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return value
    return _scalar(value, tp, path)


def _field(owner: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(owner) if f.name == name)


def _scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {path} has unsupported type {tp!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")


def require_name(value: str | None, field: str) -> None:
    """A run's or sweep's name becomes one folder: one safe path component (letters, digits and
    ``_ . = + -``, not starting with a dot or dash), never a path that could leave its parent."""
    require(value is None or (isinstance(value, str) and NAME.fullmatch(value) is not None),
            field, f"{value!r} is not a name: use letters, digits and _ . = + - (no '/', no "
            "leading '.' or '-', at most 128 characters)")


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """The first dotted key where two plain config dicts differ, as ``key: old -> new``."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path}: {a!r} -> {b!r}"
