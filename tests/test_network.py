"""The network of each round (issue 18): schedules, participation, churn, link failures,
stragglers, the round's Pi, ``describe``, and the ``network:`` config's errors."""

import json

import numpy as np
import pytest

from decaf_ray import topology
from decaf_ray.algorithms import ALGORITHMS
from decaf_ray.config import ConfigError, MixingConfig, TopologyConfig, from_dict
from decaf_ray.experiment_config import load_config, self_contained
from decaf_ray.network import Schedule
from decaf_ray.network_config import (AvailabilityConfig, CompressConfig, NetworkConfig,
                                      StragglersConfig, read_trace)
from decaf_ray.network_graphs import MarkovAvailability, one_peer_exponential
from decaf_ray.plan import prepare

BASE = {"task": {"kind": "synthetic"}}


def schedule(n=8, topo="ring", scheme="metropolis", kind="graph", seed=0, local_steps=1,
             **network):
    """A Schedule built as the integration will: the plan's graph and Pi, the config's parts."""
    tcfg = from_dict(TopologyConfig, topo)
    graph = topology.build_topology(tcfg.name, n, **tcfg.params)
    algorithm = ALGORITHMS[{"graph": "decaf", "server": "fedavg", "identity": "local"}[kind]]
    pi = algorithm.mixing(topology.mixing_matrix(graph, scheme))  # what Plan.pi holds
    parts = {"availability": AvailabilityConfig, "stragglers": StragglersConfig}
    net = NetworkConfig(**{k: parts[k](**v) if isinstance(v, dict) and k in parts else v
                           for k, v in network.items()})
    return Schedule(graph, pi, n, net, MixingConfig(scheme), kind, seed, local_steps, tcfg)


def dense(net, n):
    """The round's Pi as an (n, n) array from its neighbourhoods (inactive rows stay zero)."""
    out = np.zeros((n, n))
    for i, (ids, weights) in net.neighbourhoods.items():
        out[i, list(ids)] = weights
    return out


def test_static_default_is_the_plans_own_neighbourhoods_every_round():
    for algorithm, kind in (("decaf", "graph"), ("fedavg", "server"), ("local", "identity")):
        cfg = load_config({**BASE, "agents": 6, "topology": "ring", "algorithm": algorithm,
                           "local_steps": 3})
        plan = prepare(cfg)
        s = Schedule(plan.graph, plan.pi, plan.agents, cfg.network, cfg.mixing,
                     plan.algorithm.pi, cfg.seed, cfg.local_steps, cfg.topology)
        assert s.static and plan.algorithm.pi == kind
        for rnd in (57, 1, 2):  # resume asks a late round first
            net = s.round(rnd)
            assert net.round == rnd and net.active == tuple(range(6))
            assert net.neighbourhoods == dict(enumerate(plan.neighbourhoods))  # same floats
            assert net.steps == {i: 3 for i in range(6)}
        assert net.edges_up == {"graph": 6, "server": 15, "identity": 0}[kind]
        assert net.spectral_gap == pytest.approx(topology.spectral_gap(plan.pi))


CHANGING = [
    {"participation": 0.6},
    {"link_failure": 0.4},
    {"participation": 0.7, "link_failure": 0.3, "availability": {"mean_up": 3, "mean_down": 2}},
    {"schedule": "one_peer_exponential", "participation": 0.8},
    {"schedule": "random_matching", "link_failure": 0.2},
]


@pytest.mark.parametrize("scheme", ["metropolis", "max_degree"])
@pytest.mark.parametrize("network", CHANGING)
def test_round_pi_is_symmetric_doubly_stochastic_on_the_active_agents(network, scheme):
    n = 10
    s = schedule(n, "torus", scheme, **network)
    for rnd in range(1, 21):
        net = s.round(rnd)
        pi, on = dense(net, n), np.isin(np.arange(n), net.active)
        assert set(net.neighbourhoods) == set(net.active) == set(net.steps)
        assert np.array_equal(pi, pi.T) and (pi >= 0).all()
        assert np.allclose(pi.sum(axis=1)[on], 1) and np.allclose(pi.sum(axis=0)[on], 1)
        assert not pi[~on].any() and not pi[:, ~on].any()  # the inactive take no part
        for i, (ids, _) in net.neighbourhoods.items():
            assert i in ids and list(ids) == sorted(ids)
        assert net.edges_up == int((np.triu(pi, 1) > 0).sum())


def test_round_edges_are_the_schedules_graph_among_active_agents():
    n = 9
    s = schedule(n, "torus", participation=0.7, link_failure=0.3)
    graph = topology.build_topology("torus", n)
    for rnd in range(1, 11):
        pi = dense(s.round(rnd), n)
        for i, j in zip(*np.nonzero(np.triu(pi, 1))):
            assert graph.has_edge(i, j)


