"""The runtimes on the round's network (issue 18): who trains and mixes, compressed messages and
their bytes, the network rows, the summary's trace, and resuming with the network's counters.
The Ray runtime's agreement with these numbers is in test_ray_runtime.py."""

import copy

import numpy as np
import pytest
import torch

from decaf_ray import compress
from decaf_ray.algorithms import mix_dlora
from decaf_ray.experiment import run
from decaf_ray.experiment_config import load_config
from decaf_ray.plan import prepare
from decaf_ray.runtime import checkpoint
from decaf_ray.runtime.inprocess import InProcessHosts

BASE = {
    "agents": 6, "topology": "ring", "rounds": 6, "local_steps": 2, "eval_every": 3, "seed": 4,
    "task": {"kind": "synthetic", "d": 6, "k": 16, "samples": 600, "test_samples": 120},
    "data": {"partition": "classes_per_agent", "batch_size": 16},
    "lora": {"rank": 2, "alpha": 2.0},
    "optim": {"name": "adam", "lr": 0.05},
    "runtime": {"kind": "inprocess", "threads": 1},
    "grad_norm": False,
}


def _cfg(**over):
    return load_config({**BASE, **over})


def _net_rows(result, metric):
    return {r["round"]: r["value"] for r in result.rows if r["agent"] == -1
            and r["metric"] == metric}


def _state(group):
    """Every agent's factors, optimizer state, steps taken (its losses) and sampler, copied."""
    return {i: copy.deepcopy((a.factors, a.opt_state, len(a.losses), a.sampler.state()))
            for i, a in group.agents.items()}


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return x.equal(y)
    if isinstance(x, np.ndarray):
        return np.array_equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    return x == y


def _one_round(cfg):
    """The first round with some agents active and some not, by hand on in-process hosts
    from the start: (net, hosts, states before, states after)."""
    plan = prepare(cfg)
    hosts = InProcessHosts(plan)
    rnd = next(r for r in range(1, 100) if 0 < len(plan.schedule.round(r).active) < plan.agents)
    net = plan.schedule.round(rnd)
    before = _state(hosts.group)
    t = (rnd - 1) * cfg.local_steps
    hosts.local_steps(t + 1, cfg.local_steps - 1, net)
    hosts.communicate(t + cfg.local_steps, False, net)
    return net, hosts, before, _state(hosts.group)


def test_the_default_network_hands_the_plans_own_neighbourhoods_every_round():
    """The default path is today's: every round is the plan's neighbourhoods, the very tuples,
    every agent active with tau steps, and the inboxes are those neighbourhoods."""
    for algorithm in ("decaf", "fedavg", "local"):
        plan = prepare(_cfg(algorithm=algorithm))
        for rnd in (1, 5):
            net = plan.schedule.round(rnd)
            assert net.active == tuple(range(6)) and set(net.steps.values()) == {2}
            assert all(net.neighbourhoods[i] is plan.neighbourhoods[i] for i in range(6))
            assert plan.schedule.inboxes(net) is net.neighbourhoods


def test_inactive_agents_keep_everything_and_stragglers_take_fewer_steps():
    """Participation and link failures on a graph: an inactive agent's factors, optimizer state
    and batch sampler do not move; a straggler takes steps[i] steps, the others tau."""
    cfg = _cfg(algorithm="dlora", local_steps=4, network={
        "participation": 0.5, "link_failure": 0.3, "stragglers": {"fraction": 0.5, "speed": 0.5}})
    net, hosts, before, after = _one_round(cfg)
    inactive = set(range(6)) - set(net.active)
    assert inactive and net.active and set(net.steps.values()) == {2, 4}
    for i in range(6):
        if i in inactive:
            assert _equal(after[i], before[i])
        else:
            assert not _equal(after[i][0], before[i][0])
            assert after[i][2] - before[i][2] == net.steps[i]  # steps taken this round
    assert set(hosts.sent_bytes) == set(net.active)


def test_a_server_average_of_the_active_agents_reaches_every_agent():
    """FedAvg with participation (one step a round, so each payload is the adapter the round
    starts from): an inactive agent ends the round on the active agents' average without a
    step (its optimizer state and sampler do not move); an active one adds its own step."""
    net, hosts, before, after = _one_round(_cfg(algorithm="fedavg", local_steps=1,
                                                network={"participation": 0.5}))
    inactive = sorted(set(range(6)) - set(net.active))
    assert inactive and net.active
    for n, (a, b) in after[inactive[0]][0].items():
        mean = [torch.stack([before[j][0][n][f] for j in net.active]).mean(0) for f in (0, 1)]
        assert torch.allclose(a, mean[0], atol=1e-6) and torch.allclose(b, mean[1], atol=1e-6)
    for i in inactive:
        assert _equal(after[i][0], after[inactive[0]][0])
        assert _equal(after[i][1:], before[i][1:])
    for i in net.active:
        assert not _equal(after[i][0], after[inactive[0]][0]) and after[i][2] == 1


