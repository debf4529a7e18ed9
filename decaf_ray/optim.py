"""Per-agent optimizers as pure functions, in optax's spirit: ``init`` and ``update``, all state
returned, never hidden.

``update(grads, state, params, t) -> (updates, state)`` gives the step that Algorithm 1 adds to
the *mixed* point: w_{t+1} = w_{t+1/2} + updates, where the gradient was taken at w_t. This is
what makes one optimizer serve every algorithm: the runtime mixes, the optimizer steps.

- ``sgd``: updates = -lr g (Algorithm 1, lines 15-16).
- ``momentum``: V <- beta V - lr g; updates = V (Algorithm 3, heavy ball).
- ``adam`` / ``adamw``: local Adam: bias-corrected moments kept by each agent and never mixed
  (not the paper's Algorithm 4); ``adam`` adds weight decay to the gradient, ``adamw`` decays
  the mixed point directly (decoupled, Loshchilov & Hutter).
- ``adam_tracked``: the paper's Algorithm 4 (DLoRA-Adam / DeCAF-Adam): a second-moment
  tracker that travels with the factors and is mixed like them (``adam_tracked``'s docstring).

Gradients of frozen factors (A in the FA variants, the factor a round of ``alternating``
leaves alone) are None and give a zero update; the frozen factor's state is kept as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from decaf_ray.alignment import procrustes, stacked
from decaf_ray.factors import Factors, Grads

State = dict[str, Any]


@dataclass(frozen=True)
class Optimizer:
    """A pair of pure functions (see the module docstring)."""

    init: Callable[[Factors], State]
    update: Callable[[Grads, State, Factors, int], tuple[Grads, State]]
    tracker: str | None = None
    """The state key of a tree shaped like the factors that travels with them and is mixed as
    they are before each communicating step (``adam_tracked``'s U-hat); None: all state local."""


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
    return {n: tuple(None if g is None else fn(g, *(t[n][f] for t in trees))
                     for f, g in enumerate(pair)) for n, pair in grads.items()}


def _zeros(params: Factors) -> Grads:
    return {n: (torch.zeros_like(a), torch.zeros_like(b)) for n, (a, b) in params.items()}


def _keep(new: Grads, old: Grads) -> Grads:
    """``new`` with the frozen factors' entries (None) taken from ``old``."""
    return {n: tuple(o if x is None else x for x, o in zip(new[n], old[n])) for n in new}


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
        return v, {"velocity": _keep(v, state["velocity"])}

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

        updates = {n: tuple(None if m[n][f] is None else delta(m[n][f], v[n][f], params[n][f])
                            for f in (0, 1)) for n in m}
        return updates, {"m": _keep(m, state["m"]), "v": _keep(v, state["v"]), "count": count}

    return Optimizer(lambda p: {"m": _zeros(p), "v": _zeros(p), "count": 0}, update)


def adam_tracked(cfg, total_steps: int) -> Optimizer:
    """The paper's Algorithm 4 (DLoRA-Adam / DeCAF-Adam), one agent's side of it.

    State: ``m`` = M_{t-1}, ``sq`` = V_{t-1}, ``tracker`` = U-hat_t, and for ``h: amsgrad``
    ``avg``, the moving average whose running max V is. The agent publishes its tracker with its
    factors; ``AgentGroup`` puts the mixed tracker U-hat_{t+1/2} in ``tracker`` before a
    communicating step (DLoRA: averaged like A and B, lines 12-13; DeCAF: the product
    U-hat^B U-hat^A mixed and re-factorized by the factors' TSVD and split, lines 17-18), and
    leaves it as it is otherwise (lines 20-23). The step at t, for each factor X:

        M_t = b1 M_{t-1} + (1 - b1) g_t                                (lines 4-5)
        V_t = b2 V_{t-1} + (1 - b2) g_t^2                    (h: adam, lines 6-7)
            = max(V_{t-1}, avg_t), avg_t = b2 avg_{t-1} + (1 - b2) g_t^2   (h: amsgrad)
        U-hat_{t+1} = U-hat_{t+1/2} - V_{t-1} + V_t                    (lines 29-30)
        X_{t+1} = X_{t+1/2} - lr M_t / sqrt(max(U-hat_{t+1}, eps))     (lines 24-27)

    No bias correction; eps floors the tracker instead of being added to its root. The paper's
    indices are ambiguous (its U-hat_1 = V_1 with V_0 = 0 counts V_1 twice, and line 24 floors
    U-hat_t, the tracker before this step's mix). decaf-ray's reading: U-hat_1 = V_0 = 0, and the
    step at t divides by the tracker after mixing and tracking, so that without communication
    U-hat_{t+1} = V_t exactly (Adam or AMSGrad without bias correction), and the tracker always
    averages to the network's mean V_t when Pi is doubly stochastic (DLoRA). Weight decay, if
    any, is added to the gradient, as in ``adam``.
    """
    lr = schedule(cfg, total_steps)
    b1, b2 = cfg.betas
    amsgrad = cfg.h == "amsgrad"

    def update(grads, state, params, t):
        step = lr(t)
        if cfg.weight_decay:
            grads = _map(lambda g, p: g + cfg.weight_decay * p, grads, params)
        m = _map(lambda g, m: b1 * m + (1 - b1) * g, grads, state["m"])
        new = {"m": m}
        if amsgrad:
            new["avg"] = _map(lambda g, a: b2 * a + (1 - b2) * g * g, grads, state["avg"])
            new["sq"] = _map(lambda a, v: torch.maximum(v, a), new["avg"], state["sq"])
        else:
            new["sq"] = _map(lambda g, v: b2 * v + (1 - b2) * g * g, grads, state["sq"])
        new["tracker"] = _map(lambda v, u, v_old: u - v_old + v, new["sq"], state["tracker"],
                              state["sq"])
        updates = _map(lambda m_, u: -step * m_ / u.clamp_min(cfg.eps).sqrt(), m,
                       new["tracker"])
        # frozen factors (update None) keep their state
        return updates, {**state, **{k: _keep(tree, state[k]) for k, tree in new.items()}}

    def init(params):
        keys = ("m", "sq", "tracker") + (("avg",) if amsgrad else ())
        return {k: _zeros(params) for k in keys}

    return Optimizer(init, update, tracker="tracker")


def build_optimizer(cfg, total_steps: int) -> Optimizer:
    """The optimizer named by ``cfg.name`` (an ``OptimConfig``)."""
    if cfg.name == "sgd":
        return sgd(cfg, total_steps)
    if cfg.name == "momentum":
        return momentum(cfg, total_steps)
    if cfg.name == "adam_tracked":
        return adam_tracked(cfg, total_steps)
    return adam(cfg, total_steps, decoupled=cfg.name == "adamw")


def apply_updates(params: Factors, updates: Grads) -> Factors:
    """w + updates, leaving frozen factors (update None) as they are; never in place."""
    return {n: tuple(x if u is None else x + u for x, u in zip(params[n], updates[n]))
            for n in params}



MOMENTS = {"m": False, "velocity": False, "v": True}
"""The state a re-factorization moves (``refactor_state``), True for second moments: first
moments of every optimizer, and local Adam's second moment. ``adam_tracked``'s second moments
(``sq``, ``avg``) and its tracker are not moved: V_t is the paper's h_t of the gradient history,
and the tracker is replaced by its mix, re-factorized with the factors."""


def refactor_state(state: State, old: Factors, new: Factors, policy: str) -> State:
    """Optimizer state after a re-factorization moved the factors from ``old`` to ``new``.

    ``keep``: unchanged. ``reset``: the ``MOMENTS`` zero and Adam's step count 0. ``rotate``:
    with R = procrustes([B; A^T]_old, [B; A^T]_new) per module (the orthogonal map that best
    carries the old basis onto the new), first moments move like the factors (m_B R, R^T m_A)
    and second moments with R squared entrywise ((R*R) keeps them non-negative, and is exact
    when R permutes or flips directions). Other state is left as it is.
    """
    if policy == "keep" or not state:
        return state
    out = dict(state)
    if policy == "reset":
        for key in MOMENTS.keys() & state.keys():
            out[key] = {n: (None if a is None else torch.zeros_like(a), torch.zeros_like(b))
                        for n, (a, b) in state[key].items()}
        return {**out, **({"count": 0} if "count" in state else {})}
    R = {n: procrustes(stacked(*old[n]), stacked(*new[n])) for n in old}
    for key in MOMENTS.keys() & state.keys():
        sq = MOMENTS[key]
        out[key] = {n: (None if a is None else (R[n] * R[n] if sq else R[n]).mT @ a,
                        b @ (R[n] * R[n] if sq else R[n])) for n, (a, b) in state[key].items()}
    return out
