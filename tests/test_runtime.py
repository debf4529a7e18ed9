"""Every algorithm end to end on the synthetic task, with the in-process runtime."""

import math

import numpy as np
import pandas as pd
import pytest

from decaf_ray.experiment_config import load_config
from decaf_ray.experiment import run
from decaf_ray.plan import prepare

NONIID_RING = {
    "agents": 6, "topology": "ring", "rounds": 60, "local_steps": 2, "eval_every": 20, "seed": 3,
    "task": {"kind": "synthetic", "form": "classification", "d": 6, "k": 16, "true_rank": 2,
             "samples": 600, "test_samples": 300},
    "data": {"partition": "classes_per_agent", "batch_size": 16},
    "lora": {"rank": 2, "alpha": 2.0},
    "optim": {"name": "sgd", "lr": 0.5},
    "runtime": {"kind": "inprocess"},
}


def _cfg(**over):
    return load_config({**NONIID_RING, **over})


def _final(result, metric, agent=-1):
    rows = [r for r in result.rows if r["metric"] == metric and r["agent"] == agent]
    return rows[-1]["value"]


@pytest.fixture(scope="module")
def results():
    return {name: run(_cfg(algorithm=name), progress=False)
            for name in ["decaf", "dlora", "dlora_fa", "fedavg", "fedavg_fa", "local", "local_fa",
                         "centralized"]}


def test_every_algorithm_completes(results):
    for name, res in results.items():
        assert res.status == "completed", name
        assert res.summary["rounds_completed"] == 60
        assert math.isfinite(_final(res, "test_loss"))


def test_decentralized_algorithms_learn_and_reach_consensus_local_does_not(results):
    start = {n: [r for r in res.rows if r["metric"] == "test_accuracy" and r["agent"] == -1][0]["value"]
             for n, res in results.items()}
    for name in ["decaf", "dlora", "fedavg"]:
        acc = _final(results[name], "test_accuracy")
        assert acc > start[name] + 0.3, (name, start[name], acc)
        assert acc > _final(results["local"], "test_accuracy") + 0.2, name
        # consensus: the agents' updates are much closer to each other than Local's are
        assert (_final(results[name], "consensus_distance")
                < 0.2 * _final(results["local"], "consensus_distance")), name
        assert _final(results[name], "shift_error") < 0.3, name  # near the planted answer
    # Local on one class per agent: each agent fits its own class only, the frozen W0's
    # accuracy barely moves and the agents drift apart
    assert _final(results["local"], "test_accuracy") < start["local"] + 0.1
    assert _final(results["local"], "shift_error") > 0.8


def test_fa_variants_communicate_half_and_train_only_b(results):
    assert (results["dlora_fa"].summary["trainable_params_per_agent"]
            < results["dlora"].summary["trainable_params_per_agent"])
    assert results["local"].summary["floats_sent_per_round_per_agent"] == 0
    # ring: 2 neighbours each; FedAvg: one upload each plus the server's broadcast (N + 1)
    n = results["fedavg"].summary["agents"]
    assert results["fedavg"].summary["floats_sent_per_round_per_agent"] * 2 * n / (n + 1) == \
        pytest.approx(results["dlora"].summary["floats_sent_per_round_per_agent"], rel=1e-12)
    first = results["dlora_fa"].factors[0]
    for f in results["dlora_fa"].factors.values():
        for n in f:
            assert np.array_equal(f[n][0].numpy(), first[n][0].numpy())  # the shared frozen A


def test_centralized_is_one_agent_on_all_data(results):
    res = results["centralized"]
    assert res.summary["agents"] == 1 and list(res.factors) == [0]
    assert _final(res, "test_accuracy") > 0.6


def test_diagnostics_are_reported(results):
    for name in ["decaf", "dlora"]:
        assert _final(results[name], "interference") >= 0
        assert _final(results[name], "tsvd_error") <= _final(results[name], "prop1_bound") + 1e-9
    assert _final(results["dlora"], "interference") > 0


def test_fedavg_equals_dlora_on_the_complete_graph_with_uniform_pi():
    over = dict(topology="complete", mixing="uniform", rounds=10, eval_every=5)
    a = run(_cfg(algorithm="fedavg", **over), progress=False)
    b = run(_cfg(algorithm="dlora", **over), progress=False)
    key = lambda rows: [(r["round"], r["agent"], r["metric"], r["value"]) for r in rows
                        if r["metric"] not in ("floats_sent", "bytes_sent", "sim_time_s",
                                               "spectral_gap")]  # the server's is 1.0 exactly
    assert key(a.rows) == key(b.rows)


