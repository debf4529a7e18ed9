"""What a run's network carried and how long its rounds took on the simulated clock (issue 18):
the loop records every round here and reads the rows and the summary's ``network`` entry back.

Per round (``record``): the round's active agents, edges up and spectral gap (``RoundNet``),
the bytes each active agent sent, from the real encoded messages (``compress.nbytes``) times the
agents that receive them (its round neighbours; a server algorithm: one upload, plus the
server's broadcast once per round, float32, counted as ``floats_sent`` counts it), and the
round's seconds from ``simtime.TimeModel`` (``network.time``, or its defaults when null; the
stragglers' speeds from the schedule). Cumulative counters travel in ``RunState.network``
(``state``/``NetworkStats(plan, state)``), so a resumed run gives the same rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from decaf_ray.network import RoundNet
from decaf_ray.network_config import TimeConfig
from decaf_ray.plan import Plan
from decaf_ray.simtime import TimeModel

COLUMNS = ["round", "active", "edges_up", "spectral_gap", "bytes", "sim_time_s"]
"""The summary's per-round trace: the round's own values (bytes: the whole network's)."""

GAP_EVERY_ROUND = 256
"""Most active agents whose spectral gap the trace records every round (an eigensolver per
round); above it only at evaluations (None in the other rounds)."""


class NetworkStats:
    """The network's counters of one run; ``state`` is what a checkpoint keeps of them."""

    def __init__(self, plan: Plan, state: dict[str, Any] | None = None):
        cfg, self.plan = plan.config, plan
        clock = cfg.network.time or TimeConfig()
        self.clock = TimeModel(plan.agents, clock.step_s, clock.latency_s, clock.bandwidth_mbps,
                               clock.speed_sigma, clock.link_sigma,
                               speeds=plan.schedule.speeds, seed=cfg.seed)
        self.server = plan.algorithm.pi == "server"
        state = state or {}
        self.sent = [int(b) for b in state.get("sent", [0] * plan.agents)]
        """Per agent: bytes it sent so far (its messages times their recipients)."""
        self.broadcast = int(state.get("broadcast", 0))
        """Bytes the server broadcast so far (server algorithms)."""
        self.sim_time = float(state.get("sim_time", 0.0))
        self.trace: list[list] = [list(r) for r in state.get("trace", [])]
        self.since: list[list[int]] = [list(r) for r in state.get("since", [])]
        """(active, edges up) of each round since the last evaluation."""
        self.gap = float(state.get("gap", math.nan))
        self._last: tuple[Any, float] = (None, 0.0)  # (sizes, seconds) of the last round

    def state(self) -> dict[str, Any]:
        """Plain lists and numbers (a checkpoint loads them without running code)."""
        return {"sent": list(self.sent), "broadcast": self.broadcast, "sim_time": self.sim_time,
                "trace": [list(r) for r in self.trace], "since": [list(r) for r in self.since],
                "gap": self.gap}

    def record(self, net: RoundNet, message_bytes: dict[int, int], evaluate: bool) -> None:
        """One round: ``message_bytes`` is each sender's one message (empty when nothing
        travels); ``evaluate``, whether the round ends with an evaluation (its gap is read)."""
        sent = {i: b if self.server else b * (len(net.neighbourhoods[i][0]) - 1)
                for i, b in message_bytes.items()}
        broadcast = self._broadcast(net) if self.server and message_bytes else 0
        for i, b in sent.items():
            self.sent[i] += b
        self.broadcast += broadcast
        seconds = self._seconds(net, {i: message_bytes.get(i, 0) for i in net.active}, broadcast)
        self.sim_time += seconds
        gap = net.spectral_gap if evaluate or len(net.active) <= GAP_EVERY_ROUND else math.nan
        self.gap = gap
        self.since.append([len(net.active), net.edges_up])
        self.trace.append([net.round, len(net.active), net.edges_up,
                           None if math.isnan(gap) else gap, sum(sent.values()) + broadcast,
                           seconds])

    def _seconds(self, net: RoundNet, message_bytes: dict[int, int], broadcast: int) -> float:
        """The round's simulated seconds; a static network's rounds differ only by their
        messages' sizes, so equal sizes reuse the last round's (a Python pass over every link
        costs ~1 s a round at 10^5 agents)."""
        key = tuple(message_bytes.values()), broadcast
        if self.plan.schedule.static and key == self._last[0]:
            return self._last[1]
        seconds = self.clock.round_seconds(net.active, net.steps, net.neighbourhoods,
                                           message_bytes, self.server, broadcast)
        self._last = key, seconds
        return seconds

    def _broadcast(self, net: RoundNet) -> int:
        """Bytes of the server's one float32 broadcast (``Algorithm.floats_broadcast_per_round``
        over the round's active agents' ranks)."""
        ranks = self.plan.ranks or (self.plan.config.lora.rank,) * self.plan.agents
        floats = self.plan.algorithm.floats_broadcast_per_round(
            self.plan.task.lora_shapes(), [ranks[i] for i in net.active], net.round)
        return int(4 * floats)

    def agent_values(self) -> dict[int, dict[str, float]]:
        """Per agent: ``bytes_sent``, the bytes it sent so far."""
        return {i: {"bytes_sent": float(b)} for i, b in enumerate(self.sent)}

    def network_values(self) -> dict[str, float]:
        """The evaluation's network rows: ``bytes_sent`` (cumulative, the network's bytes, the
        server's broadcast included, over the agents), ``sim_time_s`` (cumulative simulated
        seconds), and after round 0 ``active_agents`` and ``edges_up`` (means over the rounds
        since the previous evaluation) and ``spectral_gap`` (this round's; NaN above
        ``network.GAP_MAX`` active agents). Starts the next span of rounds."""
        out = {"bytes_sent": (sum(self.sent) + self.broadcast) / len(self.sent),
               "sim_time_s": self.sim_time}
        if self.since:
            active, edges = np.mean(self.since, axis=0)
            out.update(active_agents=float(active), edges_up=float(edges), spectral_gap=self.gap)
        self.since = []
        return out

    def summary(self) -> dict[str, Any]:
        """The summary's ``network``: what the schedule implied over the rounds run (the facts
        ``Schedule.describe`` gives, from the trace) and the per-round trace."""
        sched, rows = self.plan.schedule, self.trace
        gaps = [r[3] for r in rows if r[3] is not None]
        mean = lambda k: float(np.mean([r[k] for r in rows])) if rows else None
        cfg = self.plan.config.network
        return {"schedule": cfg.schedule, "static": sched.static, "rounds": len(rows),
                "mean_active": mean(1), "mean_edges_up": mean(2),
                "mean_spectral_gap": float(np.mean(gaps)) if gaps else None,
                "stragglers": len(sched.stragglers), "compress": cfg.compress.kind,
                "bytes_sent_per_agent": (sum(self.sent) + self.broadcast) / len(self.sent),
                "sim_time_s": self.sim_time,
                "trace": {"columns": COLUMNS, "rows": [list(r) for r in rows]}}
