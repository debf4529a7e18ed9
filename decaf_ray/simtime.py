"""Simulated wall-clock time of a synchronous round (``network.time``), FedScale-style.

Units: seconds, bytes, Mbit/s (1 Mbit = 1e6 bits). The model:

- Agent i computes for ``steps_i * step_s / speed_i`` seconds. ``speed_i`` is the agent's base
  speed (1.0; a straggler's ``network.stragglers.speed`` < 1 makes each of its steps 1/speed
  times longer) times exp(speed_sigma z_i), z_i ~ N(0, 1): a lognormal(0, speed_sigma) spread
  drawn once per agent from ``seed``.
- Each undirected link {i, j} has a latency ``latency_s * exp(link_sigma z)`` and a bandwidth
  ``bandwidth_mbps * exp(link_sigma z')``, drawn from a generator seeded by (seed, i, j) alone,
  lazily: a pair keeps its values for the run however the graph changes between rounds, and
  the values do not depend on which pairs were drawn before.
- A message of b bytes from j to i leaves j when j has finished computing and takes
  ``latency_ij + 8 b / (bandwidth_ij 1e6)`` seconds; links are independent and full duplex
  (no contention). Agent i can mix when it has finished computing and every round neighbour's
  message has arrived:
      t_i = max(compute_i, max_{j in N(i), j != i} compute_j + latency_ij + 8 b_j / (bw_ij 1e6)),
  so an agent with no neighbour takes its compute time only. The synchronous round takes
  max_i t_i over the active agents.
- A server algorithm (FedAvg, Centralized): agent i uploads over its own link to the server
  (the pair (i, n), the same law), the server waits for every upload, then broadcasts b_s bytes
  to every active agent over the same links:
      round = max_i (compute_i + up_i) + max_i down_i.

Pure (numpy only) and deterministic: the same arguments give the same seconds.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Neighbourhoods = Mapping[int, tuple[Sequence[int], Sequence[float]]]
"""agent -> (ids of the agents it mixes, itself included; their weights), for one round."""

_SPEED, _LINK = 0, 1   # seed-sequence tags: the speeds and the links draw from apart streams


class TimeModel:
    """Round times for ``n`` agents (ids 0..n-1; the server, when there is one, is id n).

    Args:
        n: number of agents.
        step_s: seconds one local step takes at speed 1 (measured or given), >= 0.
        latency_s: a link's median latency in seconds, >= 0.
        bandwidth_mbps: a link's median bandwidth in Mbit/s, > 0.
        speed_sigma: sigma of the lognormal per-agent speed factor (0: none), >= 0.
        link_sigma: sigma of the lognormal per-link latency and bandwidth factors, >= 0.
        speeds: (n,) base speeds (> 0), e.g. 1.0 and a straggler's speed; None: all 1.0.
        seed: seeds the speed and link draws.
    """

    def __init__(self, n: int, step_s: float, latency_s: float, bandwidth_mbps: float,
                 speed_sigma: float = 0.0, link_sigma: float = 0.0,
                 speeds: Sequence[float] | None = None, seed: int = 0):
        base = np.ones(n) if speeds is None else np.asarray(speeds, dtype=np.float64)
        problems = [(n < 1, f"n = {n} (need >= 1)"),
                    (step_s < 0, f"step_s = {step_s} (need >= 0)"),
                    (latency_s < 0, f"latency_s = {latency_s} (need >= 0)"),
                    (not bandwidth_mbps > 0, f"bandwidth_mbps = {bandwidth_mbps} (need > 0)"),
                    (speed_sigma < 0, f"speed_sigma = {speed_sigma} (need >= 0)"),
                    (link_sigma < 0, f"link_sigma = {link_sigma} (need >= 0)"),
                    (base.shape != (n,) or not (base > 0).all(),
                     f"speeds: {n} positive values")]
        bad = [what for failed, what in problems if failed]
        if bad:
            raise ValueError("time model: " + "; ".join(bad))
        self.n, self.step_s, self.latency_s = n, step_s, latency_s
        self.bandwidth_mbps, self.link_sigma, self.seed = bandwidth_mbps, link_sigma, seed
        spread = np.random.default_rng([seed, _SPEED]).standard_normal(n) if speed_sigma else 0
        self.speeds = base * np.exp(speed_sigma * spread)   # (n,): fixed for the run
        self._links: dict[tuple[int, int], tuple[float, float]] = {}

    def link(self, i: int, j: int) -> tuple[float, float]:
        """(latency in s, bandwidth in Mbit/s) of the undirected link {i, j}, fixed for the run."""
        key = (min(i, j), max(i, j))
        if key not in self._links:
            z = (np.random.default_rng([self.seed, _LINK, *key]).standard_normal(2)
                 if self.link_sigma else np.zeros(2))
            self._links[key] = (self.latency_s * float(np.exp(self.link_sigma * z[0])),
                                self.bandwidth_mbps * float(np.exp(self.link_sigma * z[1])))
        return self._links[key]

    def transfer_s(self, i: int, j: int, nbytes: int) -> float:
        """Seconds for ``nbytes`` bytes to cross the link {i, j}: latency + 8 bytes / bandwidth."""
        latency, mbps = self.link(i, j)
        return latency + 8.0 * nbytes / (mbps * 1e6)

    def compute_s(self, i: int, steps: int) -> float:
        """Seconds agent i takes for ``steps`` local steps."""
        return steps * self.step_s / float(self.speeds[i])

    def agent_seconds(self, active: Sequence[int], steps: int | Mapping[int, int],
                      neighbourhoods: Neighbourhoods,
                      message_bytes: Mapping[int, int]) -> dict[int, float]:
        """Each active agent's t_i (see the module docstring) for one gossip round.

        ``steps``: local steps of every agent this round, or one count for all. A neighbour
        with weight 0 or not active sends nothing this round and is not waited for.
        ``message_bytes``: agent -> bytes of the message it sends this round (the real
        ``compress.nbytes``).
        """
        on = set(active)
        compute = {i: self.compute_s(i, _steps(steps, i)) for i in on}
        out = {}
        for i in on:
            ids, weights = neighbourhoods.get(i, ((), ()))
            arrivals = [compute[j] + self.transfer_s(i, j, message_bytes[j])
                        for j, w in zip(ids, weights) if j != i and j in on and w != 0]
            out[i] = max([compute[i], *arrivals])
        return out

    def round_seconds(self, active: Sequence[int], steps: int | Mapping[int, int],
                      neighbourhoods: Neighbourhoods, message_bytes: Mapping[int, int],
                      server: bool = False, broadcast_bytes: int | None = None) -> float:
        """Seconds of one synchronous round: the slowest active agent's t_i, or for a server
        algorithm max_i (compute_i + up_i) + max_i down_i (``neighbourhoods`` unused), with
        ``broadcast_bytes`` the server's message (None: the largest upload). 0.0 when no agent
        is active."""
        active = [int(i) for i in active]
        if not active:
            return 0.0
        if not server:
            return max(self.agent_seconds(active, steps, neighbourhoods, message_bytes).values())
        down = max(message_bytes[i] for i in active) if broadcast_bytes is None \
            else broadcast_bytes
        up = max(self.compute_s(i, _steps(steps, i)) + self.transfer_s(i, self.n, message_bytes[i])
                 for i in active)
        return up + max(self.transfer_s(i, self.n, down) for i in active)


def _steps(steps: int | Mapping[int, int], i: int) -> int:
    return steps if isinstance(steps, int) else steps[i]
