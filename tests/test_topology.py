"""Tests for decaf_ray.topology: mixing matrices, their checks, and that the sparse Pi holds the
very floats of the dense one it replaced."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from test_topology_graphs import NS, assert_valid_graph, graph_exists, sweep_params

from decaf_ray import topology
from decaf_ray.topology import (
    SCHEMES,
    TOPOLOGIES,
    build_topology,
    check_mixing,
    graph_facts,
    mixing_matrix,
    neighbourhoods,
    neighbours,
    spectral_gap,
)


def assert_valid_mixing(pi: np.ndarray, g: nx.Graph) -> None:
    """The properties check_mixing promises, asserted independently of it."""
    n = g.number_of_nodes()
    assert isinstance(pi, sparse.csr_array) and pi.shape == (n, n) and pi.dtype == np.float64
    pi = pi.toarray()
    assert np.all(np.isfinite(pi))
    np.testing.assert_allclose(pi, pi.T, atol=1e-12, rtol=0)
    assert pi.min() >= 0.0
    np.testing.assert_allclose(pi.sum(axis=0), 1.0, atol=1e-12, rtol=0)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0, atol=1e-12, rtol=0)
    for i in range(n):
        for j in range(n):
            if i != j and not g.has_edge(i, j):
                assert pi[i, j] == 0.0, (i, j)
    if n > 1:
        # general eigvals, not eigvalsh, so this does not share spectral_gap's code path
        mags = np.sort(np.abs(np.linalg.eigvals(pi)))[::-1]
        assert mags[0] == pytest.approx(1.0, abs=1e-9)
        assert mags[1] < 1.0 - 1e-9
        assert spectral_gap(pi) == pytest.approx(1.0 - mags[1], abs=1e-9)


# ---------------------------------------------------------------- every topology, every scheme


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_every_topology_and_scheme_gives_valid_mixing(name: str, n: int) -> None:
    params = sweep_params(name, n)
    if not graph_exists(name, params, n):
        with pytest.raises(ValueError, match="degree"):
            build_topology(name, n, **params)
        return
    g = build_topology(name, n, **params)
    assert_valid_graph(g, n)
    regular = len({d for _, d in g.degree}) == 1
    for scheme in ("metropolis", "max_degree", "uniform"):
        if scheme == "uniform" and not regular:
            with pytest.raises(ValueError, match="metropolis.*max_degree"):
                mixing_matrix(g, scheme)
            continue
        pi = mixing_matrix(g, scheme)
        assert_valid_mixing(pi, g)
        dense = pi.toarray()
        if scheme == "uniform":
            deg = g.degree(0)
            assert np.allclose(dense[0][dense[0] > 0], 1.0 / (deg + 1))
        # the user-matrix path accepts what the built-in schemes produce, as a nested list
        np.testing.assert_allclose(mixing_matrix(g, "matrix", matrix=dense.tolist()).toarray(),
                                   dense, atol=1e-15)
    assert set(SCHEMES) == {"uniform", "metropolis", "max_degree", "matrix"}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_single_agent(name: str) -> None:
    params = {"erdos_renyi": {"p": 0.5}, "random_regular": {"degree": 0}, "edges": {"edges": []}}
    g = build_topology(name, 1, **params.get(name, {}))
    assert list(g.nodes) == [0] and g.number_of_edges() == 0
    for scheme in ("uniform", "metropolis", "max_degree"):
        pi = mixing_matrix(g, scheme)
        assert pi.toarray().tolist() == [[1.0]]
    assert spectral_gap(pi) == 1.0
    assert graph_facts(g, pi)["rho"] == 0.0
    idx, w = neighbours(pi, 0)
    assert idx.tolist() == [0] and w.tolist() == [1.0]


# ---------------------------------------------------------------- specific values


def test_ring_of_10_uniform_is_one_third() -> None:
    pi = mixing_matrix(build_topology("ring", 10), "uniform")
    for i in range(10):
        for j in range(10):
            expected = 1 / 3 if (i - j) % 10 in (0, 1, 9) else 0.0
            assert pi[i, j] == pytest.approx(expected, abs=1e-15)
    assert round(pi[0, 0], 3) == 0.333  # the paper's A.4.1 example
    idx, w = neighbours(pi, 0)
    assert idx.tolist() == [0, 1, 9] and np.allclose(w, 1 / 3)


def test_ring_of_2_is_one_edge() -> None:
    g = build_topology("ring", 2)
    assert list(g.edges) == [(0, 1)]
    assert np.allclose(mixing_matrix(g, "uniform").toarray(), 0.5)


def test_complete_of_10_uniform() -> None:
    pi = mixing_matrix(build_topology("complete", 10), "uniform")
    np.testing.assert_allclose(pi.toarray(), np.full((10, 10), 0.1), atol=1e-15)
    assert spectral_gap(pi) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", range(3, 41))
def test_ring_spectral_gap_closed_form(n: int) -> None:
    # The uniform ring is circulant with eigenvalues (1 + 2 cos(2 pi k / n)) / 3, k = 0..n-1.
    lam = (1 + 2 * np.cos(2 * np.pi * np.arange(1, n) / n)) / 3
    second = np.max(np.abs(lam))  # over lambda_2 .. lambda_N: |lambda_N| is the max for some n
    pi = mixing_matrix(build_topology("ring", n), "uniform")
    assert spectral_gap(pi) == pytest.approx(1 - second, abs=1e-12)
    assert spectral_gap(pi) == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-12)
    assert graph_facts(build_topology("ring", n), pi)["rho"] == pytest.approx(second**2, abs=1e-12)


def test_star_hub_and_metropolis_neighbours() -> None:
    g = build_topology("star", 6)
    assert g.degree(0) == 5 and all(g.degree(i) == 1 for i in range(1, 6))
    pi = mixing_matrix(g)  # metropolis by default: every edge 1/(1 + 5)
    idx, w = neighbours(pi, 0)
    assert idx.tolist() == list(range(6)) and np.allclose(w, 1 / 6)
    idx, w = neighbours(pi, 3)
    assert idx.tolist() == [0, 3] and np.allclose(w, [1 / 6, 5 / 6])
    with pytest.raises(ValueError, match="agent index"):
        neighbours(pi, 6)


def test_max_degree_weights() -> None:
    pi = mixing_matrix(build_topology("star", 5), "max_degree")
    assert pi[1, 0] == pytest.approx(1 / 5) and pi[1, 1] == pytest.approx(4 / 5)
    assert pi[0, 0] == pytest.approx(1 / 5)


def test_uniform_on_star_refuses() -> None:
    msg = "uniform weights need a regular graph.*'metropolis' or 'max_degree'"
    with pytest.raises(ValueError, match=msg):
        mixing_matrix(build_topology("star", 5), "uniform")


def test_scheme_errors() -> None:
    g = build_topology("ring", 4)
    msg = "unknown mixing scheme 'metro'; valid: uniform, metropolis, max_degree, matrix"
    with pytest.raises(ValueError, match=msg):
        mixing_matrix(g, "metro")
    with pytest.raises(ValueError, match="needs matrix="):
        mixing_matrix(g, "matrix")
    with pytest.raises(ValueError, match="only used with scheme='matrix'"):
        mixing_matrix(g, "uniform", matrix=np.eye(4))


# ---------------------------------------------------------------- user matrices


def test_user_matrix_from_files(tmp_path) -> None:
    g = build_topology("ring", 5)
    pi = mixing_matrix(g, "uniform").toarray()
    np.save(tmp_path / "pi.npy", pi)
    np.savetxt(tmp_path / "pi.csv", pi, delimiter=",")
    np.savetxt(tmp_path / "pi.txt", pi)
    for name in ("pi.npy", "pi.csv", "pi.txt"):
        loaded = mixing_matrix(g, "matrix", matrix=str(tmp_path / name))
        np.testing.assert_allclose(loaded.toarray(), pi, atol=1e-15)
    with pytest.raises(ValueError, match="valid suffixes: .npy, .csv, .txt"):
        mixing_matrix(g, "matrix", matrix=str(tmp_path / "pi.mat"))


def test_user_matrix_errors() -> None:
    g = build_topology("ring", 4)
    good = mixing_matrix(g, "uniform").toarray()
    asym = good.copy()
    asym[0, 1] += 0.1
    asym[0, 0] -= 0.1
    with pytest.raises(ValueError, match=r"not symmetric \(max \|pi - pi\^T\| = 0.1\)"):
        mixing_matrix(g, "matrix", matrix=asym)
    with pytest.raises(ValueError, match=r"rows do not sum to 1 \(max \|sum - 1\| = 0.1\)"):
        mixing_matrix(g, "matrix", matrix=0.9 * good)
    off = good.copy()  # move weight onto the non-edge (0, 2), keeping it doubly stochastic
    off[0, 2] = off[2, 0] = 0.1
    off[0, 0] -= 0.1
    off[2, 2] -= 0.1
    with pytest.raises(ValueError, match=r"weight off the graph's edges \(pi\[0, 2\] = 0.1\)"):
        mixing_matrix(g, "matrix", matrix=off)
    neg = good.copy()
    neg[0, 1] = neg[1, 0] = -0.1
    neg[0, 0] += 0.1 + 1 / 3
    neg[1, 1] += 0.1 + 1 / 3
    with pytest.raises(ValueError, match=r"negative entries \(min = -0.1\)"):
        mixing_matrix(g, "matrix", matrix=neg)
    with pytest.raises(ValueError, match=r"shape \(3, 3\); expected \(4, 4\)"):
        mixing_matrix(g, "matrix", matrix=np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        mixing_matrix(g, "matrix", matrix=np.full((4, 4), np.nan))
    # identity is doubly stochastic but never mixes; swap on one edge is periodic
    with pytest.raises(ValueError, match="no spectral gap"):
        mixing_matrix(g, "matrix", matrix=np.eye(4))
    with pytest.raises(ValueError, match="no spectral gap"):
        mixing_matrix(build_topology("ring", 2), "matrix", matrix=[[0.0, 1.0], [1.0, 0.0]])


def test_user_matrix_noise_is_snapped_to_the_graph() -> None:
    g = build_topology("ring", 4)
    noisy = mixing_matrix(g, "uniform").toarray()
    noisy[0, 2] = noisy[2, 0] = 1e-12  # within atol: accepted, but must not create a neighbour
    pi = mixing_matrix(g, "matrix", matrix=noisy)
    assert pi[0, 2] == 0.0
    assert neighbours(pi, 0)[0].tolist() == [0, 1, 3]


def test_disconnected_graph_has_no_spectral_gap() -> None:
    g = nx.Graph([(0, 1), (2, 3)])
    with pytest.raises(ValueError, match="no spectral gap"):
        mixing_matrix(g, "metropolis")
    with pytest.raises(ValueError, match="no spectral gap"):
        check_mixing(np.eye(4), g)


def test_graph_facts() -> None:
    g = build_topology("star", 5)
    pi = mixing_matrix(g)
    facts = graph_facts(g, pi)
    assert facts["nodes"] == 5 and facts["edges"] == 4
    assert facts["min_degree"] == 1 and facts["max_degree"] == 4 and facts["regular"] is False
    lam = np.linalg.eigvalsh(pi.toarray())
    assert facts["spectral_gap"] == pytest.approx(1 - max(abs(lam[-2]), abs(lam[0])))
    assert facts["rho"] == pytest.approx(max(abs(lam[-2]), abs(lam[0])) ** 2)
    ring = build_topology("ring", 6)
    assert graph_facts(ring, mixing_matrix(ring))["regular"] is True


# ---------------------------------------------------------------- sparse Pi, dense floats


def dense_reference(g: nx.Graph, scheme: str) -> np.ndarray:
    """Pi as this module built it, densely, before it went sparse: the floats to keep."""
    n = g.number_of_nodes()
    deg = np.array([g.degree(i) for i in range(n)], dtype=np.int64)
    weight = {"uniform": lambda i, j: 1.0 / (deg[i] + 1),
              "metropolis": lambda i, j: 1.0 / (1 + max(deg[i], deg[j])),
              "max_degree": lambda i, j: 1.0 / (1 + int(deg.max()))}[scheme]
    pi = np.zeros((n, n))
    for i, j in g.edges:
        pi[i, j] = pi[j, i] = weight(i, j)
    np.fill_diagonal(pi, 1.0 - pi.sum(axis=1))
    return pi


def dense_neighbours(pi: np.ndarray, i: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    idx = np.flatnonzero((pi[i] > 0) | (np.arange(len(pi)) == i))
    return tuple(int(j) for j in idx), tuple(float(x) for x in pi[i, idx])


LARGER = [("torus", 900, {}), ("exponential", 700, {}), ("grid", 1000, {}), ("star", 300, {}),
          ("random_regular", 600, {"degree": 7, "seed": 1}), ("bipartite", 130, {}),
          ("small_world", 500, {"k": 6, "p": 0.3, "seed": 2}), ("erdos_renyi", 300, {"p": 0.1})]


@pytest.mark.parametrize("name, n, params", [(name, n, sweep_params(name, n))
                                             for name in TOPOLOGIES for n in (5, 9, 16, 33)]
                         + LARGER)
def test_sparse_pi_holds_the_dense_floats(name: str, n: int, params: dict) -> None:
    if not graph_exists(name, params, n):
        return
    g = build_topology(name, n, **params)
    regular = len({d for _, d in g.degree}) == 1
    for scheme in ("uniform", "metropolis", "max_degree") if regular else ("metropolis",
                                                                           "max_degree"):
        ref, pi = dense_reference(g, scheme), mixing_matrix(g, scheme)
        assert np.array_equal(pi.toarray(), ref), scheme
        assert neighbourhoods(pi) == tuple(dense_neighbours(ref, i) for i in range(n))
    # the user matrix path, snapped as before: clipped onto the graph, then symmetrized
    user = ref + np.triu(np.full((n, n), 1e-13), 1) * nx.to_numpy_array(g)
    snapped = np.where(nx.to_numpy_array(g) + np.eye(n) > 0, np.clip(user, 0.0, None), 0.0)
    snapped = (snapped + snapped.T) / 2
    pi = mixing_matrix(g, "matrix", matrix=user.tolist())
    assert np.array_equal(pi.toarray(), snapped)
    assert neighbourhoods(pi) == tuple(dense_neighbours(snapped, i) for i in range(n))


@pytest.mark.parametrize("width", [1, 5, 8, 13, 127, 128, 129, 136, 300, 1000, 8193, 40000])
def test_row_sums_replay_numpys_pairwise_order(width: int) -> None:
    rng = np.random.default_rng(width)
    dense = np.zeros((40, width))
    for row in dense:
        k = int(rng.integers(0, min(width, 60) + 1))
        row[rng.choice(width, k, replace=False)] = rng.random(k) * 10.0 ** rng.uniform(-6, 0, k)
    off = sparse.csr_array(dense)
    assert np.array_equal(topology._dense_row_sums(off), dense.sum(axis=1))


def test_above_spectral_max_the_gap_is_read_off_the_support(monkeypatch) -> None:
    monkeypatch.setattr(topology, "SPECTRAL_MAX", 3)
    ring, complete = build_topology("ring", 4), build_topology("complete", 4)
    pi = mixing_matrix(ring, "uniform")  # connected, with a positive diagonal: it mixes
    assert graph_facts(ring, pi)["spectral_gap"] == "not computed for N > 3"
    assert graph_facts(ring, pi)["rho"] == "not computed for N > 3"
    with pytest.raises(ValueError, match="not computed for N > 3"):
        spectral_gap(pi)
    with pytest.raises(ValueError, match="no spectral gap.*disconnected or periodic"):
        check_mixing(np.eye(4), ring)  # no edge used: disconnected
    with pytest.raises(ValueError, match="no spectral gap"):
        check_mixing(0.5 * nx.to_numpy_array(ring), ring)  # zero diagonal, even cycle: periodic
    check_mixing((np.ones((4, 4)) - np.eye(4)) / 3, complete)  # zero diagonal, odd cycles: mixes


# ---------------------------------------------------------------- property test


@st.composite
def connected_edge_lists(draw):
    n = draw(st.integers(2, 16))
    # a random tree keeps it connected; extra edges vary the degrees
    edges = [[i, draw(st.integers(0, i - 1))] for i in range(1, n)]
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=20))
    edges += [[i, j] for i, j in extra if i != j]
    return n, edges


@settings(max_examples=60, deadline=None)
@given(connected_edge_lists())
def test_random_connected_graphs_mix(case) -> None:
    n, edges = case
    g = build_topology("edges", n, edges=edges)
    assert_valid_graph(g, n)
    for scheme in ("metropolis", "max_degree"):
        pi = mixing_matrix(g, scheme)
        assert_valid_mixing(pi, g)
        for i in range(n):
            idx, w = neighbours(pi, i)
            assert idx.tolist() == sorted({i, *g.neighbors(i)})
            assert w.sum() == pytest.approx(1.0)
            assert neighbourhoods(pi)[i] == (tuple(idx.tolist()), tuple(w.tolist()))
