"""Mixing matrices for decentralized training, on the graphs of ``decaf_ray.topology_graphs``
(whose public names this module re-exports).

A topology is an undirected simple ``networkx.Graph`` on agents ``0..n-1``; a mixing matrix ``pi``
(n, n) is the symmetric, doubly stochastic gossip matrix of the paper's Assumption 5, with
``pi[i, j] > 0`` only on the graph's edges and the diagonal. Agent i's consensus step is
``x_i <- sum_j pi[i, j] x_j``. Pi is a ``scipy.sparse.csr_array`` whatever n (one code path, so
every small test runs the path 10^5 agents take): its stored entries are exactly the positive
weights plus the whole diagonal, with sorted column indices, and its floats are bit for bit those
of the dense matrix this module built before. Everything here is pure (numpy, scipy, networkx);
the only I/O is reading a matrix file whose path the user gave.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Callable, NoReturn

import networkx as nx
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from decaf_ray.topology_graphs import TOPOLOGIES, build_topology, edge_count, is_connected

__all__ = ["TOPOLOGIES", "build_topology", "edge_count", "is_connected", "SCHEMES",
           "SPECTRAL_MAX", "mixing_matrix", "check_mixing", "spectral_gap", "graph_facts",
           "neighbours", "neighbourhoods"]


def _fail(msg: str) -> NoReturn:
    raise ValueError(msg)


def _degrees(graph: nx.Graph) -> np.ndarray:
    """(n,) degrees indexed by agent id; also checks the nodes are exactly 0..n-1."""
    n = graph.number_of_nodes()
    if sorted(graph.nodes) != list(range(n)):
        _fail("graph nodes must be the integers 0..n-1")
    return np.array([graph.degree(i) for i in range(n)], dtype=np.int64)


def _edge_array(graph: nx.Graph) -> np.ndarray:
    """(E, 2) int64: the graph's edges, one row each (numpy's speed, not networkx's, at 10^6)."""
    flat = itertools.chain.from_iterable(graph.edges())
    return np.fromiter(flat, dtype=np.int64, count=2 * graph.number_of_edges()).reshape(-1, 2)


def _symmetric(n: int, edges: np.ndarray, w: Any, diag: Any) -> sparse.csr_array:
    """(n, n) CSR with ``w`` at both (i, j) and (j, i) of each edge row and ``diag`` on the
    diagonal (both scalars or arrays), indices sorted."""
    i, j, d = edges[:, 0], edges[:, 1], np.arange(n)
    w, diag = np.broadcast_to(w, (len(edges),)), np.broadcast_to(diag, (n,))
    out = sparse.csr_array((np.concatenate([w, w, diag]), (np.concatenate([i, j, d]),
                                                             np.concatenate([j, i, d]))),
                           shape=(n, n))
    out.sort_indices()
    return out


def _allowed(graph: nx.Graph) -> sparse.csr_array:
    """(n, n) bool CSR: where pi may be non-zero, i.e. the edges and the diagonal."""
    return _symmetric(graph.number_of_nodes(), _edge_array(graph), True, True)


def _canonical(pi: Any) -> sparse.csr_array:
    """pi (n, n), dense or sparse, as a CSR storing exactly its positive entries and its whole
    diagonal (zero or not), indices sorted: what ``neighbourhoods`` reads row by row."""
    p = sparse.coo_array(pi)
    n = p.shape[0]
    keep = (p.data > 0) & (p.row != p.col)
    diag = np.arange(n)
    out = sparse.csr_array((np.concatenate([p.data[keep], p.diagonal()]),
                            (np.concatenate([p.row[keep], diag]),
                             np.concatenate([p.col[keep], diag]))), shape=(n, n))
    out.sort_indices()
    return out


