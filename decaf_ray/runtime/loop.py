"""The round loop every runtime shares: Algorithm 1's schedule, evaluation, divergence.

A runtime supplies ``Hosts``: where the agents live and how payloads move. ``stream`` decides
when to step, communicate and evaluate, and turns what the hosts report into metric rows, so
every runtime produces the same rows in the same order; ``follow`` consumes the stream on the
driver (callbacks, progress bar). Each round runs on the network ``plan.schedule`` gives it
(``decaf_ray.network.RoundNet``): who is active, how many steps each takes, who mixes what;
``runtime.netstats`` counts what it carried.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Union

from tqdm.auto import tqdm

from decaf_ray import factors as F
from decaf_ray import metrics
from decaf_ray.agents import Diverged
from decaf_ray.folding import BaseDelta
from decaf_ray.network import RoundNet
from decaf_ray.plan import Plan, Row, RunResult
from decaf_ray.runtime.netstats import NetworkStats
from decaf_ray.versions import versions
from decaf_ray.factors import Factors, Grads


class Hosts(Protocol):
    """Agents wherever they live; every call covers all agents the round's network names.

    Two timings the loop reads: ``load_s``, the seconds the hosts took to build their task and
    load its model (once, before round 0; the slowest host), and ``mix_s``, the seconds the last
    ``communicate`` spent mixing and applying (the slowest host); and ``sent_bytes``, each
    sender's message bytes in the last ``communicate`` (``compress.nbytes``)."""

    load_s: float
    mix_s: float
    sent_bytes: dict[int, int]

    def local_steps(self, t: int, count: int, net: RoundNet) -> None:
        """Steps t, t+1, ..., t+count-1 without communication, by the agents active in
        ``net``, each as many as its ``net.steps`` allow (``AgentGroup.quiet_steps``)."""

    def communicate(self, t: int, diagnose: bool, net: RoundNet) -> dict[int, dict[str, float]]:
        """The active agents' gradients at w_t; they publish w_t (encoded once each, as
        ``network.compress`` says); every agent of ``Schedule.inboxes(net)`` mixes what its
        inbox names and applies; diagnostics per mixing agent if asked."""

    def evaluate(self, final: bool = False) -> dict[int, dict[str, Any]]:
        """Test metrics per agent; ``final`` (the run's last round) also the task's
        ``evaluate_final`` metrics, whose ``generations`` (a list of records) ride along."""

    def factors(self) -> dict[int, Factors]: ...

    def full_grads(self, factors: Factors) -> dict[int, Grads]: ...

    def end_round(self, rnd: int) -> None:
        """Every agent finished round ``rnd`` (a point a runtime may checkpoint at)."""

    def snapshot(self) -> dict[int, dict]:
        """Every agent's state between rounds (``AgentGroup.snapshot``)."""

    def base_delta(self) -> BaseDelta | None:
        """S, what a folding algorithm's rounds added to the frozen weights (the same on every
        host); None before a fold and for every algorithm that does not fold."""

    def restore(self, agents: dict[int, dict]) -> None: ...

    def close(self) -> None: ...


@dataclass
class RunState:
    """A run between rounds: enough to continue it exactly (a sweep trial's checkpoint)."""

    round: int
    step: int
    rows: list[Row]
    agents: dict[int, dict]
    network: dict[str, Any] | None = None
    """The network's counters (``NetworkStats.state``); None: none yet (they start at 0)."""


Item = Union[tuple[int, list[Row]], RunState, RunResult]