def test_resample_draws_a_fresh_graph_each_round_from_seed_and_round():
    topo = {"name": "erdos_renyi", "p": 0.4, "seed": 3}
    a, b = schedule(12, topo, schedule="resample"), schedule(12, topo, schedule="resample")
    assert not a.static
    late = b.round(40)  # asked first here, after rounds 1..39 there
    first = [dense(a.round(r), 12) for r in range(1, 41)]
    assert np.array_equal(first[-1], dense(late, 12))
    assert not np.array_equal(first[0], first[1])
    assert len({f.tobytes() for f in first}) > 30
    assert not np.array_equal(first[0], dense(schedule(12, topo, seed=1, schedule="resample")
                                              .round(1), 12))
    for f in first:  # each draw is connected (build_topology redraws until it is)
        assert np.linalg.eigvalsh(f)[-2] < 1 - 1e-9


def test_one_peer_exponential_neighbours():
    n = 8
    s = schedule(n, "complete", schedule="one_peer_exponential")
    for rnd, d in ((1, 1), (2, 2), (3, 4), (4, 1)):
        net = s.round(rnd)
        for i in range(n):
            assert set(net.neighbourhoods[i][0]) == {i, (i + d) % n, (i - d) % n}
    assert s.round(3).edges_up == 4  # offset n/2: one partner each
    offsets = {tuple(map(tuple, one_peer_exponential(6, r))) for r in (1, 2, 3)}
    assert len(offsets) == 2  # n = 6: ceil(log2 6) = 3 offsets 1, 2, 4; 4 mirrors 2


@pytest.mark.parametrize("n", [8, 7])
def test_random_matching_is_a_matching(n):
    s = schedule(n, "complete", schedule="random_matching")
    pairs = set()
    for rnd in range(1, 11):
        net = s.round(rnd)
        sizes = [len(ids) for ids, _ in net.neighbourhoods.values()]
        assert sorted(sizes) == [1] * (n % 2) + [2] * (n - n % 2)
        assert all(w == (0.5, 0.5) for ids, w in net.neighbourhoods.values() if len(ids) == 2)
        pairs.add(tuple(sorted(tuple(ids) for ids, _ in net.neighbourhoods.values())))
    assert len(pairs) > 5


def test_participation_rate_and_determinism():
    n, rounds, p = 50, 400, 0.3
    s = schedule(n, "complete", participation=p)
    active = np.array([s.active_mask(r) for r in range(1, rounds + 1)])
    # 20000 independent coins: sd sqrt(p (1 - p) / 20000) = 0.0032; 0.02 is over 6 sd
    assert abs(active.mean() - p) < 0.02
    assert s.round(7) == schedule(n, "complete", participation=p).round(7)


def test_markov_availability_means_and_stationary_share():
    n, rounds, up, down = 200, 2000, 8.0, 4.0
    chain = MarkovAvailability(n, up, down, seed=5)
    states = np.array([chain.up(r) for r in range(1, rounds + 1)])
    # stationary share 2/3; rounds are correlated (mixing time ~ 3 rounds), the sd of the mean
    # over 400 000 agent-rounds is still below 0.002
    assert abs(states.mean() - up / (up + down)) < 0.02
    runs = {True: [], False: []}
    for col in states.T:
        edges = np.flatnonzero(np.diff(col.astype(int))) + 1
        bounds = np.r_[0, edges, rounds]
        for a, b in zip(bounds[1:-2], bounds[2:-1]):  # complete stays only (not the first/last)
            runs[bool(col[a])].append(b - a)
    # geometric stays: ~30 000 up runs of sd ~7.5 and ~30 000 down runs of sd ~3.5
    assert abs(np.mean(runs[True]) - up) < 0.3 and abs(np.mean(runs[False]) - down) < 0.2
    fresh = MarkovAvailability(n, up, down, seed=5)
    assert np.array_equal(fresh.up(1500), states[1499])  # any order of asking


def test_availability_and_participation_combine():
    s = schedule(20, "complete", participation=0.5,
                 availability={"mean_up": 4, "mean_down": 2})
    chain = MarkovAvailability(20, 4, 2, seed=0)
    coins_only = schedule(20, "complete", participation=0.5)
    for rnd in range(1, 30):
        assert np.array_equal(s.active_mask(rnd), chain.up(rnd) & coins_only.active_mask(rnd))