def test_folds_follow_participation_and_an_empty_round_changes_nothing():
    """FedEx-LoRA under a trace with an empty round 2: every round with an active agent folds
    (the agents inactive in the last round hold its average alike), and round 2 changes no
    adapter and sends nothing."""
    trace = [[0, 1, 2], [], [3, 4], [0, 5], [1], [2, 3, 4, 5]]
    cfg = _cfg(algorithm="fedex", eval_every=1, network={"availability": {"trace": trace}})
    res = run(cfg, progress=False)
    assert res.status == "completed"
    assert _equal(res.factors[0], res.factors[1])
    active, sent = _net_rows(res, "active_agents"), _net_rows(res, "bytes_sent")
    assert [active[r] for r in range(1, 7)] == [len(t) for t in trace]
    assert sent[2] == sent[1] and sent[3] > sent[2]
    rows = res.summary["network"]["trace"]["rows"]
    assert rows[1][1:3] == [0, 0] and rows[1][4] == 0 and rows[1][5] == 0.0
    for metric in ("test_loss", "consensus_distance"):
        assert _net_rows(res, metric)[2] == _net_rows(res, metric)[1]


def test_lossy_messages_mix_the_agents_own_payload_exactly():
    """int8 over a graph: agent 0 mixes its own published factors exactly and its neighbour's
    decoded message (checked by mixing them again here: the mix is deterministic)."""
    cfg = _cfg(algorithm="dlora", agents=2, topology="complete", network={"compress": "int8"},
               data={"partition": "iid", "batch_size": 16})
    plan = prepare(cfg)
    hosts = InProcessHosts(plan)
    group = hosts.group
    payloads = group.grads_and_payloads(1)
    for a in group.agents.values():  # a zero step: the factors become the mix itself
        a.pending = {n: tuple(torch.zeros_like(x) for x in pair) for n, pair in a.factors.items()}
    decoded = {j: compress.decode(m) for j, m in group.messages(payloads).items()}
    own = payloads[0]
    w = torch.tensor([0.5, 0.5])
    expected = mix_dlora(own, [own, decoded[1]], w, group.mix_options)
    everyone_decoded = mix_dlora(own, [decoded[0], decoded[1]], w, group.mix_options)
    group.mix_and_apply(1, {i: ((0, 1), (0.5, 0.5), [decoded[0], decoded[1]]) for i in (0, 1)})
    assert _equal(group.agents[0].factors, expected)
    assert not _equal(group.agents[0].factors, everyone_decoded)


@pytest.fixture(scope="module")
def by_kind():
    return {kind: run(_cfg(algorithm="decaf", rounds=3, network={"compress": kind}),
                      progress=False) for kind in ("float32", "float16", "int8")}


def test_bytes_sent_counts_the_real_messages_float16_half_int8_a_quarter(by_kind):
    sent = {k: _net_rows(r, "bytes_sent")[3] for k, r in by_kind.items()}
    floats = _net_rows(by_kind["float32"], "floats_sent")[3]
    assert sent["float32"] == 4 * floats
    assert sent["float16"] == sent["float32"] / 2
    # int8: one byte per entry plus one float32 scale per rank component of each factor
    d, k, r = 6, 16, 2
    per_message = (d + k) * r + 4 * (r + r)
    assert sent["int8"] == sent["float32"] * per_message / (4 * (d + k) * r)
    assert 0.25 < sent["int8"] / sent["float32"] < 0.4
    agent_rows = [r for r in by_kind["int8"].rows if r["metric"] == "bytes_sent"
                  and r["agent"] == 0 and r["round"] == 3]
    assert agent_rows[0]["value"] == 3 * 2 * per_message  # 3 rounds, two ring neighbours


def test_the_network_rows_and_the_summary_trace(by_kind):
    res = by_kind["float32"]
    net = res.summary["network"]
    trace = net["trace"]
    assert trace["columns"] == ["round", "active", "edges_up", "spectral_gap", "bytes",
                                "sim_time_s"]
    assert [r[0] for r in trace["rows"]] == [1, 2, 3]
    assert all(r[1:3] == [6, 6] for r in trace["rows"])  # a ring of 6: six edges
    assert trace["rows"][0][3] == pytest.approx(1 / 3)  # metropolis on a ring of 6
    assert _net_rows(res, "sim_time_s")[3] == pytest.approx(sum(r[5] for r in trace["rows"]))
    assert _net_rows(res, "bytes_sent")[3] * 6 == sum(r[4] for r in trace["rows"])
    assert net["mean_active"] == 6 and net["compress"] == "float32" and not net["stragglers"]
    assert {"active_agents", "edges_up", "spectral_gap"} <= {
        r["metric"] for r in res.rows if r["round"] == 3}
    assert {"bytes_sent", "sim_time_s"} <= {r["metric"] for r in res.rows if r["round"] == 0}