def stream(plan: Plan, hosts: Hosts, *, resume: RunState | None = None,
           checkpoint_every: int | None = None,
           stop: Callable[[], bool] | None = None) -> Iterator[Item]:
    """Run ``plan.config.rounds`` rounds of ``local_steps`` steps on ``hosts``.

    Yields ``(round, rows)`` once per round (rows empty between evaluations; round 0 is the
    evaluation before training), a ``RunState`` after every ``checkpoint_every``-th round when
    asked, and the ``RunResult`` last. Runtimes forward these items to the driver as they come,
    which is how a remote run streams its metrics. ``resume`` continues from a ``RunState``.

    ``stop`` is asked after every round: when it says so the run ends there, at a round
    boundary, with a ``RunState`` of that round and a result of status ``interrupted``.
    Divergence is declared at the first non-finite loss of a step or metric of an evaluation; a
    diverged result's summary, final metrics and factors are then those of the last evaluation
    whose numbers were all finite, and ``diverged_at`` says where it broke.
    """
    cfg, start, status, diverged = plan.config, time.perf_counter(), "completed", None
    clock = _Clock()
    if resume is None:
        rows, t, first = [], 0, 1
    else:
        hosts.restore(resume.agents)
        rows, t, first = list(resume.rows), resume.step, resume.round + 1
    stats = NetworkStats(plan, resume.network if resume is not None else None)
    state = lambda: RunState(rnd, t, list(rows), hosts.snapshot(), stats.state())
    rnd, good = first - 1, None  # good: (round, factors) of the last all-finite evaluation
    generations: list[dict[str, Any]] = []
    try:
        if resume is None:
            with clock.phase("eval"):
                new, adapters, _ = _eval_rows(plan, hosts, 0, 0, {}, stats)
                hosts.end_round(0)
            rows += new
            yield 0, new
            _check_finite(new, 0)
            good = (0, adapters)
        for rnd in range(first, cfg.rounds + 1):
            evaluate = rnd % cfg.eval_every == 0 or rnd == cfg.rounds
            net = plan.schedule.round(rnd)
            talk = plan.algorithm.communicates and bool(net.active)  # an empty round: nobody
            quiet = cfg.local_steps - 1 if plan.algorithm.communicates else cfg.local_steps
            with clock.phase("train"):
                if quiet and net.active:
                    hosts.local_steps(t + 1, quiet, net)
                t += cfg.local_steps
                diags = hosts.communicate(t, diagnose=evaluate, net=net) if talk else {}
            mix = getattr(hosts, "mix_s", 0.0) if talk else 0.0
            stats.record(net, hosts.sent_bytes if talk else {}, evaluate)
            new = []
            with clock.phase("eval"):
                if evaluate:
                    new, adapters, generations = _eval_rows(plan, hosts, rnd, t, diags, stats,
                                                            final=rnd == cfg.rounds)
                hosts.end_round(rnd)  # Ray: the round's deferred steps run here, if any
            clock.end_round(rnd, mix)
            rows += new
            yield rnd, new
            if new:
                _check_finite(new, t)
                good = (rnd, adapters)
            saved = checkpoint_every and rnd % checkpoint_every == 0 and rnd < cfg.rounds
            if saved:
                yield state()
            if stop is not None and rnd < cfg.rounds and stop():
                if not saved:
                    yield state()
                status = "interrupted"
                break
    except Diverged as e:
        status, diverged = "diverged", {"round": rnd, "step": e.t, "agent": e.agent}
        if e.metric:
            diverged["metric"] = e.metric
    base = None
    if status == "diverged" and good is not None:
        done, factors = good
        diverged["results_of_round"] = done
    else:
        done, factors = rnd, hosts.factors()
        if plan.algorithm.fold is not None:
            base = hosts.base_delta()
    final = {r["metric"]: r["value"] for r in rows if r["agent"] == -1 and r["round"] == done}
    summary = _summary(plan, status, done, t, diverged, final, time.perf_counter() - start)
    summary.update(clock.summary(getattr(hosts, "load_s", 0.0)))
    summary["network"] = stats.summary()
    yield RunResult(cfg, status, rows, summary, factors,
                    generations if status == "completed" else [], base)


MAY_BE_NAN = {"spectral_gap"}
"""Metrics whose NaN says "not computed" (``network.GAP_MAX``), not divergence."""