def test_same_config_and_seed_same_numbers():
    a = run(_cfg(algorithm="decaf", rounds=8, eval_every=4), progress=False)
    b = run(_cfg(algorithm="decaf", rounds=8, eval_every=4), progress=False)
    c = run(_cfg(algorithm="decaf", rounds=8, eval_every=4, seed=4), progress=False)
    values = lambda res: [r["value"] for r in res.rows]
    assert values(a) == values(b)
    assert values(a) != values(c)


def test_decaf_with_one_local_step_and_sgd_never_leaves_zero_product():
    # Algorithm 1's order from B = 0: after each step one of A, B is zero, so the TSVD of the
    # mixed product is zero at every round. Two local steps (or momentum) escape it.
    stuck = run(_cfg(algorithm="decaf", local_steps=1, rounds=10, eval_every=10), progress=False)
    for f in stuck.factors.values():
        for a, b in f.values():
            assert float((b @ a).abs().max()) == 0.0
    moving = run(_cfg(algorithm="decaf", local_steps=1, rounds=10, eval_every=10,
                      optim={"name": "momentum", "lr": 0.1}), progress=False)
    assert any(float((b @ a).abs().max()) > 0 for f in moving.factors.values() for a, b in f.values())


def test_divergence_is_recorded_not_raised():
    res = run(_cfg(algorithm="dlora", optim={"name": "sgd", "lr": 1e6}, rounds=30), progress=False)
    assert res.status == "diverged"
    assert res.summary["diverged_at"]["step"] >= 1
    assert res.summary["rounds_completed"] < 30


@pytest.mark.parametrize("opt", ["momentum", "adam", "adamw"])
def test_optimizers_train(opt):
    res = run(_cfg(algorithm="dlora", rounds=30, eval_every=30,
                   optim={"name": opt, "lr": 0.2,
                          "schedule": "cosine", "warmup_steps": 5}), progress=False)
    start = [r for r in res.rows if r["metric"] == "test_loss" and r["agent"] == -1][0]["value"]
    assert _final(res, "test_loss") < 0.8 * start


def test_rows_are_long_form_and_cover_every_agent():
    res = run(_cfg(algorithm="decaf", rounds=4, eval_every=2), progress=False)
    df = pd.DataFrame(res.rows)
    assert list(df.columns) == ["round", "step", "agent", "metric", "value"]
    assert sorted(df["round"].unique()) == [0, 2, 4]
    assert set(df.agent.unique()) == set(range(6)) | {-1}
    assert {"grad_norm_sq", "consensus_distance", "floats_sent"} <= set(df[df.agent == -1].metric)
    assert df[df["round"] == 4]["step"].unique().tolist() == [8]


def test_partition_reaches_agents():
    plan = prepare(_cfg())
    labels = plan.task.train_labels
    for i, shard in enumerate(plan.shards):
        assert set(labels[shard]) == {i}


def test_a_run_resumed_from_a_checkpoint_gives_the_uninterrupted_numbers():
    cfg = _cfg(algorithm="decaf", rounds=12, eval_every=3, optim={"name": "adam", "lr": 0.05},
               lora={"rank": 2, "alpha": 2.0, "dropout": 0.1})
    states = []
    full = run(cfg, progress=False, checkpoint_every=4, on_checkpoint=states.append)
    assert [s.round for s in states] == [4, 8]
    resumed = run(cfg, progress=False, resume=states[0])
    assert [r["value"] for r in resumed.rows] == [r["value"] for r in full.rows]
    for i, f in full.factors.items():
        for n, (a, b) in f.items():
            assert resumed.factors[i][n][0].equal(a) and resumed.factors[i][n][1].equal(b)


@pytest.mark.parametrize("split", ["balanced", "left", "aligned", "conserved"])
@pytest.mark.parametrize("state", ["keep", "rotate", "reset"])
def test_decaf_splits_and_state_policies_train(split, state):
    res = run(_cfg(algorithm="decaf", rounds=20, eval_every=20,
                   optim={"name": "adam", "lr": 0.05},
                   consensus={"split": split, "state": state}), progress=False)
    start = [r for r in res.rows if r["metric"] == "test_loss" and r["agent"] == -1][0]["value"]
    assert res.status == "completed"
    assert _final(res, "test_loss") < 0.9 * start


