"""Split a labelled data set over agents: the IID and non-IID schemes of the DeCAF experiments.

Every function takes ``labels`` of shape (n,), int class labels in 0..C-1 with C = max + 1 (a
missing class counts as one with no examples), and returns indices into it: np.int64 arrays,
each sorted ascending, pairwise disjoint. All
randomness comes from ``np.random.default_rng(seed)`` (never global state), so the same
arguments always give the same split. Requests that cannot be met raise ``ValueError``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np

_MAX_DIRICHLET_TRIES = 1000


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Validated labels as an int64 array of shape (n,)."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"labels must be a non-empty 1-D integer array, got shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.min() < 0:
        raise ValueError(f"labels must be >= 0 (classes 0..C-1), got min {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        valid = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be an int {valid}, got {value!r}")


def _check_agents(n_agents: int, n: int) -> None:
    _check_int("n_agents", n_agents, 1)
    if n_agents > n:
        raise ValueError(f"n_agents={n_agents} > {n} examples: some agent would be empty")


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    """C arrays: the ascending indices of each class 0..C-1 (empty for an absent class)."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    return np.split(order, np.cumsum(counts)[:-1])


def _finish(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate each agent's pieces into one sorted int64 array."""
    empty = np.empty(0, dtype=np.int64)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else empty for p in parts]