def _check_finite(rows: list[Row], t: int) -> None:
    """Raise ``Diverged`` at the first non-finite metric of an evaluation (a NaN test loss is
    divergence, even before a training loss shows it)."""
    for r in rows:
        if not math.isfinite(r["value"]) and r["metric"] not in MAY_BE_NAN:
            raise Diverged(t, r["agent"], r["value"], r["metric"])


class _Clock:
    """Wall-clock time per phase and round, measured where the loop runs (the coordinator).

    ``train`` is the round's local steps and communication, wall clock, which includes mixing;
    ``mix`` (reported by the hosts) is split out of it, so train + mix is a round's wall time
    without evaluation: the paper's time per round (Tables 6 and 7). ``eval`` is evaluation and
    diagnostics. On Ray a round's quiet steps run with its communication, so both land in train.
    """

    def __init__(self):
        self.totals = {"train": 0.0, "eval": 0.0}
        self.rounds: list[list[float]] = []
        self._round = {"train": 0.0, "eval": 0.0}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.totals[name] += spent
            self._round[name] += spent

    def end_round(self, rnd: int, mix: float) -> None:
        train, ev = self._round["train"], self._round["eval"]
        mix = min(mix, train)
        self.rounds.append([rnd, round(train - mix, 6), round(mix, 6), round(ev, 6)])
        self._round = {"train": 0.0, "eval": 0.0}

    def summary(self, load_s: float) -> dict[str, Any]:
        mix = sum(r[2] for r in self.rounds)
        train = sum(r[1] for r in self.rounds)
        n = max(len(self.rounds), 1)
        return {
            "load_time_s": load_s,
            "train_time_s": train, "mix_time_s": mix, "eval_time_s": self.totals["eval"],
            "time_per_round_s": (train + mix) / n,
            "round_times": {"columns": ["round", "train_s", "mix_s", "eval_s"],
                            "rows": self.rounds},
        }


def follow(items: Iterable[Item], rounds: int, desc: str, *,
           on_rows: Callable[[list[Row]], None] | None = None,
           on_checkpoint: Callable[[RunState], None] | None = None,
           progress: bool = True, initial: int = 0) -> RunResult:
    """Consume a ``stream``: pass rows to ``on_rows`` and states to ``on_checkpoint``, move a
    progress bar per round, return the final ``RunResult``."""
    bar = tqdm(total=rounds, initial=initial, desc=desc, disable=not progress, leave=False)
    try:
        for item in items:
            if isinstance(item, RunResult):
                return item
            if isinstance(item, RunState):
                if on_checkpoint is not None:
                    on_checkpoint(item)
                continue
            rnd, rows = item
            if rows:
                if on_rows is not None:
                    on_rows(rows)
                bar.set_postfix(_postfix(rows), refresh=False)
            if rnd:
                bar.update(1)
    finally:
        bar.close()
    raise RuntimeError("the run ended without a result")


def _eval_rows(plan: Plan, hosts: Hosts, rnd: int, t: int, diags: dict[int, dict[str, float]],
               stats: NetworkStats, final: bool = False
               ) -> tuple[list[Row], dict[int, Factors], list[dict[str, Any]]]:
    """Per-agent test metrics, diagnostics and bytes sent, then network rows (agent -1): their
    means, consensus distance, parameter distance, ||grad f(v-bar)||^2, floats sent so far and
    the network's counters (``NetworkStats.network_values``); the
    factors they were measured at (no copy needed: factors are never updated in place;
    agents of different ranks are measured zero-padded to the largest, ``factors.padded``, so
    the consensus distance is exact and the parameter distance and v-bar are the padded
    factors'); and,
    at the ``final`` evaluation, the generations the task's ``evaluate_final`` made, each
    record tagged with its agent."""
    per_agent = hosts.evaluate(final)
    generations = [{"agent": i, **g} for i, m in sorted(per_agent.items())
                   for g in m.pop("generations", [])]
    for i, d in diags.items():
        per_agent[i].update(d)
    for i, d in stats.agent_values().items():
        per_agent[i].update(d)
    factors = hosts.factors()
    adapters = F.padded([a for _, a in sorted(factors.items())])  # ranks may differ
    net = metrics.means(per_agent)
    net["consensus_distance"] = metrics.consensus_distance(adapters, plan.config.lora.scale)
    net["param_distance"] = metrics.param_distance(adapters)
    if plan.config.grad_norm:
        grads = hosts.full_grads(F.mean(adapters))
        net["grad_norm_sq"] = metrics.grad_norm_sq([g for _, g in sorted(grads.items())])
    net["floats_sent"] = _floats_sent(plan, rnd)
    net.update(stats.network_values())
    out = [_row(rnd, t, i, k, v) for i, m in sorted(per_agent.items()) for k, v in sorted(m.items())]
    return out + [_row(rnd, t, -1, k, v) for k, v in sorted(net.items())], factors, generations


