"""Plans of 10^5 agents: a sparse graph prepares in seconds, with the weights a dense Pi would
give; a plan that cannot fit (a complete graph, FedAvg's all-to-all Pi) is refused at once, from
the config alone, before anything big is built."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_topology import dense_neighbours, dense_reference

from decaf_ray import plan as plan_module
from decaf_ray import topology
from decaf_ray.algorithms import ALGORITHMS
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import load_config
from decaf_ray.plan import plan_bytes, prepare
from decaf_ray.topology import build_topology, mixing_matrix, neighbourhoods

N = 100_000


def _cfg(agents: int, topology_name="ring", algorithm="decaf", **topology_params):
    return load_config({
        "agents": agents, "algorithm": algorithm, "rounds": 1, "local_steps": 1, "seed": 0,
        "topology": {"name": topology_name, **topology_params},
        "task": {"kind": "synthetic", "d": 4, "k": 8, "true_rank": 1, "samples": 2 * N,
                 "test_samples": 10},
        "data": {"partition": "iid", "shots": None, "batch_size": 2},
        "lora": {"rank": 1},
        "runtime": {"kind": "inprocess"},
    })


def test_a_ring_of_100000_agents_prepares_in_seconds() -> None:
    start = time.perf_counter()
    plan = prepare(_cfg(N))
    print(f"\nprepare of {N} agents on a ring: {time.perf_counter() - start:.1f} s")
    assert plan.agents == N and plan.pi.nnz == 3 * N
    third, rest = 1.0 / 3, 1.0 - (1.0 / 3 + 1.0 / 3)  # metropolis: the dense 1 - row sum
    assert plan.neighbours(0) == ((0, 1, N - 1), (rest, third, third))
    assert plan.neighbours(1) == ((0, 1, 2), (third, rest, third))
    assert plan.neighbours(N // 2) == ((N // 2 - 1, N // 2, N // 2 + 1), (third, rest, third))
    assert plan.neighbours(N - 1) == ((0, N - 2, N - 1), (third, third, rest))
    assert sum(len(s) for s in plan.shards) == 2 * N
    facts = topology.graph_facts(plan.graph, plan.pi)
    assert facts["nodes"] == N and facts["edges"] == N and facts["regular"] is True
    assert facts["spectral_gap"] == f"not computed for N > {topology.SPECTRAL_MAX}"


@pytest.mark.parametrize("name, algorithm, params", [
    ("complete", "decaf", {}),
    ("erdos_renyi", "dlora", {"p": 0.5}),
    ("ring", "fedavg", {}),  # every agent averages all N: N^2 weights, whatever the graph
])
def test_a_plan_that_cannot_fit_is_refused_at_once(name, algorithm, params) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^agents: 100000 agents on .* need about "
                                          r"[0-9.]+ GB .* available \(at most about \d+ agents\)$"
                       ) as e:
        prepare(_cfg(N, name, algorithm, **params))
    elapsed = time.perf_counter() - start
    print(f"\nrefused in {elapsed:.3f} s: {e.value}")
    assert "\n" not in str(e.value)
    assert elapsed < 5  # a generous bound: building the graph first would take minutes


def test_the_estimate_grows_with_what_the_plan_holds() -> None:
    ring, complete = _cfg(1000), _cfg(1000, "complete")
    decaf, fedavg, local = ALGORITHMS["decaf"], ALGORITHMS["fedavg"], ALGORITHMS["local"]
    assert plan_bytes(ring, local, 1000) <= plan_bytes(ring, decaf, 1000)
    assert plan_bytes(ring, decaf, 1000) < plan_bytes(complete, decaf, 1000)
    assert plan_bytes(ring, decaf, 1000) < plan_bytes(ring, fedavg, 1000)
    assert plan_bytes(ring, decaf, N) < 0.5e9  # ~0.13 GB measured at the peak
    assert plan_bytes(complete, decaf, N) > 1e12


def test_the_most_agents_named_is_a_plan_that_fits(monkeypatch) -> None:
    class Memory:
        available = 0.2e9

    monkeypatch.setattr(plan_module.psutil, "virtual_memory", lambda: Memory)
    with pytest.raises(ConfigError, match=r"at most about (\d+) agents") as e:
        prepare(_cfg(N, "grid", rows=4))  # rows that divide only some N: counted linearly
    most = int(str(e.value).rsplit("about ", 1)[1].split()[0])
    decaf, fits = ALGORITHMS["decaf"], most - most % 4
    assert 0 < most < N
    assert plan_bytes(_cfg(fits, "grid", rows=4), decaf, fits) <= 0.1e9
    assert plan_bytes(_cfg(fits + 400, "grid", rows=4), decaf, fits + 400) > 0.1e9


@pytest.mark.parametrize("algorithm", ["decaf", "fedavg", "local", "centralized"])
@pytest.mark.parametrize("name, scheme", [("ring", "uniform"), ("star", "metropolis"),
                                          ("torus", "max_degree"), ("exponential", "metropolis")])
def test_plan_neighbourhoods_are_the_dense_ones(algorithm, name, scheme) -> None:
    cfg = _cfg(12, name, algorithm).to_dict()
    plan = prepare(load_config({**cfg, "mixing": {"scheme": scheme}}))
    n = plan.agents
    dense = {"graph": lambda: dense_reference(plan.graph, scheme),
             "server": lambda: np.full((n, n), 1.0 / n),
             "identity": lambda: np.eye(n)}[ALGORITHMS[algorithm].pi]()
    assert plan.neighbourhoods == tuple(dense_neighbours(dense, i) for i in range(n))


def test_algorithm_pis_stay_sparse() -> None:
    pi = mixing_matrix(build_topology("ring", 6), "uniform")
    assert ALGORITHMS["decaf"].mixing(pi) is pi
    local, fedavg = ALGORITHMS["local"].mixing(pi), ALGORITHMS["fedavg"].mixing(pi)
    assert local.nnz == 6 and np.array_equal(local.toarray(), np.eye(6))
    assert fedavg.nnz == 36 and np.array_equal(fedavg.toarray(), np.full((6, 6), 1.0 / 6))
    assert neighbourhoods(local)[2] == ((2,), (1.0,))
    assert neighbourhoods(fedavg)[2] == (tuple(range(6)), (1.0 / 6,) * 6)