def few_shot(labels: np.ndarray, shots: int | None, seed: int) -> np.ndarray:
    """``shots`` examples of every class, sampled without replacement.

    Class c takes a permutation prefix from its own ``default_rng([seed, c])``, so for one seed
    the k-shot set is inside the (k+1)-shot set and no class's choice depends on the others.

    Args:
        shots: examples per class; ``None`` keeps all n.
    Returns:
        (C * shots,) sorted int64 indices, or (n,) when ``shots`` is None.
    """
    labels = _check_labels(labels)
    if shots is None:
        return np.arange(len(labels), dtype=np.int64)
    _check_int("shots", shots, 1)
    counts = np.bincount(labels)
    if counts.min() < shots:
        c = int(np.argmin(counts >= shots))  # first class that is too small
        raise ValueError(
            f"class {c} has only {counts[c]} examples, fewer than shots={shots}; "
            f"use shots <= {counts.min()} (the smallest class count)"
        )
    picked = []
    for c, idx in enumerate(_by_class(labels)):
        rng = np.random.default_rng([seed, c])
        picked.append(idx[rng.permutation(len(idx))[:shots]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def iid(labels: np.ndarray, n_agents: int, seed: int) -> list[np.ndarray]:
    """The paper's IID split: each class shuffled and spread evenly (stratified) over the agents.

    np.array_split gives the first r pieces one extra example; rotating the start agent by the
    running total of remainders hands those extras out round-robin across classes, so agent
    sizes differ by at most one overall (and per class by at most one).

    Args:
        n_agents: N, at most n.
    Returns:
        N sorted int64 index arrays, together covering all n examples.
    """
    labels = _check_labels(labels)
    _check_agents(n_agents, len(labels))
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
    offset = 0
    for idx in _by_class(labels):
        for j, piece in enumerate(np.array_split(rng.permutation(idx), n_agents)):
            parts[(offset + j) % n_agents].append(piece)
        offset = (offset + len(idx) % n_agents) % n_agents
    return _finish(parts)


def classes_per_agent(
    labels: np.ndarray, n_agents: int, classes_per_agent: int = 1, *, seed: int
) -> list[np.ndarray]:
    """The paper's non-IID split: agent i holds classes {(i*k + j) mod C : j < k}.

    Each class's examples are shuffled and split evenly among the agents that hold it. With
    N = C = 10 and k = 1 agent i gets all of class i (paper, Table 2 non-IID).

    Args:
        n_agents: N.
        classes_per_agent: k, 1 <= k <= C, with k * N >= C so that every class has a holder.
    Returns:
        N sorted int64 index arrays, together covering all n examples.
    """
    labels = _check_labels(labels)
    _check_agents(n_agents, len(labels))
    by_class = _by_class(labels)
    n_cls, k = len(by_class), classes_per_agent
    _check_int("classes_per_agent", k, 1, n_cls)
    if k * n_agents < n_cls:
        raise ValueError(
            f"classes_per_agent * n_agents = {k * n_agents} < {n_cls} classes, so some class "
            f"would be held by no agent; classes_per_agent * agents must be >= number of "
            f"classes: use classes_per_agent >= {-(-n_cls // n_agents)}"
        )
    holders: list[list[int]] = [[] for _ in range(n_cls)]
    for i in range(n_agents):
        for j in range(k):
            holders[(i * k + j) % n_cls].append(i)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
    for c, idx in enumerate(by_class):
        pieces = np.array_split(rng.permutation(idx), len(holders[c]))
        # Rotate by the class id so one agent does not collect every class's remainder.
        for j, piece in enumerate(pieces):
            parts[holders[c][(j + c) % len(holders[c])]].append(piece)
    out = _finish(parts)
    empty = [i for i, p in enumerate(out) if len(p) == 0]
    if empty:
        raise ValueError(
            f"agent {empty[0]} would get no example: its classes have fewer examples than the "
            f"agents sharing them; use fewer agents or a larger classes_per_agent"
        )
    return out


def _dirichlet_draw(
    rng: np.random.Generator, by_class: list[np.ndarray], n_agents: int, alpha: float
) -> list[np.ndarray]:
    """One draw: each class shuffled and cut at the cumulative Dir(alpha * 1_N) proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
    for idx in by_class:
        props = rng.dirichlet(np.full(n_agents, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for i, piece in enumerate(np.split(rng.permutation(idx), cuts)):
            parts[i].append(piece)
    return _finish(parts)


def dirichlet(
    labels: np.ndarray, n_agents: int, alpha: float, min_size: int = 1, *, seed: int
) -> list[np.ndarray]:
    """Label-skew split (Hsu et al. 2019, FedLab): class proportions over agents ~ Dir(alpha * 1_N).

    Draws are repeated from the same generator (so still deterministic) until every agent has at
    least ``min_size`` examples; small alpha means few agents hold most of a class.

    Args:
        n_agents: N.
        alpha: concentration, > 0; -> infinity approaches IID.
        min_size: least examples per agent, >= 1 and N * min_size <= n.
    Returns:
        N sorted int64 index arrays, together covering all n examples.
    """
    labels = _check_labels(labels)
    _check_agents(n_agents, len(labels))
    if not isinstance(alpha, (int, float, np.number)) or not 0 < alpha < np.inf:
        raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
    _check_int("min_size", min_size, 1)
    if n_agents * min_size > len(labels):
        raise ValueError(
            f"n_agents * min_size = {n_agents * min_size} > {len(labels)} examples; "
            f"use min_size <= {len(labels) // n_agents}"
        )
    rng = np.random.default_rng(seed)
    by_class = _by_class(labels)
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts = _dirichlet_draw(rng, by_class, n_agents, alpha)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet draw in {_MAX_DIRICHLET_TRIES} tries gave every agent >= {min_size} "
        f"examples (alpha={alpha}); use a larger alpha or a smaller min_size"
    )


def shards(
    labels: np.ndarray, n_agents: int, shards_per_agent: int = 2, *, seed: int
) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): random shards of label-sorted data.

    Examples are sorted by label (ties in random order) and cut into S = N * shards_per_agent
    contiguous shards; each agent owns shards_per_agent shards at random positions. When S divides
    n the shards are np.array_split's equal ones. Otherwise sizes are q or q+1 as in np.array_split,
    but the q+1 shards are dealt so agent sizes differ by at most one (np.array_split would put
    them all at the low labels, and agent sizes could then differ by up to shards_per_agent).

    Args:
        n_agents: N.
        shards_per_agent: >= 1, with N * shards_per_agent <= n.
    Returns:
        N sorted int64 index arrays, together covering all n examples.
    """
    labels = _check_labels(labels)
    _check_agents(n_agents, len(labels))
    s = shards_per_agent
    _check_int("shards_per_agent", s, 1)
    n, n_shards = len(labels), n_agents * s
    if n < n_shards:
        raise ValueError(
            f"{n} examples < {n_shards} shards (n_agents * shards_per_agent); "
            f"use shards_per_agent <= {n // n_agents}"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    q, r = divmod(n, n_shards)
    # r < N * s extras: every agent gets r // N of them, r % N random agents one more (<= s each).
    extras = r // n_agents + (rng.permutation(n_agents) < r % n_agents)
    sizes = q + (np.arange(s)[None, :] < extras[:, None])  # (N, s): agent i's shard sizes
    slot_at_pos = rng.permutation(n_shards)  # flat (agent, shard) slot placed at each position
    pos_sizes = sizes.ravel()[slot_at_pos]
    ends = np.cumsum(pos_sizes)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
    for p, slot in enumerate(slot_at_pos):
        parts[slot // s].append(order[ends[p] - pos_sizes[p] : ends[p]])
    return _finish(parts)


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "classes_per_agent": classes_per_agent,
    "dirichlet": dirichlet,
    "shards": shards,
}
"""scheme name -> fn(labels, n_agents, **params, seed=...) -> list of N index arrays."""


def partition(
    labels: np.ndarray, n_agents: int, scheme: str, seed: int, **params: object
) -> list[np.ndarray]:
    """Split by a scheme of ``PARTITIONS`` with its params, e.g. ``alpha=0.5`` for dirichlet.

    Returns:
        N sorted int64 index arrays into ``labels`` (n,).
    """
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid: {sorted(PARTITIONS)}")
    fn = PARTITIONS[scheme]
    sig = inspect.signature(fn).parameters
    valid = [p for p in sig if p not in ("labels", "n_agents", "seed")]
    for name in params:
        if name not in valid:
            raise ValueError(f"unknown param {name!r} for scheme {scheme!r}; valid: {valid}")
    for name in valid:
        if sig[name].default is inspect.Parameter.empty and name not in params:
            raise ValueError(f"scheme {scheme!r} needs param {name!r}; valid: {valid}")
    return fn(labels, n_agents, seed=seed, **params)


def label_histogram(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Counts per agent per class.

    Args:
        parts: N index arrays into ``labels``.
        num_classes: C; ``None`` uses max(labels) + 1.
    Returns:
        (N, C) int64, row i = class counts of agent i.
    """
    labels = _check_labels(labels)
    n_cls = int(labels.max()) + 1 if num_classes is None else num_classes
    if n_cls < int(labels.max()) + 1:
        raise ValueError(f"num_classes={n_cls} but labels go up to {labels.max()}; use more")
    hist = np.zeros((len(parts), n_cls), dtype=np.int64)
    for i, p in enumerate(parts):
        hist[i] = np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=n_cls)
    return hist
