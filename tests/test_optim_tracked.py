"""``adam_tracked``, the paper's Algorithm 4: a hand computation of its lines 1-30, the
optimizer's own rules (h, the eps floor, no bias correction), and end-to-end runs."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from decaf_ray.agents import Agent, AgentGroup, Diverged, Sampler
from decaf_ray.algorithms import ALGORITHMS, MixOptions, mix_decaf_many
from decaf_ray.config import ConfigError, OptimConfig
from decaf_ray.experiment import run
from decaf_ray.experiment_config import load_config
from decaf_ray.optim import build_optimizer
from decaf_ray.plan import prepare

D, K, R, T, TAU = 4, 3, 2, 4, 2
PI = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]  # exact in float32
LR, B1, B2, EPS = 0.01, 0.9, 0.99, 1e-6
F64 = torch.float64


class GivenGrads:
    """A task whose gradients are given: agent i (its shard is [i]) gets G[i][c] at its c-th
    gradient, whatever its factors."""

    def __init__(self, G):
        self.G, self.calls = G, {}

    def loss_and_grads(self, factors, indices, train_A, seed):
        i = int(indices[0])
        c = self.calls[i] = self.calls.get(i, -1) + 1
        gA, gB = self.G[i][c]
        return 0.0, {"w": (gA if train_A else None, gB)}


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    A0 = torch.randn(R, K, generator=gen, dtype=torch.float64)
    G = [[(torch.randn(R, K, generator=gen, dtype=torch.float64),
           torch.randn(D, R, generator=gen, dtype=torch.float64)) for _ in range(T)]
         for _ in range(3)]
    return A0, torch.zeros(D, R, dtype=torch.float64), G


def _code(name, h, split="balanced"):
    """The code's factors and trackers after T steps, driven as the runtimes drive a group."""
    A0, B0, G = _problem()
    opt = build_optimizer(OptimConfig(name="adam_tracked", lr=LR, betas=(B1, B2), eps=EPS, h=h), T)
    init = {"w": (A0, B0)}
    agents = [Agent(i, init, opt.init(init), Sampler(np.array([i]), 1, i)) for i in range(3)]
    group = AgentGroup(GivenGrads(G), ALGORITHMS[name], opt, agents, 0, MixOptions(split=split))
    for t in range(1, T + 1):
        if t % TAU:
            group.local_step(t)
            continue
        payloads = group.grads_and_payloads(t)
        group.mix_and_apply(t, {i: ((0, 1, 2), tuple(PI[i]), [payloads[j] for j in range(3)])
                                for i in range(3)})
    return ([a.factors["w"] for a in group.agents.values()],
            [a.opt_state["tracker"]["w"] for a in group.agents.values()])


def _tsvd(M):
    """Rank-R TSVD of M, balanced split, largest-magnitude entry of each u_i positive."""
    U, S, Vh = torch.linalg.svd(M)
    U, S, Vh = U[:, :R], S[:R], Vh[:R]
    sign = torch.sign(U[U.abs().argmax(0), torch.arange(R)])
    U, Vh = U * sign, Vh * sign[:, None]
    return S.sqrt()[:, None] * Vh, U * S.sqrt()


def _mix(name, X, i):
    """Agent i's mix of X = [[A_j, B_j]]: Algorithm 4, lines 10-13 (DLoRA, DLoRA-FA: A stays)
    or 15-18 (DeCAF)."""
    if name == "decaf":
        return list(_tsvd(sum(PI[i][j] * X[j][1] @ X[j][0] for j in range(3))))
    B = sum(PI[i][j] * X[j][1] for j in range(3))
    A = X[i][0] if name == "dlora_fa" else sum(PI[i][j] * X[j][0] for j in range(3))
    return [A, B]


