"""Tests for decaf_ray.topology_graphs: the named graphs, their params and their edge counts."""

from __future__ import annotations

import json

import networkx as nx
import pytest

from decaf_ray.topology import mixing_matrix
from decaf_ray.topology_graphs import TOPOLOGIES, build_topology, edge_count, is_connected

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


def assert_valid_graph(g: nx.Graph, n: int) -> None:
    assert sorted(g.nodes) == list(range(n))
    assert not g.is_directed() and not g.is_multigraph()
    assert nx.number_of_selfloops(g) == 0
    assert nx.is_connected(g) and is_connected(g)


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


@pytest.mark.parametrize("n", [1, *NS, 64, 100, 257])
@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_edge_count_is_what_the_builder_makes(name: str, n: int) -> None:
    single = {"erdos_renyi": {"p": 0.5}, "random_regular": {"degree": 0}, "edges": {"edges": []}}
    params = sweep_params(name, n) if n > 1 else single.get(name, {})
    if name == "erdos_renyi":  # the expectation p n (n - 1) / 2, not a draw
        assert edge_count(name, n, **params) == round(params["p"] * n * (n - 1) / 2)
        return
    if not graph_exists(name, params, n):
        return
    assert edge_count(name, n, **params) == build_topology(name, n, **params).number_of_edges()


def test_edge_count_of_params_and_huge_n() -> None:
    assert edge_count("small_world", 20, k=6) == 60 and edge_count("small_world", 5, k=5) == 10
    assert edge_count("torus", 6, rows=2) == 9 and edge_count("grid", 12, rows=2) == 16
    assert edge_count("edges", 4, edges=[[0, 1], [1, 0], [1, 2]]) == 3  # repeats: an upper bound
    assert edge_count("complete", 10**5) == 4_999_950_000  # counted, not built
    assert edge_count("erdos_renyi", 10**5, p=0.5) == 2_499_975_000
    with pytest.raises(ValueError, match="'erdos_renyi' is missing param\\(s\\) p"):
        edge_count("erdos_renyi", 5)
    with pytest.raises(ValueError, match="rows=3 does not divide n=10"):
        edge_count("grid", 10, rows=3)
    with pytest.raises(ValueError, match="unknown topology 'rng'"):
        edge_count("rng", 5)
