"""The ``network:`` section of the config: who is present each round, which links carry,
how slow agents are, how messages are compressed, and the simulated clock (issue 18).

Frozen dataclasses, validated here for what each field can check alone; what needs the rest of
the experiment (the agent count, the rounds, the mixing scheme, the algorithm) is checked by
``ExperimentConfig``. The defaults are today's network: the plan's graph every round, every
agent present, every message delivered in float32, no simulated time. ``decaf_ray.network``
turns this section into each round's graph and Pi; ``decaf_ray.compress`` and
``decaf_ray.simtime`` read ``compress`` and ``time``. ``read_trace`` is the one file read.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from decaf_ray.config_parse import ConfigError, require
from decaf_ray.topology_graphs import TOPOLOGIES

SCHEDULES = ("static", "resample", "one_peer_exponential", "random_matching")
"""``network.schedule`` values; see ``NetworkConfig.schedule``."""

COMPRESS_KINDS = ("float32", "float16", "bfloat16", "int8", "topk")
"""``network.compress.kind`` values, ``decaf_ray.compress.KINDS`` (not imported: it loads torch)."""


@dataclass(frozen=True)
class AvailabilityConfig:
    """Churn: either a two-state on/off Markov chain per agent (``mean_up``, ``mean_down``) or a
    trace of the active agents of each round (``trace``)."""

    mean_up: float | None = None
    """Mean rounds an agent stays available, >= 1: it leaves after a round with probability
    1 / mean_up (so its stays are geometric with this mean)."""
    mean_down: float | None = None
    """Mean rounds an agent stays away, >= 1: it returns with probability 1 / mean_down. Each
    agent starts from the chain's stationary law, available with probability
    mean_up / (mean_up + mean_down)."""
    trace: Any = None
    """A file of the available agents of each round (a JSON list of lists of ids, or one CSV
    row of ids per round, an empty row for none; round r reads entry r - 1, and the trace must
    cover every round), or that list of lists itself."""

    def __post_init__(self):
        chain = self.mean_up is not None or self.mean_down is not None
        require(chain != (self.trace is not None), "trace",
                "give either mean_up and mean_down (a Markov chain) or trace (a file or list), "
                "exactly one of the two")
        for name in ("mean_up", "mean_down"):
            value = getattr(self, name)
            require(not chain or (value is not None and value >= 1), name,
                    f"must be a number of rounds >= 1 (got {value!r}); the chain needs both")
        require(self.trace is None or isinstance(self.trace, (str, os.PathLike, list)), "trace",
                f"must be a file path or a list of lists of agent ids (got {self.trace!r})")

    @property
    def chain(self) -> bool:
        """True for the Markov chain, False for a trace."""
        return self.trace is None


@dataclass(frozen=True)
class StragglersConfig:
    """A fixed, seeded set of slow agents."""

    fraction: float = 0.2
    """Share of the agents that straggle: round(fraction N) of them, drawn once from the seed."""
    speed: float = 0.5
    """A straggler runs max(1, round(speed local_steps)) of the local steps each round, and each
    of its steps takes 1 / speed as long in the time model."""

    def __post_init__(self):
        require(0.0 <= self.fraction <= 1.0, "fraction", f"must be in [0, 1] (got {self.fraction})")
        require(0.0 < self.speed <= 1.0, "speed", f"must be in (0, 1] (got {self.speed})")


@dataclass(frozen=True)
class CompressConfig:
    """How a message's factors travel (``decaf_ray.compress``). YAML: ``compress: int8`` or
    ``compress: {kind: topk, ratio: 0.1, error_feedback: true}``."""

    kind: Literal["float32", "float16", "bfloat16", "int8", "topk"] = "float32"
    """``float32`` (exact), ``float16``, ``bfloat16``, ``int8`` (one scale per rank component)
    or ``topk`` (the largest ``ratio`` of each factor's entries)."""
    ratio: float | None = None
    """``topk`` only, and required there: the share of entries sent, in (0, 1]."""
    error_feedback: bool = False
    """Lossy kinds only: each sender adds what its last messages lost to the next one (EF)."""

    @staticmethod
    def shorthand(data: Any, path: str) -> Any:
        """``compress: int8``."""
        return {"kind": data} if isinstance(data, str) else data

    def __post_init__(self):
        require(self.kind in COMPRESS_KINDS, "kind",
                f"got {self.kind!r}; valid: {', '.join(COMPRESS_KINDS)}")
        require(self.kind != "topk" or (self.ratio is not None and 0.0 < self.ratio <= 1.0),
                "ratio", f"topk needs a ratio in (0, 1] (got {self.ratio!r})")
        require(self.kind == "topk" or self.ratio is None, "ratio",
                f"only kind topk reads it; leave it null for {self.kind}")
        require(not self.error_feedback or self.kind != "float32", "error_feedback",
                "float32 loses nothing to feed back; use it with float16, bfloat16, int8 or topk")


@dataclass(frozen=True)
class TimeConfig:
    """The simulated clock (``decaf_ray.simtime``): seconds per round from compute and links."""

    step_s: float = 0.05
    """Seconds one local step takes at speed 1, >= 0."""
    latency_s: float = 0.01
    """A link's median latency in seconds, >= 0."""
    bandwidth_mbps: float = 100.0
    """A link's median bandwidth in Mbit/s, > 0."""
    speed_sigma: float = 0.0
    """Sigma of each agent's lognormal speed factor, drawn once from the seed (0: none)."""
    link_sigma: float = 0.0
    """Sigma of each link's lognormal latency and bandwidth factors (0: none)."""

    def __post_init__(self):
        for name in ("step_s", "latency_s", "speed_sigma", "link_sigma"):
            require(getattr(self, name) >= 0, name, f"must be >= 0 (got {getattr(self, name)})")
        require(self.bandwidth_mbps > 0, "bandwidth_mbps",
                f"must be > 0 (got {self.bandwidth_mbps})")


@dataclass(frozen=True)
class NetworkConfig:
    """The network each round runs on (issue 18). The defaults are a fixed network: the plan's
    graph and Pi every round, every agent and link up, float32 messages, no simulated clock.

    Each round, the schedule's graph is restricted to the active agents (``participation`` and
    ``availability``) minus the failed links (``link_failure``), and Pi is rebuilt on it with
    ``mixing.scheme``; a disconnected round mixes within each component. Inactive agents neither
    train nor send and keep their state; FedAvg averages the round's active agents.
    """

    schedule: Literal["static", "resample", "one_peer_exponential", "random_matching"] = "static"
    """``static``: the topology's graph every round. ``resample``: a fresh graph of the
    topology's random family (erdos_renyi, random_regular, small_world) each round.
    ``one_peer_exponential``: in round t (from 1) agent i links to
    i +- 2^((t - 1) mod ceil(log2 N)) mod N (BlueFog's dynamic exponential graph).
    ``random_matching``: a random perfect matching each round (odd N: one agent left alone).
    The last two ignore ``topology``."""
    participation: float = 1.0
    """Probability that an agent is active in a round, independently per agent and round, in
    (0, 1]; with ``availability``, an agent is active when available and its coin says so."""
    availability: AvailabilityConfig | None = None
    """Churn: ``{mean_up: 20, mean_down: 5}`` (rounds; an on/off Markov chain per agent) or
    ``{trace: FILE}``; null: every agent always available."""
    link_failure: float = 0.0
    """Probability that an edge is down in a round (both directions), independently per edge
    and round, in [0, 1). Server algorithms (FedAvg) have no edges and ignore it."""
    stragglers: StragglersConfig | None = None
    """``{fraction: 0.2, speed: 0.5}``: a fixed seeded set of round(fraction N) agents that run
    max(1, round(speed local_steps)) local steps a round (halves round up), and whose steps
    take 1 / speed as long on the simulated clock; null: none."""
    compress: CompressConfig | str = "float32"
    """How messages travel: ``float32``, ``float16``, ``bfloat16``, ``int8``, or a mapping
    ``{kind: topk, ratio: 0.1, error_feedback: true}`` (error feedback for the lossy kinds).
    Always a ``CompressConfig`` once parsed."""
    time: TimeConfig | None = None
    """The simulated clock, ``{step_s: 0.05, latency_s: 0.01, bandwidth_mbps: 100,
    speed_sigma: 0.0, link_sigma: 0.0}`` (each optional); null: the default clock (``TimeConfig()``); ``sim_time_s`` is recorded either way."""

    def __post_init__(self):
        require(self.schedule in SCHEDULES, "schedule",
                f"got {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        require(0.0 < self.participation <= 1.0, "participation",
                f"must be in (0, 1] (got {self.participation})")
        require(0.0 <= self.link_failure < 1.0, "link_failure",
                f"must be in [0, 1) (got {self.link_failure})")
        if isinstance(self.compress, str):  # NetworkConfig() or compress="int8" from Python
            try:
                object.__setattr__(self, "compress", CompressConfig(kind=self.compress))
            except ConfigError as e:
                raise e.under("compress") from None

    @property
    def static(self) -> bool:
        """Every round is the plan's graph and Pi: the static schedule with every agent and link
        up (stragglers, compression and the clock change no graph)."""
        return (self.schedule == "static" and self.participation == 1.0
                and self.availability is None and self.link_failure == 0.0)

    def irregular_because(self) -> str | None:
        """The option that makes round graphs irregular, for error messages; None if none."""
        for name, on in (("participation", self.participation < 1.0),
                         ("availability", self.availability is not None),
                         ("link_failure", self.link_failure > 0)):
            if on:
                return f"network.{name}"
        return None


def read_trace(source: str | os.PathLike | list) -> list[list[int]]:
    """The available agents of each round from a trace: a JSON list of lists of ids, CSV rows
    of ids (one row per round; an empty row is a round with none), or that list itself.
    Ids are unchecked here beyond being integers (``check_trace`` knows the agent count).

    Raises:
        ConfigError: ``network.availability.trace``, unreadable or malformed.
    """
    field_name = "network.availability.trace"
    if isinstance(source, list):
        rows = source
    else:
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise ConfigError(field_name, f"cannot read {str(source)!r} ({e.strerror or e}); "
                              "give a readable JSON or CSV file") from None
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(field_name, f"{source}: not valid JSON ({e.msg})") from None
        else:
            rows = [[cell.strip() for cell in line.split(",") if cell.strip()]
                    for line in text.rstrip().splitlines()]
            try:
                rows = [[int(c) for c in row] for row in rows]
            except ValueError:
                raise ConfigError(field_name, f"{source}: CSV rows must hold integer agent "
                                  "ids") from None
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                        for i in r) for r in rows):
        raise ConfigError(field_name, "must be a list of lists of integer agent ids, one list "
                          "per round")
    return rows