def _hand(name, h):
    """Lines 1-30 of Algorithm 4, as decaf-ray reads them (``optim.adam_tracked``): U-hat_1 = 0,
    and the step divides by the tracker after mixing and tracking."""
    A0, B0, G = _problem()
    trained = (1,) if name == "dlora_fa" else (0, 1)
    X = [[A0, B0] for _ in range(3)]
    zero = lambda: [[torch.zeros_like(A0), torch.zeros_like(B0)] for _ in range(3)]
    M, V, avg, U = zero(), zero(), zero(), zero()
    for t in range(1, T + 1):
        V_old = [list(v) for v in V]
        for i in range(3):
            for f in trained:
                g = G[i][t - 1][f]
                M[i][f] = B1 * M[i][f] + (1 - B1) * g
                avg[i][f] = B2 * avg[i][f] + (1 - B2) * g * g
                V[i][f] = avg[i][f] if h == "adam" else torch.maximum(V_old[i][f], avg[i][f])
        if t % TAU == 0:
            X, U = [_mix(name, X, i) for i in range(3)], [_mix(name, U, i) for i in range(3)]
        for i in range(3):
            for f in trained:
                U[i][f] = U[i][f] - V_old[i][f] + V[i][f]
                X[i][f] = X[i][f] - LR * M[i][f] / torch.clamp(U[i][f], min=EPS).sqrt()
    return X, U


@pytest.mark.parametrize("name", ["dlora", "dlora_fa", "decaf"])
@pytest.mark.parametrize("h", ["adam", "amsgrad"])
def test_two_communications_of_three_agents_match_a_hand_computation(name, h):
    factors, trackers = _code(name, h)
    X, U = _hand(name, h)
    for i in range(3):
        for got, want in [(factors[i], X[i]), (trackers[i], U[i])]:
            for g, w in zip(got, want):
                assert torch.allclose(g, w, rtol=1e-9, atol=1e-12), (name, h, i)
    if name != "dlora_fa":  # the trackers were mixed: they differ from each agent's own V
        assert not torch.allclose(trackers[0][0], trackers[1][0])


def _mixed_trackers(split, trackers):
    """One communicating step with zero gradients (so V stays 0): the trackers as mixed."""
    opt = build_optimizer(OptimConfig(name="adam_tracked", lr=LR), 1)
    zero = [[(torch.zeros(R, K, dtype=torch.float64), torch.zeros(D, R, dtype=torch.float64))]
            for _ in range(3)]
    A0, B0, _ = _problem()
    init = {"w": (A0, B0 + 1.0)}
    agents = [Agent(i, init, {**opt.init(init), "tracker": {"w": trackers[i]}},
                    Sampler(np.array([i]), 1, i)) for i in range(3)]
    group = AgentGroup(GivenGrads(zero), ALGORITHMS["decaf"], opt, agents, 0,
                       MixOptions(split=split))
    payloads = group.grads_and_payloads(1)
    group.mix_and_apply(1, {i: ((0, 1, 2), tuple(PI[i]), [payloads[j] for j in range(3)])
                            for i in range(3)})
    return [a.opt_state["tracker"]["w"] for a in group.agents.values()]


def test_aligned_and_conserved_splits_fit_the_tracker_to_the_agents_own():
    gen = torch.Generator().manual_seed(1)
    own = [(torch.rand(R, K, generator=gen, dtype=torch.float64),
            torch.rand(D, R, generator=gen, dtype=torch.float64)) for _ in range(3)]
    balanced = _mixed_trackers("balanced", own)
    for split in ("aligned", "conserved"):
        fitted = _mixed_trackers(split, own)
        for i in range(3):
            # the same TSVD of the mixed product, in a basis fitted to the agent's own tracker
            assert torch.allclose(fitted[i][1] @ fitted[i][0], balanced[i][1] @ balanced[i][0])
            if split == "aligned":
                dist = lambda u: sum(float((x - y).norm() ** 2) for x, y in zip(u, own[i]))
                assert dist(fitted[i]) <= dist(balanced[i]) + 1e-12


def test_a_tracker_past_float_range_is_a_divergence(monkeypatch):
    inf = [(torch.full((R, K), math.inf, dtype=F64), torch.ones(D, R, dtype=F64))] * 3
    with pytest.raises(Diverged, match="tracker"):  # refused before it is published
        _mixed_trackers("balanced", inf)

    def fails(owns, *_):  # LAPACK on a finite product near float's range
        if owns[0]["w"][0].abs().max() > 1e10:
            raise torch.linalg.LinAlgError("linalg.svd: failed to converge")
        return mix_decaf_many(owns, *_)

    monkeypatch.setitem(ALGORITHMS, "decaf", replace(ALGORITHMS["decaf"], mix_many=fails))
    big = [(torch.full((R, K), 1e15, dtype=F64), torch.ones(D, R, dtype=F64))] * 3
    with pytest.raises(Diverged, match="tracker"):
        _mixed_trackers("balanced", big)