def _row(rnd: int, t: int, agent: int, metric: str, value: float) -> Row:
    return {"round": rnd, "step": t, "agent": agent, "metric": metric, "value": float(value)}


def _floats_per_round(plan: Plan, rnd: int | None = None) -> float:
    """Mean over agents of the network's floats in communication round ``rnd``, the server's
    broadcast included (the paper's Table 1: FedAvg sends pN + 1 messages, not N); rnd None:
    the mean round of an algorithm whose messages change with the round (``alternating``)."""
    shapes, degrees = plan.task.lora_shapes(), [plan.degree(i) for i in range(plan.agents)]
    net = plan.algorithm.network_floats_per_round(shapes, _ranks(plan), degrees, rnd)
    return net / plan.agents


def _ranks(plan: Plan) -> int | tuple[int, ...]:
    """Every agent's rank: one int when they share it (``lora.rank``), else per agent."""
    return plan.ranks if len(set(plan.ranks)) > 1 else plan.config.lora.rank


def _floats_sent(plan: Plan, rnd: int) -> float:
    """Mean over agents of the floats sent in rounds 1..rnd: rnd equal rounds, or, where the
    rounds take turns sending A and B (``Algorithm.phases``), each round's own."""
    if not plan.algorithm.phases:
        return rnd * _floats_per_round(plan)
    # round k sends phase (k - 1) mod P: every phase rnd // P times, the first rnd mod P once more
    period = len(plan.algorithm.phases)
    per_phase = [_floats_per_round(plan, k) for k in range(1, period + 1)]
    return (rnd // period) * sum(per_phase) + sum(per_phase[:rnd % period])


def _postfix(rows: list[Row]) -> dict[str, str]:
    net = {r["metric"]: r["value"] for r in rows if r["agent"] == -1}
    keys = [k for k in ("test_accuracy", "test_loss", "train_loss") if k in net][:2]
    return {k.replace("test_", ""): f"{net[k]:.4g}" for k in keys}


def _summary(plan: Plan, status: str, rounds: int, steps: int, diverged: Any,
             final: dict[str, float], wall: float) -> dict[str, Any]:
    cfg = plan.config
    return {
        "status": status, "algorithm": cfg.algorithm, "agents": plan.agents,
        "rounds_completed": rounds, "steps_completed": steps, "diverged_at": diverged,
        "final": final, "wall_time_s": wall,
        "floats_sent_per_round_per_agent": _floats_per_round(plan),
        "trainable_params_per_agent": _trainable_per_agent(plan),
        "versions": versions(),
    }


def _trainable_per_agent(plan: Plan) -> float:
    """Trainable parameters of one agent's adapter, the mean over agents of different ranks."""
    ranks, shapes, train_A = _ranks(plan), plan.task.lora_shapes(), plan.algorithm.train_A
    if isinstance(ranks, int):
        return F.param_count(shapes, ranks, train_A)
    return sum(F.param_count(shapes, r, train_A) for r in ranks) / len(ranks)