def check_trace(rows: list[list[int]], agents: int, rounds: int) -> None:
    """Raise ``ConfigError`` unless the trace covers ``rounds`` rounds with ids in
    0..agents - 1."""
    field_name = "network.availability.trace"
    require(len(rows) >= rounds, field_name,
            f"covers {len(rows)} rounds; it needs at least rounds = {rounds} (round r reads "
            "entry r - 1)")
    for r, row in enumerate(rows[:rounds], 1):
        bad = [i for i in row if not 0 <= i < agents]
        require(not bad, field_name, f"round {r} names agent {bad[0] if bad else ''}; valid "
                f"ids: 0..{agents - 1}")


def random_families() -> tuple[str, ...]:
    """The topologies ``resample`` can redraw: those whose builder takes a ``seed``."""
    return tuple(name for name, build in TOPOLOGIES.items()
                 if "seed" in inspect.signature(build).parameters)


REGULAR_FAMILIES = ("random_regular",)
"""Random topologies whose every draw is regular: ``resample`` keeps ``mixing: uniform`` valid."""


def check_experiment(net: NetworkConfig, *, agents: int, rounds: int, kind: str,
                     centralized: bool, scheme: str, topology: str) -> None:
    """The checks that need the rest of the experiment: ``kind`` is the algorithm's Pi
    (``graph``, ``server``, ``identity``), ``topology`` the topology's name. Reads a trace file
    to check its ids and length.

    Raises:
        ConfigError: naming the field and what would be valid.
    """
    if centralized:
        moved = [f"network.{f}" for f in ("schedule", "participation", "availability",
                                         "link_failure", "stragglers", "compress")
                 if getattr(net, f) != getattr(NetworkConfig(), f)]
        require(not moved, moved[0] if moved else "network", "centralized trains one agent "
                "that sends nothing; of network only time applies (leave the rest default)")
    families = random_families()
    require(net.schedule != "resample" or topology in families, "network.schedule",
            f"resample redraws a random topology each round; {topology} is one fixed graph. "
            f"Use a topology among {', '.join(families)}, or another schedule")
    if kind == "graph":
        require(scheme != "matrix" or net.static, "mixing.scheme",
                f"matrix is one fixed Pi, but {_changing(net)} changes the graph each round; "
                "use metropolis or max_degree")
        why = _irregular(net, agents, topology)
        require(scheme != "uniform" or why is None, "mixing.scheme",
                f"uniform weights need regular round graphs, and {why} makes them irregular; "
                "use metropolis (equal to uniform on regular graphs) or max_degree")
    if net.availability is not None and not net.availability.chain:
        check_trace(read_trace(net.availability.trace), agents, rounds)


def _changing(net: NetworkConfig) -> str:
    return (f"network.schedule {net.schedule}" if net.schedule != "static"
            else net.irregular_because())


def _irregular(net: NetworkConfig, agents: int, topology: str) -> str | None:
    """The option that makes some round graph irregular, or None if every round is regular
    (the static topology's own regularity is checked where its graph is built)."""
    if net.irregular_because() is not None:
        return net.irregular_because()
    if net.schedule == "resample" and topology not in REGULAR_FAMILIES:
        return f"network.schedule resample of {topology}"
    if net.schedule == "random_matching" and agents % 2:
        return f"network.schedule random_matching on an odd number of agents ({agents})"
    return None