@pytest.mark.parametrize("form", ["json", "csv", "inline"])
def test_trace_gives_the_active_agents_of_each_round(tmp_path, form):
    rows = [[0, 1, 2], [3], [], [1, 3]]
    path = tmp_path / f"t.{form}"
    if form == "json":
        path.write_text(json.dumps(rows))
    elif form == "csv":
        path.write_text("0,1,2\n3\n\n1, 3\n")
    trace = rows if form == "inline" else str(path)
    assert read_trace(trace) == rows
    cfg = load_config({**BASE, "agents": 4, "rounds": 4,
                       "network": {"availability": {"trace": trace}}})
    s = schedule(4, "complete", availability=cfg.network.availability)
    assert [s.round(r).active for r in (4, 1, 2, 3)] == [(1, 3), (0, 1, 2), (3,), ()]
    assert self_contained(cfg).network.availability.trace == rows
    with pytest.raises(ValueError, match="past the availability trace"):
        s.round(5)


def test_link_failure_rate():
    n, rounds, p = 20, 100, 0.3
    s = schedule(n, "complete", link_failure=p)
    up = np.mean([s.round(r).edges_up for r in range(1, rounds + 1)]) / (n * (n - 1) / 2)
    assert abs(up - (1 - p)) < 0.02  # 19 000 coins: sd 0.0033


def test_stragglers_run_fewer_steps_and_are_fixed():
    s = schedule(10, "ring", local_steps=5, stragglers={"fraction": 0.3, "speed": 0.5})
    assert len(s.stragglers) == 3
    for rnd in (1, 9):
        steps = s.round(rnd).steps
        assert {i for i, k in steps.items() if k == 3} == set(s.stragglers)  # round(2.5) = 3
        assert all(k == 5 for i, k in steps.items() if i not in s.stragglers)
    assert s.speeds.tolist() == [0.5 if i in s.stragglers else 1.0 for i in range(10)]
    slow = schedule(10, "ring", local_steps=5, stragglers={"fraction": 0.3, "speed": 0.05})
    assert min(slow.round(1).steps.values()) == 1 and slow.stragglers == s.stragglers


def test_isolated_agents_keep_their_own_and_server_and_identity_kinds():
    s = schedule(6, "ring", link_failure=0.6)
    nets = [s.round(r) for r in range(1, 20)]
    alone = [(net, i) for net in nets for i, (ids, _) in net.neighbourhoods.items()
             if ids == (i,)]
    assert alone and all(net.neighbourhoods[i] == ((i,), (1.0,)) for net, i in alone)
    assert all(net.spectral_gap == 0.0 for net, _ in alone)
    server = schedule(6, "ring", kind="server", participation=0.5)
    for rnd in range(1, 10):
        net = server.round(rnd)
        m = len(net.active)
        assert all(nb == (net.active, (1.0 / m,) * m) for nb in net.neighbourhoods.values())
        assert net.spectral_gap == (1.0 if m else 0.0)
    local = schedule(6, "ring", kind="identity", participation=0.5).round(3)
    assert local.neighbourhoods == {i: ((i,), (1.0,)) for i in local.active}


def test_server_and_identity_ignore_graph_changes_when_everyone_is_present():
    for kind in ("server", "identity"):
        s = schedule(6, "ring", kind=kind, link_failure=0.5, schedule="one_peer_exponential")
        assert s.static and s.round(3).active == tuple(range(6))
        if kind == "server":
            assert s.round(3).neighbourhoods == {i: (tuple(range(6)), (1 / 6,) * 6)
                                                 for i in range(6)}
        else:
            assert s.round(3).neighbourhoods == {i: ((i,), (1.0,)) for i in range(6)}


def test_an_empty_round_is_allowed():
    s = schedule(3, "complete", participation=0.05)
    net = next(s.round(r) for r in range(1, 50) if not s.round(r).active)
    assert net.neighbourhoods == {} and net.steps == {} and net.edges_up == 0
    assert net.spectral_gap == 0.0


def test_describe_reports_means_and_union_connectivity():
    s = schedule(8, "complete", schedule="one_peer_exponential")
    # offsets 1, 2, 4: a ring (connected), two 4-cycles, a matching; any 3 rounds give it all
    one = s.describe(6, 1)
    assert one["disconnected_windows"] == 4 and not one["union_connected"]
    three = s.describe(6, 3)
    assert three["union_connected"] and three["mean_active"] == 8.0
    assert three["mean_edges_up"] == pytest.approx((8 + 8 + 4) / 3)
    static = schedule(8, "ring").describe(100, 1)
    assert static["union_connected"] and static["mean_edges_up"] == 8
    assert static["mean_spectral_gap"] == pytest.approx(
        topology.spectral_gap(topology.mixing_matrix(topology.build_topology("ring", 8))))


