"""The algorithms of the paper and the best-known LoRA aggregation rules beside them, one
registry entry each: what is trained, what travels, how it is mixed, and which mixing matrix.

| name        | trains          | travels     | mix                            | Pi               |
|-------------|-----------------|-------------|--------------------------------|------------------|
| decaf       | A, B            | A, B        | TSVD of sum pi_ij B_j A_j      | the graph's      |
| dlora       | A, B            | A, B        | sum pi_ij A_j, sum pi_ij B_j   | the graph's      |
| dlora_fa    | B               | B           | sum pi_ij B_j                  | the graph's      |
| fedsa       | A, B            | A           | sum pi_ij A_j; B stays local   | the graph's      |
| alternating | B (odd rounds), | the round's | sum pi_ij X_j of the round's   | the graph's      |
|             | A (even rounds) | factor X    | factor X; the other stays      |                  |
| hetlora     | A, B            | A, B        | zero-pad to max r_j, average   | the graph's      |
|             |                 |             | weighted by pi_ij ||B_j A_j||, |                  |
|             |                 |             | truncate to the agent's r_i    |                  |
| fedavg      | A, B            | A, B        | as dlora                       | (1/N) 1 1^T      |
| fedavg_fa   | B               | B           | as dlora_fa                    | (1/N) 1 1^T      |
| fedex       | A, B            | A, B        | as fedavg; the base W0 gains   | (1/N) 1 1^T      |
|             |                 |             | s (avg B_j A_j - B' A')        |                  |
| flora       | A, B            | A, B        | W0 gains s avg B_j A_j (the    | (1/N) 1 1^T      |
|             |                 |             | stack); fresh A (seeded), B = 0|                  |
| local       | A, B            | nothing     | none                           | I                |
| local_fa    | B               | nothing     | none                           | I                |
| centralized | A, B            | nothing     | none                           | one agent, all   |
|             |                 |             |                                | the data         |

Where the rules of other papers sit here:

* FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
  arXiv 2403.12313) freezes the random A and trains and averages only the zero-initialised B:
  that is ``fedavg_fa``, and its gossip form ``dlora_fa``. ConLoRA, decentralized LoRA with the
  shared A frozen, is ``dlora_fa`` as well; neither has an entry of its own.
* FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
  Learning", ICLR 2025, arXiv 2410.01463) trains both factors and shares only A (A learns what
  is general, B what is client-specific): ``fedsa``, gossiped over the graph's Pi. Its mix is
  not exact on the product: agent i ends with B_i (sum_j pi_ij A_j), its own B on the mixed A.
* RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of
  LoRA", NeurIPS 2025, arXiv 2502.01755) alternates: clients train B with A frozen and B is
  averaged, then train A with B frozen and A is averaged. ``alternating`` is its gossip form
  with one factor per round, the phase taken from the round number k (1-based, as
  ``runtime.loop`` counts rounds): odd rounds train and mix B, even rounds A. B goes first
  because B_0 = 0 makes A's gradient s B^T dL/dW zero. A round's mix is exact on the product
  for agent i, sum_j pi_ij B_j A_j = B_i' A_i' (B_i' = sum_j pi_ij B_j in a B round, with its
  own A_i' = A_i), whenever the frozen factor is equal over i's neighbourhood: always in
  round 1 (the shared A_0), and in every round when each mix makes the factor it mixes equal
  everywhere (a complete graph with uniform Pi, i.e. RoLoRA's server average). On a sparse
  graph the frozen factor differs between neighbours after its first mix and the mix misses
  by sum_j pi_ij B_j (A_j - A_i) (B rounds) or sum_j pi_ij (B_j - B_i) A_j (A rounds).
  Decentralized cousins (related work, not implemented): ADF-LoRA (arXiv 2511.18291), which
  updates one factor per round but mixes both, and TAD-LoRA.

* HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
  Models", EMNLP 2024, arXiv 2401.06432) lets clients hold different ranks: the server
  zero-pads every client's factors to the largest rank, averages them with weights
  proportional to ||B_k A_k||_F (sparsity-weighted aggregation) and sends each client the
  first r_k ranks back. ``hetlora`` is its gossip form over the graph's Pi
  (``consensus.hetlora_mix``). The paper's rank self-pruning (a client shrinking its own rank
  while it trains) is left out: every agent keeps the rank the config gives it.

* FedEx-LoRA (Singhal et al., arXiv 2411.09432) and FLoRA (Wang et al., NeurIPS 2024, arXiv
  2409.05976), ``fedex`` and ``flora``, fold into the frozen base: on a server only (``folding``).

Agents may hold different ranks r_i (``lora.ranks``, ``lora.rank_rule``) where the mix is
defined across ranks (``mixed_ranks``): ``hetlora``; ``decaf``, whose mixed product
sum_j pi_ij B_j A_j has any ranks and whose TSVD returns agent i's own r_i
(``consensus.decaf_mix_ranks``); ``flora``, whose stack takes any ranks; and ``local``/
``local_fa``, which mix nothing. Averaging factors of different shapes (DLoRA, FedAvg,
FedEx-LoRA, the FA variants, FedSA, alternating) is undefined.

A mix function is pure: ``mix(own, payloads, weights, options) -> Factors``, where ``payloads``
are the neighbours' published adapters (self included) in the order of ``weights``; a factor
that does not travel is None in a payload and the agent's own in the result. Modules of
equal shape are mixed in one batched call. An algorithm may also give ``mix_many``, the same mix
for n agents with equally many neighbours at once (DeCAF does: its per-agent QRs and SVDs are
small, so one batched call saves their fixed cost n times over). Adding an algorithm is one
``register`` call here.

With ``optim.name: adam_tracked`` (the paper's Algorithm 4) DLoRA, DLoRA-FA and DeCAF also send
each agent's second-moment tracker in the same message (``tracking.with_tracker``), mixed by the
same mix as the factors (``agents.AgentGroup.mix_and_apply``) and counted in the floats
(``tracking.tracking``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from decaf_ray import alignment, consensus, folding
from decaf_ray.factors import Factors, padded, rank_of, shape_groups, stack

MixFn = Callable[[Factors, list[Factors], Tensor, "MixOptions"], Factors]
MixManyFn = Callable[[list[Factors], list[list[Factors]], Tensor, "MixOptions"], list[Factors]]


@dataclass(frozen=True)
class MixOptions:
    """Options a mix may read: the TSVD split of DeCAF and what happens to optimizer state when
    the factors are re-factorized (``keep``, ``rotate``, ``reset``); a fold's LoRA scale s and
    the std of a fresh A (``lora.scale``, ``lora.init_std``)."""

    split: str = "balanced"
    state: str = "keep"
    scale: float = 1.0
    init_std: float | None = None

    @property
    def per_agent(self) -> bool:
        """The mix reads the agent's own factors, so agents cannot share one result."""
        return self.split in ("aligned", "conserved")


