"""Tests for decaf_ray.topology: graphs, mixing matrices and their checks."""

from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decaf_ray.topology import (
    SCHEMES,
    TOPOLOGIES,
    build_topology,
    check_mixing,
    graph_facts,
    is_connected,
    mixing_matrix,
    neighbours,
    spectral_gap,
)

NS = range(2, 41)


def sweep_params(name: str, n: int) -> dict:
    """Sensible params for each topology; random_regular's may be invalid for some n on purpose."""
    return {
        "erdos_renyi": {"p": 0.5, "seed": n},
        "random_regular": {"degree": 3, "seed": n},
        "edges": {"edges": [[i, i + 1] for i in range(n - 1)] + [[0, n - 1]] * (n > 3)},
    }.get(name, {})


def graph_exists(name: str, params: dict, n: int) -> bool:
    if name == "random_regular":
        d = params["degree"]
        return d < n and (n * d) % 2 == 0
    return True


def assert_valid_mixing(pi: np.ndarray, g: nx.Graph) -> None:
    """The properties check_mixing promises, asserted independently of it."""
    n = g.number_of_nodes()
    assert pi.shape == (n, n) and pi.dtype == np.float64
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


def assert_valid_graph(g: nx.Graph, n: int) -> None:
    assert sorted(g.nodes) == list(range(n))
    assert not g.is_directed() and not g.is_multigraph()
    assert nx.number_of_selfloops(g) == 0
    assert nx.is_connected(g) and is_connected(g)


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
        if scheme == "uniform":
            deg = g.degree(0)
            assert np.allclose(pi[0][pi[0] > 0], 1.0 / (deg + 1))
        # the user-matrix path accepts what the built-in schemes produce, as a nested list
        np.testing.assert_allclose(mixing_matrix(g, "matrix", matrix=pi.tolist()), pi, atol=1e-15)
    assert set(SCHEMES) == {"uniform", "metropolis", "max_degree", "matrix"}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_single_agent(name: str) -> None:
    params = {"erdos_renyi": {"p": 0.5}, "random_regular": {"degree": 0}, "edges": {"edges": []}}
    g = build_topology(name, 1, **params.get(name, {}))
    assert list(g.nodes) == [0] and g.number_of_edges() == 0
    for scheme in ("uniform", "metropolis", "max_degree"):
        pi = mixing_matrix(g, scheme)
        assert pi.tolist() == [[1.0]]
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
    assert np.allclose(mixing_matrix(g, "uniform"), 0.5)


def test_complete_of_10_uniform() -> None:
    pi = mixing_matrix(build_topology("complete", 10), "uniform")
    np.testing.assert_allclose(pi, np.full((10, 10), 0.1), atol=1e-15)
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


