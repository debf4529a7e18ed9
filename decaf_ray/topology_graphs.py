"""Communication graphs: the named topologies agents gossip over, and their edge counts.

A topology is an undirected simple ``networkx.Graph`` on agents ``0..n-1``, built by a registry
entry of ``TOPOLOGIES`` from the topology's params; ``edge_count`` says how many edges it will
have from the params alone, before anything is built. Pure (numpy + networkx); the only I/O is
reading an edge list whose path the user gave. ``decaf_ray.topology`` re-exports the public names
and builds the mixing matrices.
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


def read_edges(path: str | os.PathLike) -> list:
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


def _edge_pairs(edges: list | None, path: str | os.PathLike | None) -> list:
    if (edges is None) == (path is None):
        _fail("topology 'edges' needs exactly one of edges=[[i, j], ...] or path=FILE")
    return read_edges(path) if path is not None else edges


def _edges(n: int, edges: list | None = None, path: str | os.PathLike | None = None) -> nx.Graph:
    pairs = _edge_pairs(edges, path)
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


def _wrap_edges(length: int) -> int:
    # a periodic line of 2 wraps onto its one edge, of 1 onto itself (see _lattice)
    return length if length >= 3 else length - 1


def _exponential_edges(n: int) -> int:
    # offsets 2^j and n - 2^j are one undirected offset; n/2 pairs each node with one partner
    offsets = {min(2**j, n - 2**j) for j in range(int(math.log2(n - 1)) + 1)} if n > 1 else set()
    return sum(n // 2 if 2 * d == n else n for d in offsets)


def _small_world_edges(n: int, k: int | None = None, p: float = 0.1, seed: int = 0) -> int:
    k = min(4, n) if k is None else _int("k", k, min(2, n), n)
    return n * (n - 1) // 2 if k == n else n * (k // 2)  # networkx: k == n is the complete graph


def _grid_edges(n: int, rows: int | None = None, periodic: bool = False) -> int:
    rows, cols = _grid_shape(n, rows)
    if periodic:
        return rows * _wrap_edges(cols) + cols * _wrap_edges(rows)
    return rows * (cols - 1) + cols * (rows - 1)


_EDGE_COUNTS: dict[str, Callable[..., int]] = {
    "complete": lambda n: n * (n - 1) // 2,
    "ring": _wrap_edges,
    "bipartite": lambda n: (n // 2) * ((n + 1) // 2),
    "star": lambda n: n - 1,
    "grid": _grid_edges,
    "torus": partial(_grid_edges, periodic=True),
    "exponential": _exponential_edges,
    "erdos_renyi": lambda n, p, seed=0: round(_prob("p", p, lo_open=True) * n * (n - 1) / 2),
    "random_regular": lambda n, degree, seed=0: n * _int("degree", degree, int(n > 1), n - 1) // 2,
    "small_world": _small_world_edges,
    "edges": lambda n, edges=None, path=None: len(_edge_pairs(edges, path)),
}


def _checked_n(name: str, n: Any, params: dict[str, Any]) -> int:
    """n as an int, after refusing an unknown topology name and unknown or missing params."""
    if name not in TOPOLOGIES:
        _fail(f"unknown topology {name!r}; valid: {', '.join(TOPOLOGIES)}")
    n = _int("n", n, 1)
    sig = list(inspect.signature(TOPOLOGIES[name]).parameters.values())[1:]  # [0] is n
    valid = [q.name for q in sig]
    unknown = sorted(set(params) - set(valid))
    missing = [q.name for q in sig if q.default is inspect.Parameter.empty and q.name not in params]
    for what, names in (("got unknown", unknown), ("is missing", missing)):
        if names:
            _fail(f"topology {name!r} {what} param(s) {', '.join(names)}; "
                  f"valid: {', '.join(valid) or 'none'}")
    return n


def edge_count(name: str, n: int, **params: Any) -> int:
    """Edges ``build_topology(name, n, **params)`` gives, from the parameters alone, so that a
    memory check can refuse 10^5 agents on a complete graph before building anything.

    Exact for every topology but two: erdos_renyi gives the expectation p n (n - 1) / 2, and
    edges the number of listed pairs (an upper bound: repeats merge). Raises ValueError as
    build_topology does for a bad name or params.
    """
    n = _checked_n(name, n, params)
    return int(_EDGE_COUNTS[name](n, **params))


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
    n = _checked_n(name, n, params)
    g = TOPOLOGIES[name](n, **params)
    assert sorted(g.nodes) == list(range(n)) and nx.number_of_selfloops(g) == 0
    if not is_connected(g):
        _fail(f"graph is disconnected ({nx.number_connected_components(g)} components)")
    g.graph["topology"] = name
    return g