@dataclass(frozen=True)
class Algorithm:
    """One algorithm (see the module table). Factor sets are strings of ``"A"`` and ``"B"``."""

    name: str
    trains: str
    """The factors that take gradient steps: ``"AB"``, or ``"B"`` (A frozen at the shared A_0)."""
    travels: str
    """The factors a message holds and the mix averages: ``"AB"``, ``"A"`` (FedSA), ``"B"``
    (the FA variants) or ``""`` (no mix)."""
    mix: MixFn | None
    pi: Literal["graph", "server", "identity"]
    centralized: bool = False
    refactorizes: bool = False
    """True when mixing re-factorizes (DeCAF): the factors change basis at each mix."""
    mix_many: MixManyFn | None = None
    """Optional batched ``mix``: (owns (n), payloads (n lists of m), weights (n, m), options) ->
    n adapters, each bit-identical to ``mix`` of that agent alone."""
    tracked: bool = False
    """Algorithm 4 (``optim.name: adam_tracked``): each message also carries the sender's
    second-moment tracker, as many floats again as its factors (see ``tracking``)."""
    phases: tuple[str, ...] = ()
    """Rounds that take turns: round k (1-based) trains and sends only the factors
    ``phases[(k - 1) % len(phases)]`` (``alternating``); empty: every round trains ``trains``
    and sends ``travels``."""
    mixed_ranks: bool = False
    """Agents may hold different ranks (its mix is defined across them, or it mixes nothing)."""
    fold: folding.Fold | None = None
    """A server algorithm that changes the base weights (FedEx-LoRA, FLoRA), in place of
    ``mix``: ``agents.AgentGroup`` folds once per round and adds the delta to its task's base."""

    @property
    def communicates(self) -> bool:
        return self.mix is not None or self.fold is not None

    @property
    def train_A(self) -> bool:
        """A takes gradient steps, in some round: the adapter's trainable count is (d + k) r."""
        return "A" in self.trains

    @property
    def keeps_own(self) -> bool:
        """The mix hands an agent back a factor it trains but did not mix (FedSA's B, the
        factor a round of ``alternating`` leaves alone): agents with the same neighbours and
        weights still end with different adapters."""
        return bool(self.phases) or not set(self.trains) <= set(self.travels)

    def trains_in(self, rnd: int) -> str:
        """The factors that take gradient steps in round ``rnd`` (1-based)."""
        return self.phases[(rnd - 1) % len(self.phases)] if self.phases else self.trains

    def travels_in(self, rnd: int | None) -> str:
        """The factors sent in round ``rnd`` (1-based); ``rnd`` may be None without phases."""
        if not self.phases:
            return self.travels
        if rnd is None:
            raise ValueError(f"{self.name} sends a different factor each round: give the round")
        return self.phases[(rnd - 1) % len(self.phases)]

    def mix_agents(self, owns: list[Factors], payloads: list[list[Factors]], weights: Tensor,
                   options: "MixOptions") -> list[Factors]:
        """Mix n agents with m neighbours each: weights (n, m); ``mix_many`` when given."""
        if self.mix_many is not None:
            return self.mix_many(owns, payloads, weights, options)
        return [self.mix(o, p, w, options) for o, p, w in zip(owns, payloads, weights)]

    def payload(self, factors: Factors, rnd: int | None = None) -> Factors:
        """What an agent publishes in round ``rnd``: its factors, with those that do not travel
        as None (A for the FA variants, B for FedSA, the other factor than the round's for
        ``alternating``, which needs ``rnd``)."""
        sent = self.travels_in(rnd)
        if sent == "AB":
            return factors
        return {n: (a if "A" in sent else None, b if "B" in sent else None)  # type: ignore[misc]
                for n, (a, b) in factors.items()}

    def mixing(self, graph_pi: sparse.csr_array) -> sparse.csr_array:
        """The Pi this algorithm uses given the graph's (N, N) CSR Pi, as CSR storing its
        positive entries and diagonal: the identity stores N entries; the server's 1/N
        everywhere stores all N^2, since each agent averages all N (``plan.plan_bytes``)."""
        n = graph_pi.shape[0]
        if self.pi == "server":
            return sparse.csr_array((np.full(n * n, 1.0 / n), np.tile(np.arange(n), n),
                                     np.arange(0, n * n + 1, n)), shape=(n, n))
        if self.pi == "identity":
            return sparse.eye_array(n, format="csr")
        return graph_pi

    def floats_per_message(self, shapes: dict[str, tuple[int, int]], rank: int,
                           rnd: int | None = None) -> float:
        """Floats in one published adapter in round ``rnd``: sum (d + k) r, d r for the FA
        variants, k r for FedSA, the round's factor for ``alternating`` (rnd None: its mean
        message over a cycle of phases); twice that when ``tracked`` (the tracker of each
        factor that travels goes with it)."""
        if not self.communicates:
            return 0
        if self.phases and rnd is None:
            cycle = range(1, len(self.phases) + 1)
            return sum(self.floats_per_message(shapes, rank, k) for k in cycle) / len(cycle)
        sent = self.travels_in(rnd)
        floats = sum((("A" in sent) * k + ("B" in sent) * d) * rank for d, k in shapes.values())
        return floats * (2 if self.tracked else 1)

    def floats_sent_per_round(self, shapes: dict[str, tuple[int, int]], rank: int,
                              degree: int, rnd: int | None = None) -> float:
        """Floats one agent sends in communication round ``rnd`` (None as in
        ``floats_per_message``): one message to each of its ``degree`` graph neighbours, or one
        upload to the server for FedAvg."""
        recipients = 1 if self.pi == "server" else degree
        return self.floats_per_message(shapes, rank, rnd) * recipients

    def floats_broadcast_per_round(self, shapes: dict[str, tuple[int, int]],
                                   rank: int | Sequence[int], rnd: int | None = None) -> float:
        """Floats the server sends per communication round: FedAvg's one broadcast of the
        averaged adapter (one message, as the paper's Table 1 counts it), a fold's own message
        (FedEx-LoRA's A', B' and residual; FLoRA's stack, which needs ``rank`` per agent); 0
        without a server."""
        if self.pi != "server":
            return 0
        if self.fold is None:
            return self.floats_per_message(shapes, rank if isinstance(rank, int) else rank[0], rnd)
        if isinstance(rank, int):
            raise ValueError(f"{self.name}'s broadcast depends on every agent's rank: give them")
        return self.fold.broadcast(shapes, list(rank))

    def network_floats_per_round(self, shapes: dict[str, tuple[int, int]],
                                 rank: int | Sequence[int], degrees: Sequence[int],
                                 rnd: int | None = None) -> float:
        """Floats the whole network sends in communication round ``rnd``, counted as the paper's
        Table 1 does: every agent's messages (``degrees[i]`` neighbours, or one upload) plus
        the server's broadcast, so FedAvg with N agents all taking part (p = 1) sends
        pN + 1 = N + 1 messages. ``floats_sent_per_round_per_agent`` is this over N. ``rank``
        is every agent's, or one per agent (``lora.ranks``: agent i's messages hold its r_i;
        of the server algorithms only FLoRA takes several)."""
        ranks = [rank] * len(degrees) if isinstance(rank, int) else list(rank)
        return (sum(self.floats_sent_per_round(shapes, r, d, rnd) for r, d in zip(ranks, degrees))
                + self.floats_broadcast_per_round(shapes, ranks or [0], rnd))


