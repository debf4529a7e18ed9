"""Algorithm 4's messages (``optim.name: adam_tracked``): an algorithm whose messages carry each
agent's second-moment tracker beside its factors, mixed by the same mix, and how a message holds
both. Pure: no Ray.
"""

from __future__ import annotations

from dataclasses import replace

from decaf_ray.algorithms import Algorithm, mix_decaf, mix_dlora, mix_factors
from decaf_ray.factors import Factors

TRACKER = "tracker:"
"""Prefix of the tracker's entries in a tracked payload (no module name holds a colon)."""


def tracking(algorithm: Algorithm) -> Algorithm:
    """``algorithm`` as Algorithm 4 runs it: its messages carry the tracker too (``tracked``).

    Algorithm 4 covers the gossip algorithms whose every message carries every trained factor
    (DLoRA, DLoRA-FA, DeCAF); ValueError for the others (FedAvg, Local, Centralized, FedSA and
    alternating, which keep a trained factor out of a message, and HetLoRA, whose norm weights
    would weigh trackers by their own products), where the paper defines no mixed tracker."""
    if (algorithm.pi != "graph" or algorithm.keeps_own
            or algorithm.mix not in (mix_decaf, mix_dlora, mix_factors)):
        raise ValueError(f"adam_tracked (Algorithm 4) mixes a second-moment tracker over the "
                         f"graph as DLoRA, DLoRA-FA and DeCAF mix factors; {algorithm.name} does "
                         f"not gossip every factor it trains by one of those mixes (use it with "
                         f"decaf, dlora or dlora_fa, or use adam)")
    return replace(algorithm, tracked=True)


def with_tracker(payload: Factors, tracker: Factors) -> Factors:
    """One message holding a payload and the tracker's payload (its entries prefixed); a mix
    reads only the module names of the agent's own factors, so it never sees the tracker."""
    return {**payload, **{TRACKER + n: pair for n, pair in tracker.items()}}


def tracker_of(payload: Factors) -> Factors:
    """The tracker's payload in a message built by ``with_tracker``."""
    k = len(TRACKER)
    return {n[k:]: pair for n, pair in payload.items() if n.startswith(TRACKER)}