def test_config_shorthands_defaults_and_round_trip():
    cfg = load_config({**BASE, "network": {"compress": "int8", "time": {}}})
    assert cfg.network.compress == CompressConfig(kind="int8")
    assert cfg.network.time.bandwidth_mbps == 100.0
    assert load_config(cfg.to_dict()) == cfg
    default = load_config(BASE)
    assert default.network == NetworkConfig() and default.network.static
    assert default.network.compress == CompressConfig()
    topk = load_config({**BASE, "network": {"compress": {"kind": "topk", "ratio": 0.1,
                                                          "error_feedback": True}}})
    assert topk.network.compress.ratio == 0.1 and topk.network.compress.error_feedback


@pytest.mark.parametrize("data, field, words", [
    ({"network": {"participation": 0}}, "network.participation", "(0, 1]"),
    ({"network": {"participation": 1.5}}, "network.participation", "(0, 1]"),
    ({"network": {"link_failure": 1.0}}, "network.link_failure", "[0, 1)"),
    ({"network": {"schedule": "gossip"}}, "network.schedule", "valid: static, resample"),
    ({"network": {"schedule": "resample"}}, "network.schedule", "erdos_renyi"),
    ({"topology": "ring", "mixing": "uniform", "network": {"participation": 0.5}},
     "mixing.scheme", "network.participation"),
    ({"agents": 7, "mixing": "uniform", "network": {"schedule": "random_matching"}},
     "mixing.scheme", "odd number of agents"),
    ({"topology": {"name": "erdos_renyi", "p": 0.5}, "mixing": "uniform",
      "network": {"schedule": "resample"}}, "mixing.scheme", "resample of erdos_renyi"),
    ({"mixing": {"scheme": "matrix", "matrix": [[1.0]]}, "agents": 1,
      "network": {"link_failure": 0.1}}, "mixing.scheme", "metropolis"),
    ({"network": {"availability": {"mean_up": 0.5, "mean_down": 2}}},
     "network.availability.mean_up", ">= 1"),
    ({"network": {"availability": {"mean_up": 3}}}, "network.availability.mean_down", ">= 1"),
    ({"network": {"availability": {}}}, "network.availability.trace", "exactly one"),
    ({"network": {"availability": {"mean_up": 2, "mean_down": 2, "trace": [[0]]}}},
     "network.availability.trace", "exactly one"),
    ({"rounds": 3, "network": {"availability": {"trace": [[0], [1]]}}},
     "network.availability.trace", "at least rounds = 3"),
    ({"rounds": 1, "network": {"availability": {"trace": [[10]]}}},
     "network.availability.trace", "valid ids: 0..9"),
    ({"network": {"availability": {"trace": "no/such/trace.json"}}},
     "network.availability.trace", "cannot read"),
    ({"network": {"compress": "topk"}}, "network.compress.ratio", "(0, 1]"),
    ({"network": {"compress": {"kind": "int8", "ratio": 0.5}}}, "network.compress.ratio",
     "only kind topk"),
    ({"network": {"compress": {"kind": "float32", "error_feedback": True}}},
     "network.compress.error_feedback", "float16"),
    ({"network": {"compress": "int4"}}, "network.compress.kind", "valid: float32"),
    ({"network": {"stragglers": {"fraction": 1.5}}}, "network.stragglers.fraction", "[0, 1]"),
    ({"network": {"stragglers": {"speed": 0}}}, "network.stragglers.speed", "(0, 1]"),
    ({"network": {"time": {"bandwidth_mbps": 0}}}, "network.time.bandwidth_mbps", "> 0"),
    ({"network": {"time": {"step_s": -1}}}, "network.time.step_s", ">= 0"),
    ({"algorithm": "centralized", "network": {"participation": 0.5}},
     "network.participation", "centralized"),
])
def test_bad_network_values_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, **data})
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_a_matrix_on_a_changing_network_is_refused_by_the_schedule_too():
    graph = topology.build_topology("complete", 2)
    pi = topology.mixing_matrix(graph)
    with pytest.raises(ValueError, match="matrix"):
        Schedule(graph, pi, 2, NetworkConfig(participation=0.5),
                 MixingConfig("matrix", pi.toarray().tolist()), "graph", 0, 1, TopologyConfig())


def test_the_schedule_is_pure_it_imports_no_torch():
    """network and network_graphs seed through decaf_ray.seeding, so they load without torch."""
    import subprocess
    import sys

    code = ("import sys, decaf_ray.network, decaf_ray.network_graphs, decaf_ray.seeding\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
