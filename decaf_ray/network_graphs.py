"""The random parts of a round's network (issue 18), each a pure function of (seed, round):
the schedules' graphs, the availability chain, the stragglers. ``decaf_ray.network`` puts them
together into each round's graph and Pi.

Graphs here are (E, 2) int64 arrays of undirected edges i < j, sorted by (i, j) (numpy's speed
at 10^5 agents, and one order the link-failure coins can follow). Seeds are
``derive_seed(seed, TAG, <draw>, ...)``, one ``<draw>`` per kind of randomness.
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np

from decaf_ray.seeding import derive_seed
from decaf_ray.topology_graphs import build_topology

TAG = 0x4E4554  # "NET": apart from the agents' derive_seed(seed, 1..4, ...) streams
PARTICIPATION, AVAILABILITY, LINKS, RESAMPLE, MATCHING, STRAGGLERS = range(1, 7)

_BLOCK = 64  # rounds of the availability chain drawn per generator


def canonical_edges(graph: nx.Graph) -> np.ndarray:
    """(E, 2) int64: ``graph``'s edges as pairs i < j, sorted."""
    e = np.array(list(graph.edges()), dtype=np.int64).reshape(-1, 2)
    e.sort(axis=1)
    return e[np.lexsort((e[:, 1], e[:, 0]))]


def _canonical(pairs: np.ndarray) -> np.ndarray:
    e = np.sort(pairs.astype(np.int64).reshape(-1, 2), axis=1)
    return np.unique(e[e[:, 0] != e[:, 1]], axis=0)  # unique sorts rows lexicographically


def one_peer_exponential(n: int, rnd: int) -> np.ndarray:
    """BlueFog's dynamic exponential graph: in round t (1-based) agent i links to
    i +- 2^((t - 1) mod K) mod n, K = ceil(log2 n) (log2 n for a power of two, BlueFog's case;
    for other n an offset past n / 2 is the mirror of a smaller one). Every agent has degree 2,
    or 1 when the offset is n / 2: the graph is regular. (E, 2) pairs."""
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    d = 2 ** ((rnd - 1) % (n - 1).bit_length())  # (n - 1).bit_length() = ceil(log2 n)
    i = np.arange(n)
    return _canonical(np.stack([i, (i + d) % n], axis=1))


def random_matching(n: int, rnd: int, seed: int) -> np.ndarray:
    """A uniformly random perfect matching of n agents (odd n: maximal, one agent alone),
    seeded by (seed, rnd). (n // 2, 2) pairs."""
    perm = np.random.default_rng(derive_seed(seed, TAG, MATCHING, rnd)).permutation(n)
    return _canonical(perm[: 2 * (n // 2)].reshape(-1, 2))


def resampled(n: int, rnd: int, seed: int, topology_cfg: Any) -> np.ndarray:
    """A fresh graph of the topology's random family for round ``rnd``: ``build_topology`` with
    the topology's params and seed derived from (seed, the topology's seed, rnd). (E, 2)."""
    params = dict(topology_cfg.params)
    own = int(params.get("seed", 0))
    params["seed"] = derive_seed(seed, TAG, RESAMPLE, own, rnd) % 2**32
    return canonical_edges(build_topology(topology_cfg.name, n, **params))


def schedule_edges(schedule: str, n: int, rnd: int, seed: int, topology_cfg: Any) -> np.ndarray:
    """The round's graph of a changing schedule (not ``static``: that is the plan's graph)."""
    if schedule == "resample":
        return resampled(n, rnd, seed, topology_cfg)
    if schedule == "one_peer_exponential":
        return one_peer_exponential(n, rnd)
    if schedule == "random_matching":
        return random_matching(n, rnd, seed)
    raise ValueError(f"schedule {schedule!r} has no per-round graph here")


def stragglers(n: int, fraction: float, seed: int) -> tuple[int, ...]:
    """The sorted ids of floor(fraction n + 1/2) agents (round half up), drawn once from the
    seed."""
    k = min(n, math.floor(fraction * n + 0.5))
    rng = np.random.default_rng(derive_seed(seed, TAG, STRAGGLERS))
    return tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))


class MarkovAvailability:
    """Each agent's on/off chain: available agents leave with probability 1 / mean_up per round,
    away ones return with probability 1 / mean_down, so stays and absences are geometric with
    those means; round 1 is drawn from the stationary law, P(up) = mean_up / (mean_up +
    mean_down). Rounds are drawn in blocks of 64, block b from its own seed (seed, b), and kept
    (n bools per round): ``up(r)`` is the same whatever rounds were asked before.
    """

    def __init__(self, n: int, mean_up: float, mean_down: float, seed: int):
        if not (mean_up >= 1 and mean_down >= 1):
            raise ValueError(f"mean_up and mean_down must be >= 1 (got {mean_up}, {mean_down})")
        self.n, self.seed = n, seed
        self.leave, self.back = 1.0 / mean_up, 1.0 / mean_down
        self.stationary = mean_up / (mean_up + mean_down)
        self._blocks: list[np.ndarray] = []  # block b: (_BLOCK, n) bool, rounds b*64+1 ..

    def up(self, rnd: int) -> np.ndarray:
        """(n,) bool: the agents available in round ``rnd`` (1-based)."""
        b, row = divmod(rnd - 1, _BLOCK)
        while len(self._blocks) <= b:
            self._blocks.append(self._draw(len(self._blocks)))
        return self._blocks[b][row]

    def _draw(self, b: int) -> np.ndarray:
        u = np.random.default_rng(derive_seed(self.seed, TAG, AVAILABILITY, b)).random(
            (_BLOCK, self.n))
        out = np.empty((_BLOCK, self.n), dtype=bool)
        state = u[0] < self.stationary if b == 0 else self._step(self._blocks[b - 1][-1], u[0])
        out[0] = state
        for t in range(1, _BLOCK):
            out[t] = state = self._step(state, u[t])
        return out

    def _step(self, state: np.ndarray, u: np.ndarray) -> np.ndarray:
        return np.where(state, u >= self.leave, u < self.back)
