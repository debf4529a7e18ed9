"""The algorithms of the paper, one registry entry each: what is trained, what travels, how it
is mixed, and which mixing matrix is used.

| name        | trains | travels | mix                          | Pi                 |
|-------------|--------|---------|------------------------------|--------------------|
| decaf       | A, B   | A, B    | TSVD of sum pi_ij B_j A_j    | the graph's        |
| dlora       | A, B   | A, B    | sum pi_ij A_j, sum pi_ij B_j | the graph's        |
| dlora_fa    | B      | B       | sum pi_ij B_j                | the graph's        |
| fedavg      | A, B   | A, B    | as dlora                     | (1/N) 1 1^T        |
| fedavg_fa   | B      | B       | as dlora_fa                  | (1/N) 1 1^T        |
| local       | A, B   | nothing | none                         | I                  |
| local_fa    | B      | nothing | none                         | I                  |
| centralized | A, B   | nothing | none                         | one agent, all data|

A mix function is pure: ``mix(own, payloads, weights, options) -> Factors``, where ``payloads``
are the neighbours' published adapters (self included) in the order of ``weights``. Modules of
equal shape are mixed in one batched call. An algorithm may also give ``mix_many``, the same mix
for n agents with equally many neighbours at once (DeCAF does: its per-agent QRs and SVDs are
small, so one batched call saves their fixed cost n times over). Adding an algorithm is one
``register`` call here.

With ``optim.name: adam_tracked`` (the paper's Algorithm 4) DLoRA, DLoRA-FA and DeCAF also send
each agent's second-moment tracker in the same message (``with_tracker``), mixed by the same mix
as the factors (``agents.AgentGroup.mix_and_apply``) and counted in the floats (``tracking``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from decaf_ray import consensus
from decaf_ray.factors import Factors, param_count, shape_groups, stack

MixFn = Callable[[Factors, list[Factors], Tensor, "MixOptions"], Factors]
MixManyFn = Callable[[list[Factors], list[list[Factors]], Tensor, "MixOptions"], list[Factors]]


@dataclass(frozen=True)
class MixOptions:
    """Options a mix may read: the TSVD split of DeCAF and what happens to optimizer state when
    the factors are re-factorized (``keep``, ``rotate``, ``reset``)."""

    split: str = "balanced"
    state: str = "keep"

    @property
    def per_agent(self) -> bool:
        """The mix reads the agent's own factors, so agents cannot share one result."""
        return self.split in ("aligned", "conserved")


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of the paper (see the module table)."""

    name: str
    train_A: bool
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

    @property
    def communicates(self) -> bool:
        return self.mix is not None

    def mix_agents(self, owns: list[Factors], payloads: list[list[Factors]], weights: Tensor,
                   options: "MixOptions") -> list[Factors]:
        """Mix n agents with m neighbours each: weights (n, m); ``mix_many`` when given."""
        if self.mix_many is not None:
            return self.mix_many(owns, payloads, weights, options)
        return [self.mix(o, p, w, options) for o, p, w in zip(owns, payloads, weights)]

    def payload(self, factors: Factors) -> Factors:
        """What an agent publishes: its factors, or only B (A as None) for the FA variants."""
        if self.train_A:
            return factors
        return {n: (None, b) for n, (_, b) in factors.items()}  # type: ignore[misc]

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

    def floats_per_message(self, shapes: dict[str, tuple[int, int]], rank: int) -> int:
        """Floats in one published adapter: sum (d + k) r, or d r for the FA variants; twice
        that when ``tracked`` (the tracker of each factor that travels goes with it)."""
        if not self.communicates:
            return 0
        return param_count(shapes, rank, self.train_A) * (2 if self.tracked else 1)

    def floats_sent_per_round(self, shapes: dict[str, tuple[int, int]], rank: int,
                              degree: int) -> int:
        """Floats one agent sends per communication round: one message to each of its
        ``degree`` graph neighbours, or one upload to the server for FedAvg."""
        recipients = 1 if self.pi == "server" else degree
        return self.floats_per_message(shapes, rank) * recipients

    def floats_broadcast_per_round(self, shapes: dict[str, tuple[int, int]], rank: int) -> int:
        """Floats the server sends per communication round: FedAvg's one broadcast of the
        averaged adapter (one message, as the paper's Table 1 counts it); 0 without a server."""
        return self.floats_per_message(shapes, rank) if self.pi == "server" else 0

    def network_floats_per_round(self, shapes: dict[str, tuple[int, int]], rank: int,
                                 degrees: Sequence[int]) -> int:
        """Floats the whole network sends per communication round, counted as the paper's
        Table 1 does: every agent's messages (``degrees[i]`` neighbours, or one upload) plus
        the server's broadcast, so FedAvg with N agents all taking part (p = 1) sends
        pN + 1 = N + 1 messages. ``floats_sent_per_round_per_agent`` is this over N."""
        return (sum(self.floats_sent_per_round(shapes, rank, d) for d in degrees)
                + self.floats_broadcast_per_round(shapes, rank))


TRACKER = "tracker:"
"""Prefix of the tracker's entries in a tracked payload (no module name holds a colon)."""


def tracking(algorithm: Algorithm) -> Algorithm:
    """``algorithm`` as Algorithm 4 runs it: its messages carry the tracker too (``tracked``).

    Algorithm 4 covers the gossip algorithms (DLoRA, DLoRA-FA, DeCAF); ValueError for the
    others (FedAvg, Local, Centralized), where the paper defines no mixed tracker."""
    if algorithm.pi != "graph":
        raise ValueError(f"adam_tracked (Algorithm 4) mixes a second-moment tracker over the "
                         f"graph; {algorithm.name} does not gossip (use it with decaf, dlora or "
                         f"dlora_fa, or use adam)")
    return replace(algorithm, tracked=True)


def with_tracker(payload: Factors, tracker: Factors) -> Factors:
    """One message holding a payload and the tracker's payload (its entries prefixed); a mix
    reads only the module names of the agent's own factors, so it never sees the tracker."""
    return {**payload, **{TRACKER + n: pair for n, pair in tracker.items()}}


def tracker_of(payload: Factors) -> Factors:
    """The tracker's payload in a message built by ``with_tracker``."""
    k = len(TRACKER)
    return {n[k:]: pair for n, pair in payload.items() if n.startswith(TRACKER)}


ALGORITHMS: dict[str, Algorithm] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm; duplicate or malformed names are refused loudly."""
    if not _NAME.match(algorithm.name):
        raise ValueError(f"algorithm name {algorithm.name!r} must be lower_snake_case")
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def _by_group(own: Factors, payloads: list[Factors], fn) -> Factors:
    """Apply ``fn(names, As (m, L, r, k) | None, Bs (m, L, d, r)) -> (A (L, ., k) | None, B)``
    to each group of equally shaped modules and reassemble the adapter."""
    out: Factors = {}
    for names in shape_groups(own).values():
        Bs = torch.stack([torch.stack([p[n][1] for n in names]) for p in payloads])
        As = None if payloads[0][names[0]][0] is None else stack(payloads, names)[0]
        A, B = fn(names, As, Bs)
        for i, n in enumerate(names):
            out[n] = (own[n][0] if A is None else A[i], B[i])
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
    shape: agent a mixes ``payloads[a]`` with ``weights[a]`` (weights (n, m))."""
    out: list[Factors] = [{} for _ in owns]
    for names in shape_groups(owns[0]).values():
        per_agent = [stack(p, names) for p in payloads]          # n x ((m, L, r, k), (m, L, d, r))
        As = torch.stack([a for a, _ in per_agent], dim=1)       # (m, n, L, r, k)
        Bs = torch.stack([b for _, b in per_agent], dim=1)       # (m, n, L, d, r)
        A, B = consensus.decaf_mix(As, Bs, weights.T, split=opt.split)
        if opt.per_agent:  # aligned or conserved: fitted to each agent's own factors
            ref = stack(owns, names)
            A, B = consensus.align(A, B, *ref)
            if opt.split == "conserved":
                A, B = consensus.conserve_imbalance(A, B, *ref)
        for a, mixed in enumerate(out):
            for i, n in enumerate(names):
                mixed[n] = (A[a, i], B[a, i])
    return out


def mix_fa(own: Factors, payloads: list[Factors], weights: Tensor, opt: MixOptions) -> Factors:
    """Algorithm 2, line 6: B_i <- sum_j pi_ij B_j; A stays the shared frozen A_0."""
    return _by_group(own, payloads, lambda _, As, Bs: (None, consensus.fa_mix(Bs, weights)))


def diagnostics(own: Factors, payloads: list[Factors], weights: Tensor, mixed: Factors
                ) -> dict[str, float]:
    """Consensus diagnostics of one agent's mix, as Frobenius norms over all its modules.

    ``interference``: ||sum pi B_j A_j - (sum pi B_j)(sum pi A_j)||_F (Definition 1, Theorem 2);
    ``tsvd_error``: ||sum pi B_j A_j - B_i A_i||_F of the mixed factors (Proposition 1), and
    ``prop1_bound``: its bound sqrt((|Nb(i)| - 1) r) c^2. Empty when A does not travel.
    """
    if payloads[0][next(iter(own))][0] is None:
        return {}
    sq = {"interference": 0.0, "tsvd_error": 0.0, "prop1_bound": 0.0}
    for names in shape_groups(own).values():
        As, Bs = stack(payloads, names)
        A, B = stack([mixed], names)
        sq["interference"] += float((consensus.interference(As, Bs, weights) ** 2).sum())
        sq["tsvd_error"] += float((consensus.tsvd_error(As, Bs, weights, A[0], B[0]) ** 2).sum())
        sq["prop1_bound"] += float((consensus.prop1_bound(As, Bs, weights) ** 2).sum())
    return {k: v ** 0.5 for k, v in sq.items()}


register(Algorithm("decaf", True, mix_decaf, "graph", refactorizes=True, mix_many=mix_decaf_many))
register(Algorithm("dlora", True, mix_dlora, "graph"))
register(Algorithm("dlora_fa", False, mix_fa, "graph"))
register(Algorithm("fedavg", True, mix_dlora, "server"))
register(Algorithm("fedavg_fa", False, mix_fa, "server"))
register(Algorithm("local", True, None, "identity"))
register(Algorithm("local_fa", False, None, "identity"))
register(Algorithm("centralized", True, None, "identity", centralized=True))