def test_agent_batches_cut_each_hosts_agents_the_same_way_everywhere():
    from decaf_ray.agents import agent_batches

    everyone = agent_batches(list(range(7)), per_host=3, batch=2)
    assert everyone == [[0, 1], [2], [3, 4], [5], [6]]
    for host in ([0, 1, 2], [3, 4, 5], [6]):  # what each Ray host cuts from its own agents
        assert agent_batches(host, per_host=3, batch=2) == [b for b in everyone if b[0] in host]
    assert agent_batches([2, 0, 1], per_host=3, batch=1) == [[0], [1], [2]]


def test_batch_agents_needs_a_task_with_a_batched_step():
    from decaf_ray.config import ConfigError

    with pytest.raises(ConfigError, match="runtime.batch_agents.*synthetic"):
        prepare(_cfg(runtime={"kind": "inprocess", "agents_per_host": 2, "batch_agents": 2}))


# ------------------------------------------------------------------ folds into the base weights


def test_server_algorithms_that_fold_into_the_base_learn():
    """FedEx-LoRA learns as FedAvg does (the graph is ignored: a server). FLoRA starts each round
    from a fresh adapter (B = 0) whose product the base absorbs: slower per step, so ten local
    steps a round, and still it moves the base toward the planted shift."""
    fedex = run(_cfg(algorithm="fedex", rounds=30, eval_every=30), progress=False)
    flora = run(_cfg(algorithm="flora", rounds=20, local_steps=10, eval_every=20), progress=False)
    for res in (fedex, flora):
        start = [r for r in res.rows if r["metric"] == "test_accuracy"][0]["value"]
        assert _final(res, "test_accuracy") > start + (0.3 if res is fedex else 0.1)
    assert _final(fedex, "shift_error") < 0.3 and _final(flora, "shift_error") < 0.8
    # FLoRA's adapters are the round's fresh one: the agents agree, B = 0
    assert _final(flora, "consensus_distance") == 0


def _first_round(spec: dict, name: str):
    return run(load_config({**spec, "algorithm": name, "rounds": 1, "local_steps": 3,
                            "eval_every": 1}), progress=False)


@pytest.mark.parametrize("kind", ["synthetic", "clip", "causal_lm"])
def test_fedex_after_one_round_holds_fedavgs_adapter_on_a_base_that_absorbed_the_residual(kind):
    """Round 1 of FedEx-LoRA: the gradients were taken on W0 and A', B' are FedAvg's, so every
    agent's adapter is FedAvg's bit for bit; only the base differs, by the residual, which the
    evaluation sees (every task kind: synthetic, and peft's base_layer weights)."""
    if kind == "synthetic":
        spec = {**NONIID_RING, "runtime": {"kind": "inprocess", "threads": 1}}
    else:
        import importlib

        spec = importlib.import_module(f"test_{kind}").experiment("fedex")
    fedavg, fedex = _first_round(spec, "fedavg"), _first_round(spec, "fedex")
    for i, f in fedavg.factors.items():
        for n, (a, b) in f.items():
            assert fedex.factors[i][n][0].equal(a) and fedex.factors[i][n][1].equal(b)
    assert _final(fedex, "test_loss") != _final(fedavg, "test_loss")


@pytest.mark.parametrize("kind", ["clip", "causal_lm"])
def test_a_peft_task_sets_its_base_weights_to_w0_plus_a_delta_and_back(kind):
    import importlib

    import torch

    from decaf_ray.factors import init_factors

    plan = prepare(load_config(importlib.import_module(f"test_{kind}").experiment("fedex")))
    task = plan.task
    task.load()
    weights = {n: layer.get_base_layer().weight for n, layer in task.layers.items()}
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    g = torch.Generator().manual_seed(0)
    factors = init_factors(task.lora_shapes(), plan.config.lora.rank, g)
    before = task.evaluate(factors)
    delta = {n: 0.05 * torch.randn(d, k, generator=g) for n, (d, k) in task.lora_shapes().items()}
    task.set_base_delta(delta)
    for n, w in weights.items():
        assert w.equal((w0[n].float() + delta[n]).to(w.dtype))
    assert task.evaluate(factors) != before  # not a remembered evaluation of the old base
    task.set_base_delta(None)
    assert all(w.equal(w0[n]) for n, w in weights.items())
    assert task.evaluate(factors) == before