ALGORITHMS: dict[str, Algorithm] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_FACTORS = re.compile(r"^(A|B|AB)?$")


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm; duplicate or malformed names and factor sets are refused loudly."""
    if not _NAME.match(algorithm.name):
        raise ValueError(f"algorithm name {algorithm.name!r} must be lower_snake_case")
    sets = (algorithm.trains, algorithm.travels, *algorithm.phases)
    sends = bool(algorithm.travels)
    if not all(_FACTORS.match(f) for f in sets) or algorithm.communicates != sends:
        raise ValueError(f"algorithm {algorithm.name!r}: factor sets are 'A', 'B' or 'AB' (got "
                         f"{sets}), and an algorithm sends something exactly when it mixes")
    if algorithm.fold is not None and (algorithm.pi != "server" or algorithm.mix is not None):
        raise ValueError(f"algorithm {algorithm.name!r}: only a server algorithm (pi 'server', "
                         "no mix) may fold into the base weights (see folding)")
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def _by_group(own: Factors, payloads: list[Factors], fn) -> Factors:
    """Apply ``fn(names, As (m, L, r, k) | None, Bs (m, L, d, r) | None) -> (A (L, r, k) | None,
    B | None)`` to each group of equally shaped modules and reassemble the adapter: a factor
    that did not travel reaches ``fn`` as None, and a None from ``fn`` keeps the agent's own."""
    out: Factors = {}
    for names in shape_groups(own).values():
        sent = payloads[0][names[0]]
        As, Bs = (None if sent[f] is None else
                  torch.stack([torch.stack([p[n][f] for n in names]) for p in payloads])
                  for f in (0, 1))
        A, B = fn(names, As, Bs)
        for i, n in enumerate(names):
            out[n] = (own[n][0] if A is None else A[i], own[n][1] if B is None else B[i])
    return out