def test_stragglers_slow_the_simulated_clock():
    base = run(_cfg(algorithm="dlora", rounds=2), progress=False)
    slow = run(_cfg(algorithm="dlora", rounds=2,
                    network={"stragglers": {"fraction": 0.2, "speed": 0.25}}), progress=False)
    assert _net_rows(slow, "sim_time_s")[2] > _net_rows(base, "sim_time_s")[2]


def test_resume_with_error_feedback_and_churn_gives_the_uninterrupted_numbers(tmp_path):
    """A checkpoint holds each agent's error-feedback residual and the network's counters;
    written to a file and read back, the resumed run gives the same rows and summary trace.
    A checkpoint of before the counters (no ``network`` entry) still loads."""
    cfg = _cfg(algorithm="decaf", rounds=6, eval_every=2, network={
        "participation": 0.7, "link_failure": 0.3,
        "compress": {"kind": "int8", "error_feedback": True}})
    states = []
    full = run(cfg, progress=False, checkpoint_every=3, on_checkpoint=states.append)
    assert any("residual" in a for a in states[0].agents.values())
    path = tmp_path / "state.pt"
    checkpoint.save(states[0], path)
    resumed = run(cfg, progress=False, resume=checkpoint.load(path))
    assert [r["value"] for r in resumed.rows] == [r["value"] for r in full.rows]
    assert resumed.summary["network"] == full.summary["network"]
    old = torch.load(path, weights_only=True)
    del old["network"]
    torch.save(old, path)
    assert checkpoint.load(path).network is None


def test_describe_prints_what_a_changing_network_implies(tmp_path, capsys):
    from decaf_ray.cli import main

    path = tmp_path / "net.yaml"
    path.write_text("agents: 8\nrounds: 12\ntask: {kind: synthetic}\nnetwork: "
                    "{schedule: one_peer_exponential, stragglers: {fraction: 0.25}}\n")
    assert main(["describe", str(path)]) == 0
    out = capsys.readouterr().out
    block = out.split("# network over 12 rounds (union connectivity over every 3)\n")[1]
    assert "schedule: one_peer_exponential\n" in block and "union_connected: True\n" in block
    # offsets 1, 2, 4 in turn: 8, 8 and 4 edges (4 = N / 2 pairs each agent once)
    assert "mean_edges_up: 6.66667\n" in block and "stragglers: 2\n" in block
    path.write_text("agents: 8\nrounds: 12\ntask: {kind: synthetic}\n")
    assert main(["describe", str(path)]) == 0
    assert "# network over" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def network_results(tmp_path_factory):
    """A tiny study saved as ``decaf-ray run`` saves: DeCAF and DLoRA under link failure 0 and
    0.5 (two seeds each), and one DeCAF run at participation 0.5 (held out of the link sweep)."""
    from decaf_ray.results import RunWriter

    root = tmp_path_factory.mktemp("network") / "results"
    runs = [(alg, {"link_failure": p}, seed) for alg in ("decaf", "dlora")
            for p in (0.0, 0.5) for seed in (0, 1)] + [("decaf", {"participation": 0.5}, 0)]
    for k, (alg, net, seed) in enumerate(runs):
        cfg = _cfg(algorithm=alg, seed=seed, rounds=4, eval_every=2, network=net)
        writer = RunWriter(root / f"run{k}").open(cfg)
        writer.close(run(cfg, on_rows=writer.rows, progress=False))
    return root


def test_robustness_and_network_curves_write_their_figures(network_results, tmp_path):
    import analysis

    pts = analysis.robustness_points(network_results, param="link_failure")
    assert sorted(zip(pts["algorithm"], pts["network.link_failure"])) == [
        ("decaf", 0.0), ("decaf", 0.5), ("dlora", 0.0), ("dlora", 0.5)]
    assert (pts["n"] == 2).all() and (pts["lo"] <= pts["mean"]).all()
    assert pts.attrs["note"] == "held: participation 1"  # the participation run left out
    out = analysis.figure("robustness", network_results, tmp_path / "robust.png",
                          param="network.link_failure")
    assert out.stat().st_size > 0
    for x in ("bytes_sent", "sim_time_s"):
        fig = analysis.network_curves(network_results, x=x)
        lines = [ln for ln in fig.get_axes()[0].get_lines() if not ln.get_label().startswith("_")]
        assert lines and all(np.all(np.diff(ln.get_xdata()) > 0) for ln in lines)
        assert analysis.figure("network", network_results, tmp_path / f"{x}.png", x=x).exists()
