"""Communication graphs and mixing matrices for decentralized training.

A topology is an undirected simple ``networkx.Graph`` on agents ``0..n-1``; a mixing matrix ``pi``
(n, n) is the symmetric, doubly stochastic gossip matrix of the paper's Assumption 5, with
``pi[i, j] > 0`` only on the graph's edges and the diagonal. Agent i's consensus step is
``x_i <- sum_j pi[i, j] x_j``. Everything here is pure (numpy + networkx); the only I/O is
reading an edge list or matrix file whose path the user gave.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, NoReturn

import networkx as nx
import numpy as np

_TRIES = 100  # resamples before a random topology gives up on being connected


def _fail(msg: str) -> NoReturn:
    raise ValueError(msg)


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    # bool is an int subclass; True agents or rows is almost surely a config typo.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        _fail(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        _fail(f"{name}={value} is out of range; valid: {lo}..{'inf' if hi is None else hi}")
    return value


def _prob(name: str, value: Any, lo_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        _fail(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0 if lo_open else 0.0 <= value <= 1.0):
        _fail(f"{name}={value} is out of range; valid: {'(0, 1]' if lo_open else '[0, 1]'}")
    return value


def _connected_draw(what: str, seed: int, draw: Callable[[int], nx.Graph]) -> nx.Graph:
    for attempt in range(_TRIES):
        # Attempt 0 uses the seed itself, so a connected draw equals networkx's own for that seed;
        # later attempts derive fresh seeds from it, so the result stays a function of the seed.
        s = np.random.SeedSequence([seed, attempt]).generate_state(1)[0] if attempt else seed
        g = draw(int(s))
        if nx.is_connected(g):
            return g
    raise ValueError(f"{what}: no connected graph in {_TRIES} draws; use a denser setting")


def _complete(n: int) -> nx.Graph:
    return nx.complete_graph(n)


def _ring(n: int) -> nx.Graph:
    # networkx's cycle_graph(1) is a self loop; cycle_graph(2) is already a single edge
    return nx.empty_graph(1) if n == 1 else nx.cycle_graph(n)


def _bipartite(n: int) -> nx.Graph:
    """Complete bipartite graph between even- and odd-numbered agents.

    This is the graph we take for the paper's Fig. 2 "bipartite" topology; it is regular (degree
    n/2) when n is even, so the paper's uniform weights apply only then.
    """
    g = nx.empty_graph(n)
    g.add_edges_from((i, j) for i in range(0, n, 2) for j in range(1, n, 2))
    return g


def _star(n: int) -> nx.Graph:
    return nx.star_graph(n - 1)  # hub 0, leaves 1..n-1


def _grid_shape(n: int, rows: int | None) -> tuple[int, int]:
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    rows = _int("rows", rows, 1, n)
    if n % rows:
        divisors = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        _fail(f"rows={rows} does not divide n={n}; valid rows: {divisors}")
    return rows, n // rows


def _lattice(n: int, rows: int | None, periodic: bool) -> nx.Graph:
    rows, cols = _grid_shape(n, rows)
    g = nx.empty_graph(n)  # agent r * cols + c sits at row r, column c
    for r in range(rows):
        for c in range(cols):
            for rr, cc in ((r + 1, c), (r, c + 1)):
                if periodic:
                    rr, cc = rr % rows, cc % cols
                # a wrap on a side of length 1 would be a self loop; length 2 a repeat edge,
                # which nx.Graph already merges
                if rr < rows and cc < cols and (rr, cc) != (r, c):
                    g.add_edge(r * cols + c, rr * cols + cc)
    return g


def _grid(n: int, rows: int | None = None) -> nx.Graph:
    return _lattice(n, rows, periodic=False)


def _torus(n: int, rows: int | None = None) -> nx.Graph:
    return _lattice(n, rows, periodic=True)


def _exponential(n: int) -> nx.Graph:
    g = nx.empty_graph(n)
    if n > 1:
        for j in range(int(math.floor(math.log2(n - 1))) + 1):
            g.add_edges_from((i, (i + 2**j) % n) for i in range(n))  # i - 2^j is the mirror edge
    return g


def _erdos_renyi(n: int, p: float, seed: int = 0) -> nx.Graph:
    p, seed = _prob("p", p, lo_open=True), _int("seed", seed, 0)
    return _connected_draw(f"erdos_renyi(n={n}, p={p})", seed, partial(nx.gnp_random_graph, n, p))


def _random_regular(n: int, degree: int, seed: int = 0) -> nx.Graph:
    degree, seed = _int("degree", degree, 0 if n == 1 else 1, n - 1), _int("seed", seed, 0)
    if (n * degree) % 2:
        _fail(f"random_regular needs n*degree even, got n={n}, degree={degree}")
    what = f"random_regular(n={n}, degree={degree})"
    return _connected_draw(what, seed, partial(nx.random_regular_graph, degree, n))


def _small_world(n: int, k: int | None = None, p: float = 0.1, seed: int = 0) -> nx.Graph:
    # Default k=4, capped at n (networkx then returns the complete graph) so tiny n still works.
    k = min(4, n) if k is None else _int("k", k, min(2, n), n)
    p, seed = _prob("p", p, lo_open=False), _int("seed", seed, 0)
    try:
        return nx.connected_watts_strogatz_graph(n, k, p, tries=_TRIES, seed=seed)
    except nx.NetworkXError:
        msg = f"small_world(n={n}, k={k}, p={p}): no connected graph in {_TRIES} draws"
        raise ValueError(msg) from None


def _read_edges(path: str | os.PathLike) -> list:
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            _fail(f"{path}:{lineno}: expected 'i j', got {line!r}")
        try:
            pairs.append((int(parts[0]), int(parts[1])))
        except ValueError:
            _fail(f"{path}:{lineno}: node ids must be integers, got {line!r}")
    return pairs


def _edges(n: int, edges: list | None = None, path: str | os.PathLike | None = None) -> nx.Graph:
    if (edges is None) == (path is None):
        _fail("topology 'edges' needs exactly one of edges=[[i, j], ...] or path=FILE")
    pairs = _read_edges(path) if path is not None else edges
    g = nx.empty_graph(n)
    for pair in pairs:
        if not isinstance(pair, (list, tuple, np.ndarray)) or len(pair) != 2:
            _fail(f"edge {pair!r} is not an [i, j] pair")
        i, j = (_int("edge node id", v, 0, n - 1) for v in pair)
        if i == j:
            _fail(f"edge [{i}, {j}] is a self loop; pi's diagonal is implicit, list only i != j")
        g.add_edge(i, j)
    return g


TOPOLOGIES: dict[str, Callable[..., nx.Graph]] = {
    "complete": _complete,
    "ring": _ring,
    "bipartite": _bipartite,
    "star": _star,
    "grid": _grid,
    "torus": _torus,
    "exponential": _exponential,
    "erdos_renyi": _erdos_renyi,
    "random_regular": _random_regular,
    "small_world": _small_world,
    "edges": _edges,
}
"""name -> builder(n, **params); the builder's keyword arguments are the topology's params."""


def is_connected(graph: nx.Graph) -> bool:
    """Whether ``graph`` is connected (a single node counts as connected)."""
    return graph.number_of_nodes() > 0 and nx.is_connected(graph)


def build_topology(name: str, n: int, **params: Any) -> nx.Graph:
    """Build the named communication graph on agents 0..n-1.

    Args:
        name: a key of ``TOPOLOGIES``.
        n: number of agents, >= 1.
        params: the topology's parameters (see each builder's signature).
    Returns:
        A connected, undirected, simple graph with nodes 0..n-1; ``graph.graph["topology"]`` = name.
    Raises:
        ValueError: unknown name or params, missing params, bad values, or a disconnected graph.
    """
    if name not in TOPOLOGIES:
        _fail(f"unknown topology {name!r}; valid: {', '.join(TOPOLOGIES)}")
    n = _int("n", n, 1)
    builder = TOPOLOGIES[name]
    sig = list(inspect.signature(builder).parameters.values())[1:]  # [0] is n
    valid = [q.name for q in sig]
    unknown = sorted(set(params) - set(valid))
    missing = [q.name for q in sig if q.default is inspect.Parameter.empty and q.name not in params]
    for what, names in (("got unknown", unknown), ("is missing", missing)):
        if names:
            _fail(f"topology {name!r} {what} param(s) {', '.join(names)}; "
                  f"valid: {', '.join(valid) or 'none'}")
    g = builder(n, **params)
    assert sorted(g.nodes) == list(range(n)) and nx.number_of_selfloops(g) == 0
    if not is_connected(g):
        _fail(f"graph is disconnected ({nx.number_connected_components(g)} components)")
    g.graph["topology"] = name
    return g


def _degrees(graph: nx.Graph) -> np.ndarray:
    """(n,) degrees indexed by agent id; also checks the nodes are exactly 0..n-1."""
    n = graph.number_of_nodes()
    if sorted(graph.nodes) != list(range(n)):
        _fail("graph nodes must be the integers 0..n-1")
    return np.array([graph.degree(i) for i in range(n)], dtype=np.int64)


def _allowed(graph: nx.Graph) -> np.ndarray:
    """(n, n) bool: where pi may be non-zero, i.e. the edges and the diagonal."""
    n = graph.number_of_nodes()
    return nx.to_numpy_array(graph, nodelist=range(n), dtype=bool) | np.eye(n, dtype=bool)


def _edge_weights(graph: nx.Graph, weight: Callable[[int, int], float]) -> np.ndarray:
    # Off-diagonal weights on edges, diagonal takes the rest so rows sum to 1.
    pi = np.zeros((graph.number_of_nodes(),) * 2)
    for i, j in graph.edges:
        pi[i, j] = pi[j, i] = weight(i, j)
    np.fill_diagonal(pi, 1.0 - pi.sum(axis=1))
    return pi


def _uniform(graph: nx.Graph, matrix: Any = None) -> np.ndarray:
    deg = _degrees(graph)
    if deg.min() != deg.max():
        _fail(
            f"uniform weights need a regular graph (degrees here are {deg.min()}..{deg.max()}, "
            "so pi would not be doubly stochastic); use scheme 'metropolis' or 'max_degree'"
        )
    return _edge_weights(graph, lambda i, j: 1.0 / (deg[i] + 1))  # paper A.4.1: 1/(deg+1)


def _metropolis(graph: nx.Graph, matrix: Any = None) -> np.ndarray:
    deg = _degrees(graph)
    return _edge_weights(graph, lambda i, j: 1.0 / (1 + max(deg[i], deg[j])))


def _max_degree(graph: nx.Graph, matrix: Any = None) -> np.ndarray:
    dmax = int(_degrees(graph).max())
    return _edge_weights(graph, lambda i, j: 1.0 / (1 + dmax))


def _user_matrix(graph: nx.Graph, matrix: Any = None) -> np.ndarray:
    if matrix is None:
        _fail("scheme 'matrix' needs matrix= (nested list, numpy array, or .npy/.csv/.txt path)")
    if isinstance(matrix, (str, os.PathLike)):
        suffix = Path(matrix).suffix.lower()
        if suffix == ".npy":
            matrix = np.load(matrix, allow_pickle=False)
        elif suffix in (".csv", ".txt"):
            matrix = np.loadtxt(matrix, delimiter="," if suffix == ".csv" else None, ndmin=2)
        else:
            _fail(f"cannot read mixing matrix {str(matrix)!r}; valid suffixes: .npy, .csv, .txt")
    pi = np.array(matrix, dtype=np.float64)
    check_mixing(pi, graph)
    # Snap rounding noise (within atol) to exact zeros and symmetry, so neighbours(), which keys on
    # pi > 0, never hands an agent a partner across a non-edge.
    pi = np.where(_allowed(graph), np.clip(pi, 0.0, None), 0.0)
    return (pi + pi.T) / 2


SCHEMES: dict[str, Callable[[nx.Graph, Any], np.ndarray]] = {
    "uniform": _uniform,
    "metropolis": _metropolis,
    "max_degree": _max_degree,
    "matrix": _user_matrix,
}
"""name -> f(graph, matrix) returning pi (n, n); only 'matrix' uses its second argument."""


def mixing_matrix(graph: nx.Graph, scheme: str = "metropolis", matrix: Any = None) -> np.ndarray:
    """The gossip matrix pi (n, n) float64 of ``graph`` under ``scheme``, validated by check_mixing.

    Schemes: 'uniform' pi_ij = 1/(deg+1) (paper A.4.1; regular graphs only), 'metropolis'
    pi_ij = 1/(1 + max(deg_i, deg_j)), 'max_degree' pi_ij = 1/(1 + max degree), each with the
    diagonal taking the rest; 'matrix' the user's ``matrix`` (array-like or .npy/.csv/.txt path).
    """
    if scheme not in SCHEMES:
        _fail(f"unknown mixing scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if matrix is not None and scheme != "matrix":
        _fail(f"matrix= is only used with scheme='matrix', not {scheme!r}")
    pi = SCHEMES[scheme](graph, matrix)
    check_mixing(pi, graph)
    return pi


def spectral_gap(pi: np.ndarray) -> float:
    """1 - max(|lambda_2|, |lambda_N|) of the symmetric pi (n, n); 1.0 when n == 1."""
    if pi.shape[0] == 1:
        return 1.0
    lam = np.linalg.eigvalsh(pi)  # ascending: lam[-1] = 1, lam[-2] = lambda_2, lam[0] = lambda_N
    return float(1.0 - max(abs(lam[-2]), abs(lam[0])))


def check_mixing(pi: np.ndarray, graph: nx.Graph, atol: float = 1e-8) -> None:
    """Raise ValueError unless pi (n, n) is a valid gossip matrix for ``graph``.

    Checks, in order: shape, finite, symmetric, non-negative, rows and columns sum to 1, zero off
    the edges and diagonal, spectral gap > atol (connected and aperiodic). A gap below atol is
    treated as zero: eigvalsh noise is ~1e-15, while a ring of 1000 agents still has gap ~1e-5.
    """
    n = len(_degrees(graph))
    pi = np.asarray(pi)
    if pi.shape != (n, n):
        _fail(f"mixing matrix has shape {pi.shape}; expected ({n}, {n}) for a graph of {n} nodes")
    if not np.all(np.isfinite(pi)):
        _fail(f"mixing matrix has {int(np.sum(~np.isfinite(pi)))} non-finite entries")
    asym = float(np.max(np.abs(pi - pi.T)))
    if asym > atol:
        _fail(f"mixing matrix is not symmetric (max |pi - pi^T| = {asym:.3g})")
    if pi.min() < -atol:
        _fail(f"mixing matrix has negative entries (min = {pi.min():.3g})")
    for axis, what in ((1, "rows"), (0, "columns")):
        err = float(np.max(np.abs(pi.sum(axis=axis) - 1.0)))
        if err > atol:
            _fail(f"mixing matrix {what} do not sum to 1 (max |sum - 1| = {err:.3g})")
    off = np.where(_allowed(graph), 0.0, np.abs(pi))
    if off.max() > atol:
        i, j = np.unravel_index(np.argmax(off), off.shape)
        _fail(f"mixing matrix has weight off the graph's edges (pi[{i}, {j}] = {pi[i, j]:.3g})")
    gap = spectral_gap(pi)
    if gap <= atol:
        _fail(f"mixing matrix has no spectral gap (gap = {gap:.3g}): disconnected or periodic")


def graph_facts(graph: nx.Graph, pi: np.ndarray) -> dict[str, Any]:
    """Summary for logs: nodes, edges, min/max degree, regular, spectral_gap, and the paper's
    rho = max(|lambda_2|, |lambda_N|)^2 (Assumption 5)."""
    deg = _degrees(graph)
    gap = spectral_gap(pi)
    return {
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "min_degree": int(deg.min()),
        "max_degree": int(deg.max()),
        "regular": bool(deg.min() == deg.max()),
        "spectral_gap": gap,
        "rho": (1.0 - gap) ** 2,
    }


def neighbours(pi: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Agent i's gossip partners: (indices (k,) int64 ascending, weights (k,) float64).

    The indices are the j with pi[i, j] > 0; i itself is always included (with weight pi[i, i],
    which is > 0 for every built-in scheme) so a runtime can rely on finding itself.
    """
    i = _int("agent index", i, 0, pi.shape[0] - 1)
    idx = np.flatnonzero((pi[i] > 0) | (np.arange(pi.shape[0]) == i)).astype(np.int64)
    return idx, pi[i, idx].astype(np.float64)