def mix_dlora(own: Factors, payloads: list[Factors], weights: Tensor, opt: MixOptions) -> Factors:
    """Algorithm 1, lines 6-7: A_i <- sum_j pi_ij A_j, B_i <- sum_j pi_ij B_j."""
    return _by_group(own, payloads, lambda _, As, Bs: consensus.dlora_mix(As, Bs, weights))


def mix_decaf(own: Factors, payloads: list[Factors], weights: Tensor, opt: MixOptions) -> Factors:
    """Algorithm 1, lines 9-10: (B_i, A_i) <- rank-r TSVD of sum_j pi_ij B_j A_j (factored).

    With ``split="aligned"`` the balanced factors are rotated onto the agent's own (``own``);
    ``conserved`` also rescales them to its imbalance ||B||^2 - ||A||^2."""
    return mix_decaf_many([own], [payloads], weights[None], opt)[0]


def mix_decaf_many(owns: list[Factors], payloads: list[list[Factors]], weights: Tensor,
                   opt: MixOptions) -> list[Factors]:
    """``mix_decaf`` of n agents with m neighbours each in one ``decaf_mix`` call per module
    shape: agent a mixes ``payloads[a]`` with ``weights[a]`` (weights (n, m)). Agents of
    different ranks (``lora.ranks``) are batched with those of the same own rank and the same
    neighbours' ranks, and mixed by ``consensus.decaf_mix_ranks`` to their own rank."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for a, (own, sent) in enumerate(zip(owns, payloads)):
        groups.setdefault((rank_of(own), *map(rank_of, sent)), []).append(a)
    out: list[Factors] = [{} for _ in owns]
    for ranks, agents in groups.items():
        mixed = _decaf_group([owns[a] for a in agents], [payloads[a] for a in agents],
                             weights[agents] if len(groups) > 1 else weights, ranks, opt)
        for a, m in zip(agents, mixed):
            out[a] = m
    return out


def _decaf_group(owns: list[Factors], payloads: list[list[Factors]], weights: Tensor,
                 ranks: tuple[int, ...], opt: MixOptions) -> list[Factors]:
    """``mix_decaf_many`` of agents of one own rank ``ranks[0]`` whose neighbours have the
    ranks ``ranks[1:]``: one stacked ``decaf_mix`` when all are equal, else ragged."""
    out: list[Factors] = [{} for _ in owns]
    for names in shape_groups(owns[0]).values():
        if len(set(ranks)) == 1:
            per_agent = [stack(p, names) for p in payloads]      # n x ((m, L, r, k), (m, L, d, r))
            As = torch.stack([a for a, _ in per_agent], dim=1)   # (m, n, L, r, k)
            Bs = torch.stack([b for _, b in per_agent], dim=1)   # (m, n, L, d, r)
            A, B = consensus.decaf_mix(As, Bs, weights.T, split=opt.split)
        else:  # neighbour j: (n, L, r_j, k), (n, L, d, r_j)
            per_nbr = [stack([p[j] for p in payloads], names) for j in range(len(ranks) - 1)]
            A, B = consensus.decaf_mix_ranks([a for a, _ in per_nbr], [b for _, b in per_nbr],
                                             weights.T, ranks[0], split=opt.split)
        if opt.per_agent:  # aligned or conserved: fitted to each agent's own factors
            ref = stack(owns, names)
            A, B = alignment.align(A, B, *ref)
            if opt.split == "conserved":
                A, B = alignment.conserve_imbalance(A, B, *ref)
        for a, mixed in enumerate(out):
            for i, n in enumerate(names):
                mixed[n] = (A[a, i], B[a, i])
    return out


def mix_hetlora(own: Factors, payloads: list[Factors], weights: Tensor, opt: MixOptions
                ) -> Factors:
    """HetLoRA (``consensus.hetlora_mix``): the neighbours' factors zero-padded to the largest
    rank, averaged with weights pi_ij ||B_j A_j||_F (normalised), truncated to the agent's own
    rank. Payloads may have any ranks; all modules of one agent share its rank."""
    out: Factors = {}
    for names in shape_groups(own).values():
        per_nbr = [stack([p], names) for p in payloads]          # m x ((1, L, r_j, k), ...)
        A, B = consensus.hetlora_mix([a[0] for a, _ in per_nbr], [b[0] for _, b in per_nbr],
                                     weights, rank_of(own))
        for i, n in enumerate(names):
            out[n] = (A[i], B[i])
    return out


def mix_factors(own: Factors, payloads: list[Factors], weights: Tensor, opt: MixOptions
                ) -> Factors:
    """Each factor that travels on its own, X_i <- sum_j pi_ij X_j; the others stay the
    agent's: the FA variants' B (Algorithm 2, line 6; A stays the shared frozen A_0),
    FedSA-LoRA's A (B local), or the factor of a round of ``alternating``."""
    def mix(_, As, Bs):
        return tuple(None if Xs is None else consensus.factor_mix(Xs, weights) for Xs in (As, Bs))

    return _by_group(own, payloads, mix)


