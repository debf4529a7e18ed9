"""A group of agents that share one task (one frozen base model): the unit every runtime drives.

The in-process runtime holds one group with every agent; the Ray runtime holds one group per
host actor. Both call the same methods in the same order, so they compute the same numbers:

    for t in 1..T:                                   # Algorithm 1
        if t % tau:  group.local_step(t)             # g at w_t, w_{t+1} = w_t + update(g)
        else:        payloads = group.grads_and_payloads(t)      # g at w_t; publish w_t
                     group.mix_and_apply(t, inbox)   # w_{t+1/2} = mix(neighbours' w_t);
                                                     # w_{t+1} = w_{t+1/2} + update(g)

With ``adam_tracked`` (Algorithm 4) a payload also holds the agent's second-moment tracker,
which ``mix_and_apply`` mixes as it mixes the factors, before the step that reads it.

A server algorithm that folds into the base weights (``Algorithm.fold``: FedEx-LoRA, FLoRA)
gives every agent of the group the same payloads and weights, so the group folds once a round
and adds the delta to its task's frozen weights once, not once per agent. The group keeps the
sum S of the deltas (float32, on the CPU) and has the task set its weights to W0 + S, never
adding in place, so a restored snapshot, which carries S, gives the same weights bit for bit.

Every source of randomness is per agent (its batch order, its seed per step, which the task
seeds its augmentation and dropout from), so the numbers do not depend on which agents share a
group, and no global generator is read or written here. With ``runtime.batch_agents`` > 1 the
gradients of a group's agents are taken in batches (one forward pass each), whose float rounding
can depend on who shares a pass; the batches are cut from the agent ids the same way on every
runtime (``agent_batches``), so runtimes still agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from decaf_ray import compress
from decaf_ray.algorithms import Algorithm, MixOptions, diagnostics
from decaf_ray.tracking import tracker_of, with_tracker
from decaf_ray.factors import Factors, Grads, init_factors, rank_of, truncated
from decaf_ray.folding import BaseDelta
from decaf_ray.network_config import CompressConfig
from decaf_ray.optim import Optimizer, State, apply_updates, refactor_state
from decaf_ray.seeding import derive_seed

Inbox = dict[int, tuple[tuple[int, ...], tuple[float, ...], list[Factors]]]
"""agent id -> (neighbour ids incl. self, their weights pi_ij, their published adapters)."""
MIX_BATCH = 32
"""Most agents mixed in one batched call (each result is the same whatever the batch)."""


class Diverged(RuntimeError):
    """An agent's loss (or, with ``metric``, an evaluation's metric; agent -1: the network's)
    became NaN or inf at step ``t``."""

    def __init__(self, t: int, agent: int, loss: float, metric: str | None = None):
        what = f"{metric} {loss}" if metric else f"loss {loss}"
        super().__init__(f"agent {agent} diverged at step {t} ({what})")
        self.t, self.agent, self.loss, self.metric = t, agent, loss, metric

    def __reduce__(self):  # crosses process boundaries on the Ray runtime
        return Diverged, (self.t, self.agent, self.loss, self.metric)


class Sampler:
    """Epoch-shuffled minibatches of one agent's shard, drawn from the agent's own RNG."""

    def __init__(self, shard: np.ndarray, batch_size: int, seed: int):
        self.shard, self.batch_size = shard, min(batch_size, len(shard))
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(shard), 0

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order.copy(), "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.pos = state["order"].copy(), state["pos"]

    def next(self) -> np.ndarray:
        """(batch_size,) training indices; a new permutation at each epoch's end."""
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self.rng.permutation(self.shard), 0
        batch = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch


def _finite(tree: Factors) -> bool:
    return all(bool(torch.isfinite(x).all()) for pair in tree.values() for x in pair)