def _sum_tree(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """numpy's pairwise-sum tree over n slots, as (lo, size, parent, depth) per node, root 0:
    a node over 128 slots splits in two at half its size rounded down to a multiple of 8."""
    lo, size, parent, depth = [0], [n], [-1], [0]
    for k in itertools.count():
        if k == len(lo):
            return tuple(np.array(x, dtype=np.int64) for x in (lo, size, parent, depth))
        if size[k] > 128:
            half = size[k] // 2 - (size[k] // 2) % 8
            lo += [lo[k], lo[k] + half]
            size += [half, size[k] - half]
            parent += [k, k]
            depth += [depth[k] + 1] * 2


def _fold(group: np.ndarray, vals: np.ndarray, start: np.ndarray) -> np.ndarray:
    """``start[g] + v_1 + v_2 + ...`` left to right for each group g, over the ``vals`` whose
    ``group`` is g in the order given; each group's entries must be contiguous."""
    out = start.copy()
    if len(group):
        i = np.arange(len(group))
        first = np.r_[True, group[1:] != group[:-1]]
        rank = i - np.maximum.accumulate(np.where(first, i, 0))
        for k in range(int(rank.max()) + 1):  # one entry per group each time: no repeated index
            out[group[rank == k]] += vals[rank == k]
    return out


def _dense_row_sums(off: sparse.csr_array) -> np.ndarray:
    """(n,) row sums of ``off`` (n, m) (indices sorted), bit for bit numpy's
    ``off.toarray().sum(axis=1)`` without the dense array.

    numpy starts each row at 0.0 and adds it pairwise: halves (``_sum_tree``) down to blocks of
    <= 128 slots, each summed in 8 strided accumulators, combined as ((0+1)+(2+3))+((4+5)+(6+7)),
    then its last size % 8 slots one by one (a whole block below 8 slots). The rounding depends on
    where the non-zeros sit, so this replays that order on the stored entries, vectorized over
    rows; adding a zero is exact, so skipping them changes no bit. Tests check it against numpy.
    """
    n, width = off.shape
    lo, size, parent, depth = _sum_tree(width)
    rows, cols, vals = np.repeat(np.arange(n), np.diff(off.indptr)), off.indices, off.data
    leaves = np.flatnonzero(size <= 128)
    leaves = leaves[np.argsort(lo[leaves])]
    leaf = leaves[np.searchsorted(lo[leaves], cols, side="right") - 1]
    slot = cols - lo[leaf]
    strided = slot < np.where(size[leaf] >= 8, size[leaf] - size[leaf] % 8, 0)
    keys, pair = np.unique(rows * len(lo) + leaf, return_inverse=True)  # one per (row, block)
    acc = pair[strided] * 8 + slot[strided] % 8
    order = np.argsort(acc, kind="stable")  # stable: each accumulator adds in column order
    r = _fold(acc[order], vals[strided][order], np.zeros(8 * len(keys))).reshape(-1, 8)
    s = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    s = _fold(pair[~strided], vals[~strided], s)
    for d in range(int(depth.max()), 0, -1):  # up the tree: a parent is its two children's sum
        node = keys % len(lo)
        keys = keys + np.where(depth[node] == d, parent[node] - node, 0)
        order = np.argsort(keys, kind="stable")
        keys, start = np.unique(keys[order], return_index=True)
        s = np.add.reduceat(s[order], start) if len(s) else s
    sums = np.zeros(n)
    sums[keys // len(lo)] = s
    return sums


def _edge_weights(graph: nx.Graph, weight: Callable[[np.ndarray, np.ndarray], Any]
                  ) -> sparse.csr_array:
    """``weight(i, j)`` (arrays over the edges) off the diagonal, both ways; the diagonal takes
    the rest so rows sum to 1, as ``1 - pi.sum(axis=1)`` of the dense pi did, to the bit."""
    n, e = graph.number_of_nodes(), _edge_array(graph)
    w = np.asarray(weight(e[:, 0], e[:, 1]), dtype=np.float64)
    off = _symmetric(n, e, w, 0.0)
    off.eliminate_zeros()  # the zero diagonal, so the sums read only the weights
    return _symmetric(n, e, w, 1.0 - _dense_row_sums(off))


def _uniform(graph: nx.Graph, matrix: Any = None) -> sparse.csr_array:
    deg = _degrees(graph)
    if deg.min() != deg.max():
        _fail(
            f"uniform weights need a regular graph (degrees here are {deg.min()}..{deg.max()}, "
            "so pi would not be doubly stochastic); use scheme 'metropolis' or 'max_degree'"
        )
    return _edge_weights(graph, lambda i, j: 1.0 / (deg[i] + 1))  # paper A.4.1: 1/(deg+1)


def _metropolis(graph: nx.Graph, matrix: Any = None) -> sparse.csr_array:
    deg = _degrees(graph)
    return _edge_weights(graph, lambda i, j: 1.0 / (1 + np.maximum(deg[i], deg[j])))


def _max_degree(graph: nx.Graph, matrix: Any = None) -> sparse.csr_array:
    dmax = int(_degrees(graph).max())
    return _edge_weights(graph, lambda i, j: 1.0 / (1 + dmax))


def read_matrix(path: str | os.PathLike) -> np.ndarray:
    """A user's mixing matrix file (.npy, .csv, .txt), as float64 (N, N), unchecked."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".csv", ".txt"):
        return np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2)
    _fail(f"cannot read mixing matrix {str(path)!r}; valid suffixes: .npy, .csv, .txt")


def _user_matrix(graph: nx.Graph, matrix: Any = None) -> sparse.csr_array:
    if matrix is None:
        _fail("scheme 'matrix' needs matrix= (nested list, numpy array, or .npy/.csv/.txt path)")
    if isinstance(matrix, (str, os.PathLike)):
        matrix = read_matrix(matrix)
    pi = np.array(matrix, dtype=np.float64)  # dense by nature: the user wrote all n^2 entries
    check_mixing(pi, graph)
    # Snap rounding noise (within atol) to exact zeros and symmetry, so neighbours(), which keys on
    # pi > 0, never hands an agent a partner across a non-edge.
    pi = np.where(_allowed(graph).toarray(), np.clip(pi, 0.0, None), 0.0)
    return _canonical((pi + pi.T) / 2)


SCHEMES: dict[str, Callable[[nx.Graph, Any], sparse.csr_array]] = {
    "uniform": _uniform,
    "metropolis": _metropolis,
    "max_degree": _max_degree,
    "matrix": _user_matrix,
}
"""name -> f(graph, matrix) returning pi (n, n) CSR; only 'matrix' uses its second argument."""


def mixing_matrix(graph: nx.Graph, scheme: str = "metropolis", matrix: Any = None
                  ) -> sparse.csr_array:
    """The gossip matrix pi (n, n) float64 CSR of ``graph`` under ``scheme``, validated by
    check_mixing; it stores the positive weights and the diagonal (see the module docstring).

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


SPECTRAL_MAX = 2048
"""Most agents whose spectral gap is computed: it takes the dense eigvalsh, O(n^3) (~0.4 s at
2048), and a ring's gap (~1e-9 at 10^5 agents) is beyond what a sparse eigsh resolves quickly."""


def spectral_gap(pi: Any) -> float:
    """1 - max(|lambda_2|, |lambda_N|) of the symmetric pi (n, n), dense or sparse; 1.0 when
    n == 1. Raises ValueError above ``SPECTRAL_MAX`` agents."""
    n = pi.shape[0]
    if n == 1:
        return 1.0
    if n > SPECTRAL_MAX:
        _fail(f"spectral gap not computed for N > {SPECTRAL_MAX} (dense eigvalsh is O(N^3))")
    lam = np.linalg.eigvalsh(pi.toarray() if sparse.issparse(pi) else np.asarray(pi))
    return float(1.0 - max(abs(lam[-2]), abs(lam[0])))  # ascending: lam[-2] = lambda_2


def _mixes(pi: sparse.csr_array) -> bool:
    """Whether pi's gap is positive, read off its support: connected and aperiodic (a positive
    diagonal entry or an odd cycle), which for a symmetric stochastic pi is Perron-Frobenius."""
    support = sparse.csr_array(pi > 0)
    if csgraph.connected_components(support, directed=False)[0] > 1:
        return False
    return bool((pi.diagonal() > 0).any()) or not nx.is_bipartite(
        nx.from_scipy_sparse_array(support))


def _off_graph(pi: sparse.csr_array, graph: nx.Graph) -> tuple[float, int, int]:
    """The largest |pi_ij| off the graph's edges and diagonal, and its first (row-major) i, j."""
    off = abs(pi) - abs(pi).multiply(_allowed(graph))
    off = sparse.csr_array(off)
    off.eliminate_zeros()
    if not off.nnz:
        return 0.0, 0, 0
    off.sort_indices()
    k = int(np.argmax(off.data))
    return float(off.data[k]), int(np.searchsorted(off.indptr, k, side="right") - 1), \
        int(off.indices[k])


def check_mixing(pi: Any, graph: nx.Graph, atol: float = 1e-8) -> None:
    """Raise ValueError unless pi (n, n), dense or sparse, is a valid gossip matrix for ``graph``.

    Checks, in order: shape, finite, symmetric, non-negative, rows and columns sum to 1, zero off
    the edges and diagonal, spectral gap > atol (connected and aperiodic). A gap below atol is
    treated as zero: eigvalsh noise is ~1e-15, while a ring of 1000 agents still has gap ~1e-5.
    Above ``SPECTRAL_MAX`` agents the gap is not computed; connectivity and aperiodicity of pi's
    positive entries, which make it positive, are checked instead.
    """
    n = len(_degrees(graph))
    shape = pi.shape if sparse.issparse(pi) else np.shape(pi)
    if shape != (n, n):
        _fail(f"mixing matrix has shape {shape}; expected ({n}, {n}) for a graph of {n} nodes")
    pi = sparse.csr_array(pi, dtype=np.float64)
    if not np.all(np.isfinite(pi.data)):
        _fail(f"mixing matrix has {int(np.sum(~np.isfinite(pi.data)))} non-finite entries")
    asym = float(abs(pi - pi.T).max())
    if asym > atol:
        _fail(f"mixing matrix is not symmetric (max |pi - pi^T| = {asym:.3g})")
    if pi.min() < -atol:
        _fail(f"mixing matrix has negative entries (min = {pi.min():.3g})")
    for axis, what in ((1, "rows"), (0, "columns")):
        err = float(np.max(np.abs(pi.sum(axis=axis) - 1.0)))
        if err > atol:
            _fail(f"mixing matrix {what} do not sum to 1 (max |sum - 1| = {err:.3g})")
    worst, i, j = _off_graph(pi, graph)
    if worst > atol:
        _fail(f"mixing matrix has weight off the graph's edges (pi[{i}, {j}] = {pi[i, j]:.3g})")
    if n > SPECTRAL_MAX:
        if not _mixes(pi):
            _fail("mixing matrix has no spectral gap: its positive entries are disconnected or "
                  "periodic")
        return
    gap = spectral_gap(pi)
    if gap <= atol:
        _fail(f"mixing matrix has no spectral gap (gap = {gap:.3g}): disconnected or periodic")


def graph_facts(graph: nx.Graph, pi: Any) -> dict[str, Any]:
    """Summary for logs: nodes, edges, min/max degree, regular, spectral_gap, and the paper's
    rho = max(|lambda_2|, |lambda_N|)^2 (Assumption 5); above ``SPECTRAL_MAX`` agents the last
    two say they were not computed."""
    deg = _degrees(graph)
    if graph.number_of_nodes() > SPECTRAL_MAX:
        gap = rho = f"not computed for N > {SPECTRAL_MAX}"
    else:
        gap = spectral_gap(pi)
        rho = (1.0 - gap) ** 2
    return {
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "min_degree": int(deg.min()),
        "max_degree": int(deg.max()),
        "regular": bool(deg.min() == deg.max()),
        "spectral_gap": gap,
        "rho": rho,
    }


def neighbours(pi: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Agent i's gossip partners in pi (n, n), dense or sparse: (indices (k,) int64 ascending,
    weights (k,) float64).

    The indices are the j with pi[i, j] > 0; i itself is always included (with weight pi[i, i],
    which is > 0 for every built-in scheme) so a runtime can rely on finding itself.
    """
    n = pi.shape[0]
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
        _fail(f"agent index {i!r} is out of range; valid: 0..{n - 1}")
    row = pi[[i]].toarray()[0] if sparse.issparse(pi) else np.asarray(pi)[i]
    idx = np.flatnonzero((row > 0) | (np.arange(n) == i)).astype(np.int64)
    return idx, row[idx].astype(np.float64)


def neighbourhoods(pi: Any) -> tuple[tuple[tuple[int, ...], tuple[float, ...]], ...]:
    """Every agent's ``neighbours`` as Python tuples (ids, weights), in one O(nnz) pass over the
    stored entries rather than n passes over dense rows."""
    p = _canonical(pi)
    ids, w, ptr = p.indices.tolist(), p.data.tolist(), p.indptr.tolist()
    return tuple((tuple(ids[a:b]), tuple(w[a:b])) for a, b in zip(ptr, ptr[1:]))