def _step_alone(opt, grads_seq):
    p = {"w": (torch.zeros(1, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))}
    state, out = opt.init(p), []
    for t, g in enumerate(grads_seq, 1):
        upd, state = opt.update({"w": g}, state, p, t)
        out.append((upd["w"], state))
    return out


def _g(a, b):
    return (torch.tensor([[a, a]], dtype=F64), torch.tensor([[b], [b]], dtype=F64))


def test_without_communication_the_tracker_is_v_and_there_is_no_bias_correction():
    opt = build_optimizer(OptimConfig(name="adam_tracked", lr=0.1, betas=(0.9, 0.999)), 3)
    (upd, state), = _step_alone(opt, [_g(2.0, -3.0)])
    # t = 1: M = 0.1 g, U-hat = V = 0.001 g^2, so the step is -lr 0.1 / sqrt(0.001) sign(g),
    # about 3.16 lr; bias-corrected Adam's first step is -lr sign(g)
    assert torch.equal(state["tracker"]["w"][0], state["sq"]["w"][0])
    assert torch.allclose(upd[0], torch.full((1, 2), -0.1 * 0.1 / math.sqrt(0.001), dtype=F64))
    assert torch.allclose(upd[1], torch.full((2, 1), 0.1 * 0.1 / math.sqrt(0.001), dtype=F64))
    _, (upd2, state2) = _step_alone(opt, [_g(2.0, -3.0), _g(1.0, -3.0)])
    m, v = 0.9 * 0.2 + 0.1 * 1.0, 0.999 * 0.004 + 0.001 * 1.0
    assert torch.allclose(state2["tracker"]["w"][0], torch.full((1, 2), v, dtype=F64))
    assert torch.allclose(upd2[0], torch.full((1, 2), -0.1 * m / math.sqrt(v), dtype=F64))


def test_amsgrad_keeps_the_running_max_and_adam_does_not():
    seq = [_g(10.0, 10.0), _g(0.0, 0.0), _g(0.0, 0.0)]
    for h in ("adam", "amsgrad"):
        opt = build_optimizer(OptimConfig(name="adam_tracked", lr=0.1, betas=(0.9, 0.5), h=h), 3)
        states = [s for _, s in _step_alone(opt, seq)]
        first, last = states[0]["sq"]["w"][0], states[-1]["sq"]["w"][0]
        if h == "amsgrad":
            assert torch.equal(last, first)  # max(V_{t-1}, avg_t) never decreases
            assert torch.allclose(states[-1]["avg"]["w"][0], first * 0.25)
        else:
            assert torch.allclose(last, first * 0.25)
        assert torch.equal(states[-1]["tracker"]["w"][0], last)


def test_eps_floors_the_tracker_instead_of_joining_its_root():
    opt = build_optimizer(OptimConfig(name="adam_tracked", lr=1.0, eps=1e-4), 2)
    p = {"w": (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))}
    state = opt.init(p)
    state["tracker"] = {"w": (torch.full((1, 1), -5.0, dtype=torch.float64),
                              torch.full((1, 1), 0.0, dtype=torch.float64))}  # e.g. after a TSVD
    g = {"w": (torch.full((1, 1), 1e-3, dtype=F64), torch.zeros(1, 1, dtype=F64))}
    upd, state = opt.update(g, state, p, 1)
    u = -5.0 + 0.001 * 1e-6  # tracked; floored at eps = 1e-4
    assert state["tracker"]["w"][0].item() == pytest.approx(u)
    assert upd["w"][0].item() == pytest.approx(-0.1 * 1e-3 / math.sqrt(1e-4))
    assert upd["w"][1].item() == 0.0


