"""Each round's network (issue 18): who is active, which links are up, and the round's Pi.

``Schedule`` turns the ``network:`` section (``decaf_ray.network_config``) into one ``RoundNet``
per round, a pure function of (seed, round): round 57 is the same whether it is asked first (a
resumed run) or after rounds 1..56. Per round:

1. the schedule's graph G_t on all N agents: the plan's graph (``static``), a fresh draw of the
   topology's random family (``resample``), BlueFog's one-peer exponential graph, or a random
   matching (``decaf_ray.network_graphs``);
2. the active agents: available (``availability``: an on/off Markov chain per agent, or a trace)
   and, independently per agent and round, a coin of probability ``participation``;
3. the edges of G_t among active agents, minus those that fail (``link_failure``, per edge);
4. Pi_t on that graph with ``mixing.scheme`` over the active agents only (a disconnected round
   mixes within each component; an isolated agent keeps pi_ii = 1), or for the algorithm kinds
   that ignore the graph: ``server`` (FedAvg) 1/|active| among the active agents, ``identity``
   (Local) the identity.

Each draw has its own seed, ``derive_seed(seed, TAG, <draw>, ...)``, so turning one option on
shifts no other option's draws. Pure (numpy, scipy, networkx) and Ray-free; the one file a
Schedule reads, an availability trace named by path, goes through ``network_config.read_trace``
when it is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from decaf_ray import topology
from decaf_ray.seeding import derive_seed
from decaf_ray.network_config import NetworkConfig, read_trace
from decaf_ray.network_graphs import (LINKS, PARTICIPATION, TAG, MarkovAvailability,
                                      canonical_edges, schedule_edges, stragglers)

GAP_MAX = 1024
"""Most active agents whose round spectral gap is computed (a dense eigvalsh: ~0.1 s at 1000
agents on an idle core, over 1 s on a busy one); above it ``RoundNet.spectral_gap`` is NaN."""

DESCRIBE_GAPS = 100
"""Most rounds whose spectral gap ``Schedule.describe`` computes (evenly spaced) for its mean,
up to 128 agents; the eigensolver is O(n^3), so above that it takes 100 (128 / n)^3 of them
(at least one): a second or so whatever n."""

_CACHE = 4  # rounds kept: the loop asks each round once or twice, never far back

Neighbourhood = tuple[tuple[int, ...], tuple[float, ...]]


@dataclass(frozen=True)
class RoundNet:
    """One round's network. Agents not in ``active`` neither train nor send this round.

    For a ``server`` algorithm (FedAvg) the server's average of the active agents reaches every
    agent, inactive ones included: an inactive agent receives the broadcast (the average the
    active agents' neighbourhoods give) although it has no entry here.
    """

    round: int
    active: tuple[int, ...]
    """Sorted ids of the agents that train and send this round (may be empty)."""
    neighbourhoods: dict[int, Neighbourhood]
    """Per active agent i: the ids j with pi_ij > 0 (i included, sorted) and their weights in
    the round's Pi, the format of ``topology.neighbourhoods`` and ``Plan.neighbourhoods``."""
    edges_up: int
    """Undirected pairs {i, j}, i != j, with pi_ij > 0 this round: the graph's edges among the
    active agents that did not fail (a server round: every pair of active agents)."""
    steps: dict[int, int]
    """Per active agent: the local steps it runs this round (fewer for a straggler)."""
    gap_cell: "_Gap" = field(repr=False, compare=False)
    """Internal: computes ``spectral_gap`` once, when first read (shared by static rounds)."""

    @property
    def spectral_gap(self) -> float:
        """1 - max(|lambda_2|, |lambda_m|) of the round's Pi over its m active agents: 0.0 for
        a disconnected or empty round, 1.0 for one agent, NaN above ``GAP_MAX`` active agents.
        Computed on first read (an eigensolver on m x m when connected), then kept."""
        return self.gap_cell.value()


class Schedule:
    """The network of every round, from the plan's graph and Pi and the config.

    Args:
        graph: the plan's graph (``Plan.graph``), nodes 0..n-1.
        pi: the plan's (n, n) Pi as the algorithm uses it (``Plan.pi``).
        n: number of agents.
        network_cfg: ``ExperimentConfig.network``.
        mixing_cfg: ``ExperimentConfig.mixing`` (the scheme each round's Pi is built with).
        kind: ``Algorithm.pi``: ``"graph"``, ``"server"`` or ``"identity"``.
        seed: the experiment's seed.
        local_steps: tau, the steps an agent that does not straggle runs each round.
        topology_cfg: ``ExperimentConfig.topology`` (``resample`` draws its family).
        neighbourhoods: the plan's own (``Plan.neighbourhoods``, read from ``pi``), which a
            static round hands out as they are; None: read from ``pi`` when first needed.
    A round may have no active agent at all (participation, churn): its ``active``,
    ``neighbourhoods`` and ``steps`` are empty and nobody trains.

    Raises:
        ValueError: a combination ``ExperimentConfig`` refuses (e.g. ``mixing: matrix`` on a
            changing network), for a Schedule built from parts.
    """

    def __init__(self, graph: nx.Graph, pi: Any, n: int, network_cfg: NetworkConfig,
                 mixing_cfg: Any, kind: str, seed: int, local_steps: int, topology_cfg: Any,
                 neighbourhoods: tuple[Neighbourhood, ...] | None = None):
        if kind not in ("graph", "server", "identity"):
            raise ValueError(f"kind {kind!r}; valid: graph, server, identity")
        self.n, self.cfg, self.kind, self.seed = n, network_cfg, kind, seed
        self.scheme, self.topology_cfg = mixing_cfg.scheme, topology_cfg
        self.local_steps = local_steps
        everyone = network_cfg.participation == 1.0 and network_cfg.availability is None
        self.static = network_cfg.static or (kind != "graph" and everyone)
        """Every round is the plan's own Pi, all agents active: the graph never changes, or
        the algorithm ignores it (FedAvg, Local) and every agent is always present."""
        if kind == "graph" and not self.static and self.scheme == "matrix":
            raise ValueError("mixing scheme 'matrix' is one fixed Pi; it cannot follow a "
                             "changing network")
        self._graph, self._pi, self._edges = graph, pi, None
        self._plan_nb = neighbourhoods
        s = network_cfg.stragglers
        self.stragglers: tuple[int, ...] = stragglers(n, s.fraction, seed) if s else ()
        """Sorted ids of the straggling agents (fixed for the run)."""
        self.speeds = np.ones(n)
        """(n,) base speed of each agent for the time model: 1.0, a straggler's ``speed``."""
        self._steps = np.full(n, local_steps, dtype=np.int64)
        if s:
            self.speeds[list(self.stragglers)] = s.speed
            self._steps[list(self.stragglers)] = max(1, math.floor(s.speed * local_steps + 0.5))
        a = network_cfg.availability
        self._chain = MarkovAvailability(n, a.mean_up, a.mean_down, seed) if a and a.chain \
            else None
        self._trace = read_trace(a.trace) if a and not a.chain else None
        self._cache: OrderedDict[int, tuple[RoundNet, np.ndarray]] = OrderedDict()

    def round(self, rnd: int) -> RoundNet:
        """The network of round ``rnd`` (1-based); the same for the same (seed, rnd) whatever
        rounds were asked before."""
        return self._round(rnd)[0]

    def inboxes(self, net: RoundNet) -> dict[int, Neighbourhood]:
        """Who mixes in round ``net`` and what: agent -> (ids it mixes, their weights). The
        active agents' neighbourhoods; for a ``server`` algorithm the server's average of the
        active agents reaches every agent, inactive ones included (none when no agent is
        active). The static rounds' dict itself (no copy) where they coincide."""
        if self.kind != "server" or len(net.active) == self.n or not net.active:
            return net.neighbourhoods
        average = net.neighbourhoods[net.active[0]]
        return dict.fromkeys(range(self.n), average)

    def describe(self, rounds: int, window: int) -> dict[str, Any]:
        """What the schedule implies over rounds 1..``rounds``, for ``decaf-ray describe``:
        mean active agents, mean edges up, mean spectral gap (over evenly spaced rounds,
        see ``DESCRIBE_GAPS``, where it is computed; None if none), and whether the union
        of the round graphs over every ``window`` consecutive rounds connects all n agents
        (B-connectivity; one window of every round when rounds < window), with the count of
        windows that do not. One pass, holding only the last ``window`` rounds' links."""
        if rounds < 1 or window < 1:
            raise ValueError(f"rounds and window must be >= 1 (got {rounds}, {window})")
        span = 1 if self.static else rounds  # static: every round is round 1
        count = max(1, min(span, int(DESCRIBE_GAPS * min(1.0, 128 / self.n) ** 3)))
        picked = set(np.linspace(1, span, count).astype(int).tolist())
        active, edges, gaps, broken = [], [], [], 0
        recent: deque[np.ndarray] = deque(maxlen=window)
        for rnd in range(1, span + 1):
            net, links = self._round(rnd)
            active.append(len(net.active))
            edges.append(net.edges_up)
            if rnd in picked and not math.isnan(net.spectral_gap):
                gaps.append(net.spectral_gap)
            recent.append(links)
            if rnd >= window or rnd == span:
                broken += not self._connected(tuple(recent))
                if rnd < window:  # rounds < window: the one window of every round
                    break
        return {"schedule": self.cfg.schedule, "static": self.static, "rounds": rounds,
                "window": window, "mean_active": float(np.mean(active)),
                "mean_edges_up": float(np.mean(edges)),
                "mean_spectral_gap": float(np.mean(gaps)) if gaps else None,
                "union_connected": broken == 0, "disconnected_windows": broken,
                "stragglers": len(self.stragglers)}

    def active_mask(self, rnd: int) -> np.ndarray:
        """(n,) bool: the agents active in round ``rnd`` (available, and the coin)."""
        on = np.ones(self.n, dtype=bool)
        if self._chain is not None:
            on &= self._chain.up(rnd)
        if self._trace is not None:
            if rnd > len(self._trace):
                raise ValueError(f"round {rnd} is past the availability trace's "
                                 f"{len(self._trace)} rounds")
            on &= np.isin(np.arange(self.n), self._trace[rnd - 1])
        if self.cfg.participation < 1.0:
            coin = np.random.default_rng(derive_seed(self.seed, TAG, PARTICIPATION, rnd))
            on &= coin.random(self.n) < self.cfg.participation
        return on

    def _round(self, rnd: int) -> tuple[RoundNet, np.ndarray]:
        """The round's RoundNet and its links: (E, 2) global ids whose union over rounds
        ``describe`` checks (the graph's up edges; a star over a server round's agents)."""
        if isinstance(rnd, bool) or not isinstance(rnd, (int, np.integer)) or rnd < 1:
            raise ValueError(f"round {rnd!r}; rounds are integers >= 1")
        key = 1 if self.static else int(rnd)
        if key not in self._cache:
            self._cache[key] = self._build_static() if self.static else self._build(key)
            while len(self._cache) > _CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        net, links = self._cache[key]
        return (net if net.round == rnd else _with_round(net, int(rnd))), links

    def _build_static(self) -> tuple[RoundNet, np.ndarray]:
        """Every agent, the plan's own Pi (the same floats as ``Plan.neighbourhoods``)."""
        pi = sparse.csr_array(self._pi)
        nb = self._plan_nb if self._plan_nb is not None else topology.neighbourhoods(pi)
        upper = sparse.triu(pi, k=1).tocoo()
        pairs = np.stack([upper.row, upper.col], axis=1)[upper.data > 0].astype(np.int64)
        active = np.arange(self.n)
        links = pairs if self.kind != "server" else _star(active)
        return self._net(1, active, dict(enumerate(nb)), len(pairs), _Gap(self.kind, pi)), links

    def _build(self, rnd: int) -> tuple[RoundNet, np.ndarray]:
        active = np.flatnonzero(self.active_mask(rnd))
        m = len(active)
        if self.kind == "server":
            w = (1.0 / m,) * m if m else ()  # a round with nobody: no average
            nb = {i: (tuple(active.tolist()), w) for i in active.tolist()}
            return self._net(rnd, active, nb, m * (m - 1) // 2, _Gap(self.kind, None, m)), _star(active)
        if self.kind == "identity":
            nb = {i: ((i,), (1.0,)) for i in active.tolist()}
            return self._net(rnd, active, nb, 0, _Gap(self.kind, None, m)), np.zeros((0, 2), np.int64)
        up = self._up_edges(rnd, active)
        pos = np.full(self.n, -1, dtype=np.int64)
        pos[active] = np.arange(m)
        sub = nx.empty_graph(m)
        sub.add_edges_from(pos[up].tolist())
        pi = topology.SCHEMES[self.scheme](sub, None) if m else sparse.csr_array((0, 0))
        ids = active.tolist()
        nb = {ids[a]: (tuple(ids[j] for j in js), ws)
              for a, (js, ws) in enumerate(topology.neighbourhoods(pi))} if m else {}
        return self._net(rnd, active, nb, len(up), _Gap(self.kind, pi, m)), up

    def _up_edges(self, rnd: int, active: np.ndarray) -> np.ndarray:
        """(E, 2) sorted pairs i < j of the schedule's graph, both ends active, link up. The
        failure coins are drawn over all the graph's edges, so who is active moves no coin."""
        if self.cfg.schedule == "static":
            if self._edges is None:  # the plan's graph, once
                self._edges = canonical_edges(self._graph)
            edges = self._edges
        else:
            edges = schedule_edges(self.cfg.schedule, self.n, rnd, self.seed, self.topology_cfg)
        if self.cfg.link_failure > 0:
            coin = np.random.default_rng(derive_seed(self.seed, TAG, LINKS, rnd))
            edges = edges[coin.random(len(edges)) >= self.cfg.link_failure]
        on = np.zeros(self.n, dtype=bool)
        on[active] = True
        return edges[on[edges[:, 0]] & on[edges[:, 1]]]

    def _net(self, rnd: int, active: np.ndarray, nb: dict, edges_up: int, gap: "_Gap"
             ) -> RoundNet:
        return RoundNet(rnd, tuple(active.tolist()), nb, edges_up, self._steps_of(active), gap)

    def _steps_of(self, active: np.ndarray) -> dict[int, int]:
        return dict(zip(active.tolist(), self._steps[active].tolist()))

    def _connected(self, links: tuple[np.ndarray, ...]) -> bool:
        """Whether the union of these rounds' links connects all n agents."""
        if self.n == 1:
            return True
        e = np.concatenate(links)
        adj = sparse.coo_array((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(self.n, self.n))
        return csgraph.connected_components(adj, directed=False)[0] == 1


def _star(active: np.ndarray) -> np.ndarray:
    """(m - 1, 2) links joining the active agents into one component (a server round)."""
    return np.stack([np.full(max(len(active) - 1, 0), active[0] if len(active) else 0),
                     active[1:]], axis=1).astype(np.int64)


def _with_round(net: RoundNet, rnd: int) -> RoundNet:
    """The static round ``net`` renamed ``rnd``; its dicts and its gap are shared, never
    mutated."""
    return dataclasses.replace(net, round=rnd)


class _Gap:
    """A round's spectral gap, computed on first use: 0.0 when empty or disconnected (read off
    Pi's support, no eigensolver), NaN above ``GAP_MAX``; a server's average has gap 1 and the
    identity 0 whatever ``pi`` (unread for those two kinds)."""

    def __init__(self, kind: str, pi: sparse.csr_array | None, m: int | None = None):
        self.kind, self.pi = kind, pi
        self.m = pi.shape[0] if m is None else m
        self._value: float | None = None

    def value(self) -> float:
        if self._value is None:
            self._value = self._compute()
            self.pi = None  # the matrix is needed no longer
        return self._value

    def _compute(self) -> float:
        m = self.m
        if m <= 1 or self.kind != "graph":
            return float(m == 1 or (m > 1 and self.kind == "server"))
        if csgraph.connected_components(sparse.csr_array(self.pi > 0), directed=False)[0] > 1:
            return 0.0
        return topology.spectral_gap(self.pi) if m <= GAP_MAX else math.nan