def test_exponential_n8_by_hand() -> None:
    # offsets +-1, +-2, +-4 (j = 0, 1, 2 = floor(log2 7)); +4 and -4 coincide mod 8
    expected = {
        (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (0, 7),
        (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (0, 6), (1, 7),
        (0, 4), (1, 5), (2, 6), (3, 7),
    }  # fmt: skip
    g = build_topology("exponential", 8)
    assert {tuple(sorted(e)) for e in g.edges} == expected
    assert all(d == 5 for _, d in g.degree)
    # n=5: offsets 1, 2, 4 = -1 mod 5 give the complete graph
    assert build_topology("exponential", 5).number_of_edges() == 10


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


def test_bipartite_is_even_odd_complete_bipartite() -> None:
    for n in range(2, 12):
        g = build_topology("bipartite", n)
        assert all((i + j) % 2 == 1 for i, j in g.edges)
        assert g.number_of_edges() == (n // 2) * ((n + 1) // 2)
        assert (len({d for _, d in g.degree}) == 1) == (n % 2 == 0)
    assert mixing_matrix(build_topology("bipartite", 6), "uniform")[0, 1] == pytest.approx(1 / 4)


def test_grid_and_torus_shapes() -> None:
    g = build_topology("grid", 12)  # default 3 x 4
    assert g.number_of_edges() == 3 * 3 + 2 * 4
    assert g.has_edge(0, 1) and g.has_edge(0, 4) and not g.has_edge(3, 4)
    assert build_topology("grid", 12, rows=2).number_of_edges() == 2 * 5 + 6
    assert nx.is_isomorphic(build_topology("grid", 7), nx.path_graph(7))  # prime n: a path
    t = build_topology("torus", 6, rows=2)  # side 2 would give duplicate vertical edges
    assert isinstance(t, nx.Graph) and not t.is_multigraph()
    assert all(d == 3 for _, d in t.degree) and t.number_of_edges() == 9
    assert nx.is_isomorphic(build_topology("torus", 4), nx.cycle_graph(4))
    assert nx.is_isomorphic(build_topology("torus", 5, rows=1), nx.cycle_graph(5))
    assert all(d == 4 for _, d in build_topology("torus", 16).degree)
    with pytest.raises(ValueError, match=r"rows=3 does not divide n=10; valid rows: 1, 2, 5, 10"):
        build_topology("grid", 10, rows=3)


def test_random_regular_has_requested_degree() -> None:
    g = build_topology("random_regular", 20, degree=4, seed=1)
    assert all(d == 4 for _, d in g.degree)
    with pytest.raises(ValueError, match="n\\*degree even"):
        build_topology("random_regular", 9, degree=3)
    with pytest.raises(ValueError, match="degree=9 is out of range"):
        build_topology("random_regular", 9, degree=9)


def test_small_world_params() -> None:
    g = build_topology("small_world", 20, k=6, p=0.2, seed=3)
    assert g.number_of_edges() == 60  # rewiring keeps the edge count n * k / 2
    again = build_topology("small_world", 20, k=6, p=0.2, seed=3)
    assert sorted(g.edges) == sorted(again.edges)
    with pytest.raises(ValueError, match="k=30 is out of range"):
        build_topology("small_world", 20, k=30)
    with pytest.raises(ValueError, match=r"p=1.5 is out of range; valid: \[0, 1\]"):
        build_topology("small_world", 20, p=1.5)


def test_erdos_renyi_is_deterministic_for_a_seed() -> None:
    a = build_topology("erdos_renyi", 25, p=0.2, seed=7)
    b = build_topology("erdos_renyi", 25, p=0.2, seed=7)
    c = build_topology("erdos_renyi", 25, p=0.2, seed=8)
    assert sorted(a.edges) == sorted(b.edges)
    assert sorted(a.edges) != sorted(c.edges)
    # p so small that no draw is connected: a clear error, not a hang or a disconnected graph
    with pytest.raises(ValueError, match="no connected graph in 100 draws"):
        build_topology("erdos_renyi", 30, p=0.01)


# ---------------------------------------------------------------- user edge lists


def test_edges_from_list_file_and_json(tmp_path) -> None:
    pairs = [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]
    g = build_topology("edges", 4, edges=pairs)
    assert {tuple(sorted(e)) for e in g.edges} == {tuple(sorted(p)) for p in pairs}
    txt = tmp_path / "g.txt"
    txt.write_text("# a square with a chord\n0 1\n1 2\n\n2 3  # comment\n3 0\n0 2\n")
    js = tmp_path / "g.json"
    js.write_text(json.dumps(pairs))
    for path in (txt, str(js)):
        assert sorted(build_topology("edges", 4, path=path).edges) == sorted(g.edges)


def test_edges_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"graph is disconnected \(2 components\)"):
        build_topology("edges", 4, edges=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"graph is disconnected \(3 components\)"):
        build_topology("edges", 4, edges=[[0, 1]])
    with pytest.raises(ValueError, match="edge node id=4 is out of range; valid: 0..3"):
        build_topology("edges", 4, edges=[[0, 4]])
    with pytest.raises(ValueError, match="self loop"):
        build_topology("edges", 2, edges=[[0, 1], [1, 1]])
    with pytest.raises(ValueError, match="not an \\[i, j\\] pair"):
        build_topology("edges", 3, edges=[[0, 1, 2]])
    with pytest.raises(ValueError, match="exactly one of"):
        build_topology("edges", 3)
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\n1 2 3\n")
    with pytest.raises(ValueError, match=":2: expected 'i j'"):
        build_topology("edges", 3, path=bad)


# ---------------------------------------------------------------- name and param errors


def test_unknown_topology_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown topology 'rng'; valid: complete, ring") as e:
        build_topology("rng", 5)
    assert all(name in str(e.value) for name in TOPOLOGIES)
    assert "\n" not in str(e.value)


def test_param_errors() -> None:
    with pytest.raises(ValueError, match="'ring' got unknown param\\(s\\) rows; valid: none"):
        build_topology("ring", 5, rows=1)
    with pytest.raises(ValueError, match="'grid' got unknown param\\(s\\) cols; valid: rows"):
        build_topology("grid", 6, cols=3)
    with pytest.raises(ValueError, match="'erdos_renyi' is missing param\\(s\\) p; valid: p, seed"):
        build_topology("erdos_renyi", 5)
    with pytest.raises(ValueError, match=r"p=0.0 is out of range; valid: \(0, 1\]"):
        build_topology("erdos_renyi", 5, p=0)
    with pytest.raises(ValueError, match="n=0 is out of range"):
        build_topology("complete", 0)
    with pytest.raises(ValueError, match="n must be an integer"):
        build_topology("complete", 2.5)
    with pytest.raises(ValueError, match="seed must be an integer"):
        build_topology("erdos_renyi", 5, p=0.5, seed="a")


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
    pi = mixing_matrix(g, "uniform")
    np.save(tmp_path / "pi.npy", pi)
    np.savetxt(tmp_path / "pi.csv", pi, delimiter=",")
    np.savetxt(tmp_path / "pi.txt", pi)
    for name in ("pi.npy", "pi.csv", "pi.txt"):
        loaded = mixing_matrix(g, "matrix", matrix=str(tmp_path / name))
        np.testing.assert_allclose(loaded, pi, atol=1e-15)
    with pytest.raises(ValueError, match="valid suffixes: .npy, .csv, .txt"):
        mixing_matrix(g, "matrix", matrix=str(tmp_path / "pi.mat"))


def test_user_matrix_errors() -> None:
    g = build_topology("ring", 4)
    good = mixing_matrix(g, "uniform")
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
    noisy = mixing_matrix(g, "uniform")
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
    lam = np.linalg.eigvalsh(pi)
    assert facts["spectral_gap"] == pytest.approx(1 - max(abs(lam[-2]), abs(lam[0])))
    assert facts["rho"] == pytest.approx(max(abs(lam[-2]), abs(lam[0])) ** 2)
    ring = build_topology("ring", 6)
    assert graph_facts(ring, mixing_matrix(ring))["regular"] is True


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