def diagnostics(own: Factors, payloads: list[Factors], weights: Tensor, mixed: Factors
                ) -> dict[str, float]:
    """Consensus diagnostics of one agent's mix, as Frobenius norms over all its modules.

    ``interference``: ||sum pi B_j A_j - (sum pi B_j)(sum pi A_j)||_F (Definition 1, Theorem 2);
    ``tsvd_error``: ||sum pi B_j A_j - B_i A_i||_F of the mixed factors (Proposition 1), and
    ``prop1_bound``: its bound sqrt((|Nb(i)| - 1) r) c^2. Empty unless both factors travel.
    Neighbours of different ranks r_j enter zero-padded to the largest (``factors.padded``:
    the products, hence the TSVD error, are unchanged; interference is then that of the padded
    factors' averages), and the bound is sqrt(sum_j r_j - r_i) c^2 for the agent's own r_i.
    """
    if None in payloads[0][next(iter(own))]:
        return {}
    ranks = [rank_of(p) for p in payloads]
    sent = padded(payloads)  # the same list when the ranks are equal
    sq = {"interference": 0.0, "tsvd_error": 0.0, "prop1_bound": 0.0}
    for names in shape_groups(own).values():
        As, Bs = stack(sent, names)
        A, B = stack([mixed], names)
        # equal ranks r: sqrt(m r - r) c^2, the paper's sqrt((m - 1) r) c^2
        bound = consensus.prop1_bound(As, Bs, weights, rank_of(own), ranks)
        sq["interference"] += float((consensus.interference(As, Bs, weights) ** 2).sum())
        sq["tsvd_error"] += float((consensus.tsvd_error(As, Bs, weights, A[0], B[0]) ** 2).sum())
        sq["prop1_bound"] += float((bound ** 2).sum())
    return {k: v ** 0.5 for k, v in sq.items()}


register(Algorithm("decaf", "AB", "AB", mix_decaf, "graph", refactorizes=True,
                   mix_many=mix_decaf_many, mixed_ranks=True))
register(Algorithm("dlora", "AB", "AB", mix_dlora, "graph"))
register(Algorithm("dlora_fa", "B", "B", mix_factors, "graph"))
register(Algorithm("fedsa", "AB", "A", mix_factors, "graph"))
register(Algorithm("alternating", "AB", "AB", mix_factors, "graph", phases=("B", "A")))
register(Algorithm("hetlora", "AB", "AB", mix_hetlora, "graph", mixed_ranks=True))
register(Algorithm("fedavg", "AB", "AB", mix_dlora, "server"))
register(Algorithm("fedavg_fa", "B", "B", mix_factors, "server"))
register(Algorithm("fedex", "AB", "AB", None, "server", fold=folding.FEDEX))
register(Algorithm("flora", "AB", "AB", None, "server", fold=folding.FLORA, mixed_ranks=True))
register(Algorithm("local", "AB", "", None, "identity", mixed_ranks=True))
register(Algorithm("local_fa", "B", "", None, "identity", mixed_ranks=True))
register(Algorithm("centralized", "AB", "", None, "identity", centralized=True))