def agent_batches(ids: list[int], per_host: int, batch: int) -> list[list[int]]:
    """The agents whose gradients are taken in one pass: within each host's agents (ids
    ``k * per_host ..``), consecutive runs of ``batch``. The same cut for a host's own ids and for
    all ids at once, so the in-process runtime batches exactly as the Ray hosts do."""
    hosts: dict[int, list[int]] = {}
    for i in sorted(ids):
        hosts.setdefault(i // per_host, []).append(i)
    return [members[k:k + batch] for members in hosts.values()
            for k in range(0, len(members), batch)]


@dataclass
class Agent:
    id: int
    factors: Factors
    opt_state: State
    sampler: Sampler
    pending: Grads | None = None
    losses: list[float] = field(default_factory=list)
    sent: Factors | None = None  # this round's payload, exact: an agent mixes its own so
    residual: compress.Payload | None = None  # error feedback: what its messages lost so far


class AgentGroup:
    """Agents hosted together; see the module docstring for the call order."""

    def __init__(self, task, algorithm: Algorithm, optimizer: Optimizer, agents: list[Agent],
                 seed: int, mix_options: MixOptions, batches: list[list[int]] | None = None,
                 local_steps: int = 1, compression: Any = None):
        self.task, self.algorithm, self.optimizer = task, algorithm, optimizer
        self.agents = {a.id: a for a in agents}
        self.seed, self.mix_options = seed, mix_options
        self.batches = batches or [[a.id] for a in agents]
        self.local_steps = local_steps  # tau: step t belongs to round ceil(t / tau)
        self.base_delta: BaseDelta | None = None  # S, what the folds added to the task's W0
        self.compression = compression or CompressConfig()  # network.compress
        # Over a graph each agent mixes its own payload exactly and its neighbours' lossy
        # copies, so agents with equal neighbours and weights no longer share a mix; a server
        # decodes every upload alike and every agent receives its one average.
        self.lossy = self.compression.kind != "float32"
        self.exact_own = self.lossy and algorithm.pi == "graph"

    @classmethod
    def build(cls, cfg, task, algorithm: Algorithm, optimizer: Optimizer,
              shards: dict[int, np.ndarray], ranks: Sequence[int] | None = None
              ) -> "AgentGroup":
        """Agents ``shards.keys()`` with the paper's shared initialisation (A Gaussian from the
        experiment seed, B zero): every agent, on every host, starts from the same adapter.
        ``ranks`` (``Plan.ranks``, one per agent of the whole run; None: ``lora.rank`` each):
        agent i takes the first r_i rows of one A drawn at the largest rank, so the agents'
        initial adapters are nested (and all equal when the ranks are)."""
        top = max(ranks) if ranks else cfg.lora.rank
        init = init_factors(task.lora_shapes(), top,
                            torch.Generator().manual_seed(derive_seed(cfg.seed, 1)),
                            cfg.lora.init_std)
        mine = {i: init if not ranks or ranks[i] == top else truncated(init, ranks[i])
                for i in shards}
        agents = [Agent(i, mine[i], optimizer.init(mine[i]),
                        Sampler(shard, cfg.data.batch_size, derive_seed(cfg.seed, 2, i)))
                  for i, shard in shards.items()]
        rt = cfg.runtime
        return cls(task, algorithm, optimizer, agents, cfg.seed,
                   MixOptions(split=cfg.consensus.split, state=cfg.consensus.state,
                              scale=cfg.lora.scale, init_std=cfg.lora.init_std),
                   agent_batches(list(shards), rt.agents_per_host, rt.batch_agents),
                   cfg.local_steps, cfg.network.compress)

    # ------------------------------------------------------------------ training steps

    @property
    def _fresh(self) -> bool:
        """The algorithm's fold hands out fresh adapters (FLoRA)."""
        return self.algorithm.fold is not None and self.algorithm.fold.fresh

    def round_of(self, t: int) -> int:
        """The round (1-based) step t belongs to: rounds are ``local_steps`` steps each."""
        return (t - 1) // self.local_steps + 1

    def _grads(self, t: int, ids: Sequence[int] | None = None) -> Iterator[tuple[Agent, Grads]]:
        """Each agent's minibatch gradient at its w_t, in agent order, a batch at a time; the
        factors the round does not train (``Algorithm.trains_in``) get None. ``ids``: only
        these agents (each batch keeps its members among them); None: every agent."""
        trains = self.algorithm.trains_in(self.round_of(t))
        chosen = None if ids is None else set(ids)
        for batch in self.batches:
            agents = [self.agents[i] for i in batch if chosen is None or i in chosen]
            if not agents:
                continue
            indices = [a.sampler.next() for a in agents]
            seeds = [derive_seed(self.seed, 3, a.id, t) for a in agents]
            if len(agents) == 1:
                results = [self.task.loss_and_grads(agents[0].factors, indices[0],
                                                    "A" in trains, seeds[0])]
            else:
                results = self.task.loss_and_grads_many([a.factors for a in agents], indices,
                                                        "A" in trains, seeds)
            for agent, (loss, grads) in zip(agents, results):
                if not math.isfinite(loss):
                    raise Diverged(t, agent.id, loss)
                agent.losses.append(loss)
                if "B" not in trains:  # a task always returns B's gradient: frozen here
                    grads = {n: (ga, None) for n, (ga, _) in grads.items()}
                yield agent, grads

    def _step(self, agent: Agent, grads: Grads, point: Factors, t: int) -> None:
        updates, agent.opt_state = self.optimizer.update(grads, agent.opt_state, point, t)
        agent.factors = apply_updates(point, updates)

    def local_step(self, t: int, ids: Sequence[int] | None = None) -> None:
        """Steps without communication: w_{t+1} = w_t + update(g_t); ``ids``: only these
        agents (None: all)."""
        for agent, grads in self._grads(t, ids):
            self._step(agent, grads, agent.factors, t)

    def quiet_steps(self, t: int, count: int, steps: dict[int, int] | None = None) -> None:
        """Steps t, ..., t + count - 1 without communication. ``steps`` (``RoundNet.steps``,
        active agents only; None: all take all): an agent with s steps takes the first s - 1
        here if the algorithm communicates (its last is the communicating step), else s; the
        step numbers, hence each step's seed, are everyone's."""
        talk = int(self.algorithm.communicates)
        for k in range(count):
            ids = None if steps is None else [i for i in self.agents if steps.get(i, 0) - talk > k]
            if ids is None or ids:
                self.local_step(t + k, ids)

    def grads_and_payloads(self, t: int, ids: Sequence[int] | None = None) -> dict[int, Factors]:
        """Take each agent's gradient at w_t, hold it, and return what each agent publishes:
        the factors that travel in this round (``Algorithm.payload``), and with a tracking
        optimizer (``adam_tracked``) its tracker U-hat_t as well, the same factors of it. A fold
        that hands out fresh adapters (FLoRA) takes the step now and publishes w_{t+1}.
        ``ids``: only these agents (the round's active ones); None: every agent."""
        out, key, rnd = {}, self.optimizer.tracker, self.round_of(t)
        for agent, grads in self._grads(t, ids):
            if self._fresh:
                self._step(agent, grads, agent.factors, t)
            else:
                agent.pending = grads
            out[agent.id] = self.algorithm.payload(agent.factors, rnd)
            if key is not None:
                tracker = agent.opt_state[key]
                if not _finite(tracker):  # e.g. g^2 overflowed; a TSVD of it would raise
                    raise Diverged(t, agent.id, math.nan, "tracker")
                out[agent.id] = with_tracker(out[agent.id], self.algorithm.payload(tracker, rnd))
            agent.sent = out[agent.id]
        return out

    def messages(self, payloads: dict[int, Factors]) -> dict[int, compress.Message]:
        """Each payload as it travels (``network.compress``), encoded once: float32 shares the
        payload's memory; a lossy kind with error feedback adds the agent's residual and keeps
        what this message lost as its next."""
        cfg, out = self.compression, {}
        for aid, payload in payloads.items():
            if not cfg.error_feedback:
                out[aid] = compress.encode(payload, cfg.kind, cfg.ratio)
                continue
            agent = self.agents[aid]
            out[aid], agent.residual = compress.encode_with_feedback(
                payload, agent.residual, cfg.kind, cfg.ratio)
        return out

    def mix_and_apply(self, t: int, inbox: Inbox, diagnose: bool = False
                      ) -> dict[int, dict[str, float]]:
        """w_{t+1/2} = mix(neighbours' w_t), w_{t+1} = w_{t+1/2} + update(g_t) for each agent.

        Agents with the same neighbours and weights (e.g. all of them under FedAvg) share one
        mix, which is exact because a mix reads only the payloads (and the shared frozen A),
        unless the split is ``aligned`` or ``conserved``, which read the agent's own factors,
        or the algorithm hands back a trained factor it did not mix (``keeps_own``: FedSA's B).
        Returns consensus diagnostics per agent when ``diagnose``.

        A tracking optimizer's tracker (Algorithm 4) is mixed by the same mix as the factors,
        fitted to the agent's own tracker where the split fits to its own factors, and replaces
        the agent's before its step; a re-factorization's ``consensus.state`` policy applies to
        the rest of the state (``optim.MOMENTS``).

        A fold (``Algorithm.fold``) replaces the mix: ``_fold``. A fresh adapter (FLoRA) is
        taken as it is, with the optimizer state of a new one: its step came before publishing.

        ``inbox`` names who mixes (``Schedule.inboxes``); one without a pending gradient (an
        inactive agent a server's average reaches) takes the mix and no step. ``exact_own``:
        each agent's own decoded payload is replaced by the exact one it published.
        """
        if self.exact_own:
            inbox = {aid: (ids, w, [self.agents[aid].sent if j == aid else p
                                    for j, p in zip(ids, payloads)])
                     for aid, (ids, w, payloads) in inbox.items()}
        if self.algorithm.fold is not None:
            mixes = self._fold(t, inbox)
        else:
            mixes = self._mix(inbox, {aid: self.agents[aid].factors for aid in inbox})
        key, trackers = self.optimizer.tracker, {}
        if key is not None:
            try:
                trackers = self._mix(
                    inbox, {aid: self.agents[aid].opt_state[key] for aid in inbox}, tracker_of)
            except torch.linalg.LinAlgError:  # DeCAF: a tracker product past float range
                raise Diverged(t, min(inbox), math.nan, "tracker") from None
        diags = {}
        for aid, (_, weights, payloads) in inbox.items():
            agent, mixed = self.agents[aid], mixes[aid]
            if diagnose:
                w = torch.tensor(weights, dtype=torch.float32)
                diags[aid] = diagnostics(agent.factors, payloads, w, mixed)
            if self.algorithm.refactorizes:
                agent.opt_state = refactor_state(agent.opt_state, agent.factors, mixed,
                                                 self.mix_options.state)
            if key is not None:
                agent.opt_state = {**agent.opt_state, key: trackers[aid]}
            if self._fresh:  # stepped before publishing; a new adapter, a new optimizer state
                agent.factors, agent.opt_state = mixed, self.optimizer.init(mixed)
            elif agent.pending is None:  # inactive this round: the server's average only
                agent.factors = mixed
            else:
                self._step(agent, agent.pending, mixed, t)
            agent.pending = agent.sent = None
        return diags

    def _fold(self, t: int, inbox: Inbox) -> dict[int, Factors]:
        """A server algorithm's fold: every agent here receives the same payloads and weights,
        so one ``fold`` gives each its adapter (cut to the agent's own rank) and the group one
        base delta, added to S; the task's frozen weights become W0 + S. A fresh adapter's A is
        drawn from (experiment seed, round), the same on every host."""
        (ids, weights, payloads), *rest = inbox.values()
        if any((tuple(i), tuple(w)) != (tuple(ids), tuple(weights)) for i, w, _ in rest):
            raise ValueError(f"{self.algorithm.name} folds one server average into every base; "
                             "its agents must all receive the same payloads and weights")
        w = torch.tensor(weights, dtype=torch.float32)
        opt, seed = self.mix_options, derive_seed(self.seed, 5, self.round_of(t))
        mixed, delta = self.algorithm.fold.fn(payloads, w, opt.scale, opt.init_std, seed)
        base = self.base_delta
        self._set_base({n: d if base is None else base[n] + d for n, d in delta.items()})
        out = {}
        for aid in inbox:
            r = rank_of(self.agents[aid].factors)
            out[aid] = mixed if r == rank_of(mixed) else truncated(mixed, r)
        return out

    def _set_base(self, delta: BaseDelta | None) -> None:
        """S = ``delta`` (None: no fold yet), and the task's frozen weights W0 + S."""
        setter = getattr(self.task, "set_base_delta", None)
        if setter is None:
            raise TypeError(f"{self.algorithm.name} folds into the base weights, which task "
                            f"{type(self.task).__name__} cannot change (no set_base_delta)")
        self.base_delta = delta
        setter(delta)

    def _mix(self, inbox: Inbox, owns: dict[int, Factors], part=None) -> dict[int, Factors]:
        """Each agent's mix of ``part(payload)`` of its neighbours' payloads (the whole payload
        when ``part`` is None), ``owns[aid]`` being its own: one mix per distinct (neighbours,
        weights), or per agent when the mix reads the agent's own; the distinct mixes with
        equally many neighbours go to the algorithm as one batch. Each result is bit-identical
        to mixing alone, so how agents are spread over hosts does not change the numbers."""
        def key(aid: int) -> tuple:  # the own rank: a mix returns the agent's own rank
            ids, weights, _ = inbox[aid]
            own = self.mix_options.per_agent or self.algorithm.keeps_own or self.exact_own
            return ids, weights, aid if own else rank_of(owns[aid])

        first: dict[tuple, int] = {}
        for aid in inbox:
            first.setdefault(key(aid), aid)
        by_count: dict[int, list[int]] = {}
        for aid in first.values():
            by_count.setdefault(len(inbox[aid][0]), []).append(aid)
        # Capped, so a big host holds at most MIX_BATCH x m stacked adapters at once.
        batches = [aids[k:k + MIX_BATCH] for aids in by_count.values()
                   for k in range(0, len(aids), MIX_BATCH)]
        mixed: dict[int, Factors] = {}
        for aids in batches:
            weights = torch.tensor([inbox[a][1] for a in aids], dtype=torch.float32)
            received = [inbox[a][2] if part is None else [part(p) for p in inbox[a][2]]
                        for a in aids]
            mixed.update(zip(aids, self.algorithm.mix_agents(
                [owns[a] for a in aids], received, weights, self.mix_options)))
        return {aid: mixed[first[key(aid)]] for aid in inbox}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, final: bool = False) -> dict[int, dict[str, Any]]:
        """Test metrics and mean training loss since the last evaluation, per agent. ``final``
        (the run's last evaluation): the task's ``evaluate_final(factors, agent)`` where it has
        one (generative benchmarks; may add ``generations``, a list of records), else its
        ``evaluate``."""
        out = {}
        at_end = getattr(self.task, "evaluate_final", None) if final else None
        for agent in self.agents.values():
            metrics = dict(at_end(agent.factors, agent.id) if at_end else
                           self.task.evaluate(agent.factors))
            if agent.losses:
                metrics["train_loss"] = float(np.mean(agent.losses))
            agent.losses = []
            out[agent.id] = metrics
        return out

    def factors(self) -> dict[int, Factors]:
        return {a.id: a.factors for a in self.agents.values()}

    def snapshot(self) -> dict[int, dict]:
        """Everything that makes each agent's future numbers: factors, optimizer state, batch
        sampler, and the training losses not yet reported; with error feedback, its residual
        (``residual``, once it has one); after a fold, also the group's base
        delta S (``base_delta``: the same tensors in every agent's entry, so a host or a
        checkpoint holds them once, and any part of a snapshot restores them). Taken between
        rounds (no pending gradient); ``restore`` of it replays the same numbers."""
        extra = {} if self.base_delta is None else {"base_delta": self.base_delta}
        return {a.id: {"factors": a.factors, "opt_state": a.opt_state,
                       "sampler": a.sampler.state(), "losses": list(a.losses), **extra,
                       **({} if a.residual is None else {"residual": a.residual})}
                for a in self.agents.values()}

    def restore(self, snapshot: dict[int, dict]) -> None:
        for aid, state in snapshot.items():
            agent = self.agents[aid]
            agent.factors, agent.opt_state = state["factors"], state["opt_state"]
            agent.sampler.set_state(state["sampler"])
            agent.losses, agent.pending = list(state["losses"]), None
            agent.residual = state.get("residual")
        base = next((s["base_delta"] for s in snapshot.values() if "base_delta" in s), None)
        if base is not None or self.base_delta is not None:  # back to W0 + S, or to W0
            self._set_base(base)

    def full_grads(self, factors: Factors) -> dict[int, Grads]:
        """Each agent's full-shard gradient of f_i at the given adapter (for grad f at v-bar)."""
        out = {}
        for a in self.agents.values():
            out[a.id] = self.task.loss_and_grads(factors, a.sampler.shard, self.algorithm.train_A,
                                                 derive_seed(self.seed, 4, a.id))[1]
        return out