def test_refactorization_policies_move_only_the_first_moment():
    from decaf_ray.optim import refactor_state

    gen = torch.Generator().manual_seed(2)
    old = {"w": (torch.randn(R, K, generator=gen, dtype=F64),
                 torch.randn(D, R, generator=gen, dtype=F64))}
    new = {"w": (old["w"][0][[1, 0]], old["w"][1][:, [1, 0]])}  # directions swapped
    opt = build_optimizer(OptimConfig(name="adam_tracked", lr=0.1, h="amsgrad"), 2)
    _, state = opt.update({"w": (torch.ones(R, K, dtype=F64), torch.arange(D * R, dtype=F64)
                                 .reshape(D, R))}, opt.init(old), old, 1)
    reset, rotated = (refactor_state(state, old, new, p) for p in ("reset", "rotate"))
    assert float(reset["m"]["w"][1].abs().sum()) == 0
    assert torch.allclose(rotated["m"]["w"][1], state["m"]["w"][1][:, [1, 0]])
    for key in ("sq", "avg", "tracker"):
        for policy in (reset, rotated):
            assert policy[key] is state[key]


BASE = {
    "agents": 6, "topology": "ring", "rounds": 6, "local_steps": 2, "eval_every": 3, "seed": 5,
    "task": {"kind": "synthetic", "d": 6, "k": 16, "samples": 600, "test_samples": 200},
    "data": {"partition": "classes_per_agent", "batch_size": 16},
    "lora": {"rank": 2, "alpha": 2.0},
    "optim": {"name": "adam_tracked", "lr": 0.05, "eps": 1e-3},
    "runtime": {"kind": "inprocess", "threads": 1},
}


def _cfg(**over):
    return load_config({**BASE, **over})


@pytest.mark.parametrize("name", ["fedavg", "fedavg_fa", "local", "local_fa", "centralized"])
def test_adam_tracked_is_refused_where_nothing_gossips(name):
    with pytest.raises(ConfigError, match="optim.name"):
        prepare(_cfg(algorithm=name))


def test_h_belongs_to_adam_tracked():
    with pytest.raises(ConfigError, match="optim.h"):
        load_config({**BASE, "optim": {"name": "adam", "h": "amsgrad"}})


@pytest.mark.parametrize("name", ["dlora", "dlora_fa", "decaf"])
def test_the_tracker_doubles_what_travels(name):
    plan, shapes = prepare(_cfg(algorithm=name)), {"linear": (6, 16)}
    local = ALGORITHMS[name]
    assert plan.algorithm.floats_per_message(shapes, 2) == 2 * local.floats_per_message(shapes, 2)
    degrees = [2] * 6
    assert (plan.algorithm.network_floats_per_round(shapes, 2, degrees)
            == 2 * local.network_floats_per_round(shapes, 2, degrees))
    res = run(_cfg(algorithm=name, rounds=2, optim={**BASE["optim"], "name": "adam"}),
              progress=False)
    tracked = run(_cfg(algorithm=name, rounds=2), progress=False)
    sent = lambda r: [x["value"] for x in r.rows if x["metric"] == "floats_sent"][-1]
    assert sent(tracked) == 2 * sent(res) > 0
    assert tracked.status == "completed"


def test_a_resumed_tracked_run_gives_the_uninterrupted_numbers():
    cfg = _cfg(algorithm="decaf", consensus={"split": "conserved"},
               optim={**BASE["optim"], "h": "amsgrad"})
    states = []
    full = run(cfg, progress=False, checkpoint_every=2, on_checkpoint=states.append)
    resumed = run(cfg, progress=False, resume=states[0])
    assert [r["value"] for r in resumed.rows] == [r["value"] for r in full.rows]


@pytest.mark.ray
def test_ray_gives_the_inprocess_numbers_for_adam_tracked(ray_session):
    # DeCAF's message holds what DLoRA's does (A, B and their trackers), so DeCAF on two hosts
    # (per-agent fits, conserved) and DLoRA-FA (B and its tracker only) cover what travels.
    for name, per_host, split in (("decaf", 3, "conserved"), ("dlora_fa", 6, "balanced")):
        over = {"algorithm": name, "rounds": 2, "eval_every": 1, "consensus": {"split": split}}
        ref = run(_cfg(**over), progress=False)
        got = run(_cfg(**over, runtime={"kind": "ray", "threads": 1, "agents_per_host": per_host}),
                  progress=False)
        assert got.status == ref.status == "completed", name
        assert [r["value"] for r in got.rows] == [r["value"] for r in ref.rows], name
        for i in ref.factors:
            for n, (a, b) in ref.factors[i].items():
                assert got.factors[i][n][0].equal(a) and got.factors[i][n][1].equal(b)
