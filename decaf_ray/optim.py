"""Per-agent optimizers as pure functions, in optax's spirit: ``init`` and ``update``, all state
returned, never hidden.

``update(grads, state, params, t) -> (updates, state)`` gives the step that Algorithm 1 adds to
the *mixed* point: w_{t+1} = w_{t+1/2} + updates, where the gradient was taken at w_t. This is
what makes one optimizer serve every algorithm: the runtime mixes, the optimizer steps.

- ``sgd``: updates = -lr g (Algorithm 1, lines 15-16).
- ``momentum``: V <- beta V - lr g; updates = V (Algorithm 3, heavy ball).
- ``adam`` / ``adamw``: bias-corrected Adam moments kept per agent (Algorithm 4 with
  h_t the exponential average of g^2); ``adam`` adds weight decay to the gradient, ``adamw``
  decays the mixed point directly (decoupled, Loshchilov & Hutter).

Gradients of frozen factors (A in the FA variants) are None and give a zero update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from decaf_ray.consensus import procrustes, stacked
from decaf_ray.factors import Factors, Grads

State = dict[str, Any]


@dataclass(frozen=True)
class Optimizer:
    """A pair of pure functions (see the module docstring)."""

    init: Callable[[Factors], State]
    update: Callable[[Grads, State, Factors, int], tuple[Grads, State]]


def schedule(cfg, total_steps: int) -> Callable[[int], float]:
    """Step size at step t (1-based): constant or cosine from ``lr`` to ``min_lr``, with linear
    warm-up over ``warmup_steps``."""

    def lr(t: int) -> float:
        if t <= cfg.warmup_steps:
            return cfg.lr * t / max(cfg.warmup_steps, 1)
        if cfg.schedule == "constant":
            return cfg.lr
        span = max(total_steps - cfg.warmup_steps, 1)
        frac = min((t - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * frac))

    return lr


def _map(fn, grads: Grads, *trees) -> Grads:
    """Apply ``fn(g, *leaves)`` to every trained factor; frozen ones (g None) stay None."""
    out = {}
    for n, (ga, gb) in grads.items():
        a = None if ga is None else fn(ga, *(t[n][0] for t in trees))
        out[n] = (a, fn(gb, *(t[n][1] for t in trees)))
    return out


def _zeros(params: Factors) -> Grads:
    return {n: (torch.zeros_like(a), torch.zeros_like(b)) for n, (a, b) in params.items()}


def sgd(cfg, total_steps: int) -> Optimizer:
    lr = schedule(cfg, total_steps)

    def update(grads, state, params, t):
        step = lr(t)
        if cfg.weight_decay:
            grads = _map(lambda g, p: g + cfg.weight_decay * p, grads, params)
        return _map(lambda g: -step * g, grads), state

    return Optimizer(lambda params: {}, update)


def momentum(cfg, total_steps: int) -> Optimizer:
    lr = schedule(cfg, total_steps)

    def update(grads, state, params, t):
        step = lr(t)
        if cfg.weight_decay:
            grads = _map(lambda g, p: g + cfg.weight_decay * p, grads, params)
        v = _map(lambda g, v: cfg.momentum * v - step * g, grads, state["velocity"])
        return v, {"velocity": {n: (state["velocity"][n][0] if v[n][0] is None else v[n][0],
                                    v[n][1]) for n in v}}

    return Optimizer(lambda params: {"velocity": _zeros(params)}, update)


def adam(cfg, total_steps: int, decoupled: bool = False) -> Optimizer:
    lr = schedule(cfg, total_steps)
    b1, b2 = cfg.betas

    def update(grads, state, params, t):
        step, count = lr(t), state["count"] + 1
        if cfg.weight_decay and not decoupled:
            grads = _map(lambda g, p: g + cfg.weight_decay * p, grads, params)
        m = _map(lambda g, m: b1 * m + (1 - b1) * g, grads, state["m"])
        v = _map(lambda g, v: b2 * v + (1 - b2) * g * g, grads, state["v"])
        c1, c2 = 1 - b1 ** count, 1 - b2 ** count

        def delta(m_, v_, p):
            d = -step * (m_ / c1) / ((v_ / c2).sqrt() + cfg.eps)
            return d - step * cfg.weight_decay * p if decoupled else d

        updates = {n: (None if m[n][0] is None else delta(m[n][0], v[n][0], params[n][0]),
                       delta(m[n][1], v[n][1], params[n][1])) for n in m}
        keep = lambda new, old: {n: (old[n][0] if new[n][0] is None else new[n][0], new[n][1])
                                 for n in new}
        return updates, {"m": keep(m, state["m"]), "v": keep(v, state["v"]), "count": count}

    return Optimizer(lambda p: {"m": _zeros(p), "v": _zeros(p), "count": 0}, update)


def build_optimizer(cfg, total_steps: int) -> Optimizer:
    """The optimizer named by ``cfg.name`` (an ``OptimConfig``)."""
    if cfg.name == "sgd":
        return sgd(cfg, total_steps)
    if cfg.name == "momentum":
        return momentum(cfg, total_steps)
    return adam(cfg, total_steps, decoupled=cfg.name == "adamw")


def apply_updates(params: Factors, updates: Grads) -> Factors:
    """w + updates, leaving frozen factors (update None) as they are; never in place."""
    return {n: (a if updates[n][0] is None else a + updates[n][0], b + updates[n][1])
            for n, (a, b) in params.items()}



def refactor_state(state: State, old: Factors, new: Factors, policy: str) -> State:
    """Optimizer state after a re-factorization moved the factors from ``old`` to ``new``.

    ``keep``: unchanged. ``reset``: every moment zero and Adam's step count 0. ``rotate``: with
    R = procrustes([B; A^T]_old, [B; A^T]_new) per module (the orthogonal map that best carries
    the old basis onto the new), first moments move like the factors (m_B R, R^T m_A) and
    second moments with R squared entrywise ((R*R) keeps them non-negative, and is exact when R
    permutes or flips directions).
    """
    if policy == "keep" or not state:
        return state
    if policy == "reset":
        out = {k: {n: (None if a is None else torch.zeros_like(a), torch.zeros_like(b))
                   for n, (a, b) in v.items()} for k, v in state.items() if isinstance(v, dict)}
        return {**out, **({"count": 0} if "count" in state else {})}
    R = {n: procrustes(stacked(*old[n]), stacked(*new[n])) for n in old}
    out = dict(state)
    for key, tree in state.items():
        if not isinstance(tree, dict):
            continue
        sq = key == "v"  # Adam's second moment; "m" and "velocity" are first moments
        out[key] = {n: (None if a is None else (R[n] * R[n] if sq else R[n]).mT @ a,
                        b @ (R[n] * R[n] if sq else R[n])) for n, (a, b) in tree.items()}
    return out
