"""Contract tests every algorithm passes, and Algorithm 1 checked by hand."""

import numpy as np
import pytest
import torch

from decaf_ray import consensus, folding
from decaf_ray.agents import Agent, AgentGroup, Sampler
from decaf_ray.algorithms import ALGORITHMS, Algorithm, MixOptions, mix_dlora, register
from decaf_ray.config import OptimConfig
from decaf_ray.factors import init_factors
from decaf_ray.tracking import tracking
from decaf_ray.optim import build_optimizer

SHAPES = {"q": (6, 5), "v": (6, 5), "o": (4, 7)}
COMMUNICATING = [a for a in ALGORITHMS.values() if a.communicates]
# (algorithm, round): each round of an algorithm whose rounds take turns (``phases``) is a case
ROUNDS = [pytest.param(a, k, id=f"{a.name}-{k}" if a.phases else a.name) for a in COMMUNICATING
          for k in (range(1, len(a.phases) + 1) if a.phases else [1])]
rounds = pytest.mark.parametrize("alg, rnd", ROUNDS)


def _adapters(m, rank=2, seed=0, share=""):
    """m random adapters (float64); the factors named in ``share`` are equal in all of them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        f = init_factors(SHAPES, rank, g, std=1.0)
        out.append({n: (a.double(), torch.randn(b.shape, generator=g).double())
                    for n, (a, b) in f.items()})
    return [{n: tuple(out[0][n][i] if "AB"[i] in share else x for i, x in enumerate(pair))
             for n, pair in f.items()} for f in out]


def _frozen(alg, rnd):
    """The factors round ``rnd`` does not train: the shared A_0 of the FA variants, the factor
    an alternating round leaves alone (equal over the neighbourhood in the exact case)."""
    return "".join(f for f in "AB" if f not in alg.trains_in(rnd))


def _mix(alg, adapters, pi, i, opt=MixOptions(), rnd=1):
    """Agent i's mixed adapter (a fold's adapter: its base delta is ``_fold``'s)."""
    if alg.fold is not None:
        return _fold(alg, adapters, pi[i], opt)[0]
    ids = np.flatnonzero(pi[i])
    w = torch.tensor(pi[i, ids], dtype=torch.float64)
    return alg.mix(adapters[i], [alg.payload(adapters[j], rnd) for j in ids], w, opt)


def _fold(alg, adapters, p, opt=MixOptions(), seed=0):
    """A server algorithm's fold of every adapter with weights p: (adapter, base delta)."""
    w = torch.tensor(p, dtype=torch.float64)
    return alg.fold.fn([alg.payload(a) for a in adapters], w, opt.scale, opt.init_std, seed)


@rounds
def test_shapes_are_stable(alg, rnd):
    ads = _adapters(4, share=_frozen(alg, rnd))
    pi = np.full((4, 4), 0.25)
    out = _mix(alg, ads, pi, 0, rnd=rnd)
    for n in SHAPES:
        assert out[n][0].shape == ads[0][n][0].shape and out[n][1].shape == ads[0][n][1].shape


@rounds
def test_complete_graph_gives_the_exact_average(alg, rnd):
    ads = _adapters(5, share=_frozen(alg, rnd))
    pi = np.full((5, 5), 0.2)
    out = _mix(alg, ads, pi, 3, rnd=rnd)
    sent = alg.travels_in(rnd)
    for n in SHAPES:
        mean_prod = sum(b @ a for a, b in (ad[n] for ad in ads)) / 5
        if alg.fold is not None:  # the weight, base delta included: test_folds_are_exact
            continue
        if alg.name == "hetlora":  # the average weighted by ||B_j A_j||_F, not the plain one
            norms = torch.stack([torch.linalg.norm(ad[n][1] @ ad[n][0]) for ad in ads])
            v = norms / norms.sum()
            for f in (0, 1):
                assert torch.allclose(out[n][f], sum(vj * ad[n][f] for vj, ad in zip(v, ads)),
                                      atol=1e-12)
            continue
        if alg.name == "decaf":
            # the exact TSVD of the average product: the best rank-r approximation
            u, s, vh = torch.linalg.svd(mean_prod)
            best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            assert torch.allclose(out[n][1] @ out[n][0], best, atol=1e-10)
            continue
        for f, factor in enumerate("AB"):  # what travels is averaged, the rest is the agent's
            want = sum(ad[n][f] for ad in ads) / 5 if factor in sent else ads[3][n][f]
            assert torch.allclose(out[n][f], want, atol=1e-12)
        if sent == alg.trains_in(rnd) != "AB":  # one factor mixed, the other frozen and shared
            assert torch.allclose(out[n][1] @ out[n][0], mean_prod, atol=1e-12)


# DeCAF's TSVD is not linear; HetLoRA's norm weights make each row of its mix sum to 1 but
# not each column, so neither keeps the network mean of the factors; a fold is defined on a
# server only (every agent the same mix), never over a ring
@pytest.mark.parametrize("alg, rnd", [p for p in ROUNDS if p.values[0].fold is None
                                      and p.values[0].name not in ("decaf", "hetlora")])
def test_doubly_stochastic_pi_preserves_the_network_mean(alg, rnd):
    n = 6
    pi = np.zeros((n, n))
    for i in range(n):
        pi[i, [i, (i + 1) % n, (i - 1) % n]] = 1 / 3
    ads = _adapters(n, share=_frozen(alg, rnd))
    mixed = [_mix(alg, ads, pi, i, rnd=rnd) for i in range(n)]
    for name in SHAPES:
        for part in (0, 1):
            before = sum(a[name][part] for a in ads) / n
            after = sum(a[name][part] for a in mixed) / n
            assert torch.allclose(before, after, atol=1e-12)


def test_decaf_preserves_the_product_mean_on_a_ring_with_full_rank():
    # with rank >= the neighbourhood's total rank the TSVD is exact, so the network mean of
    # the products is preserved as for any doubly stochastic linear mix
    n = 6
    pi = np.zeros((n, n))
    for i in range(n):
        pi[i, [i, (i + 1) % n, (i - 1) % n]] = 1 / 3
    ads = _adapters(n, rank=1)
    for name in SHAPES:
        mixed = []
        for i in range(n):
            ids = np.flatnonzero(pi[i])
            A, B = consensus.decaf_mix(torch.stack([ads[j][name][0] for j in ids]),
                                       torch.stack([ads[j][name][1] for j in ids]),
                                       torch.tensor(pi[i, ids], dtype=torch.float64), rank=3)
            mixed.append(B @ A)
        before = sum(a[name][1] @ a[name][0] for a in ads) / n
        assert torch.allclose(before, sum(mixed) / n, atol=1e-10)


@rounds
def test_same_inputs_same_numbers(alg, rnd):
    ads = _adapters(3, share=_frozen(alg, rnd))
    pi = np.full((3, 3), 1 / 3)
    a, b = _mix(alg, ads, pi, 1, rnd=rnd), _mix(alg, ads, pi, 1, rnd=rnd)
    for n in SHAPES:
        assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1])


def test_mixing_matrices_per_algorithm():
    ring = np.array([[.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
    assert np.allclose(ALGORITHMS["fedavg"].mixing(ring).toarray(), 1 / 3)
    assert np.array_equal(ALGORITHMS["local"].mixing(ring).toarray(), np.eye(3))
    assert ALGORITHMS["dlora"].mixing(ring) is ring


def test_floats_sent():
    shapes = {"q": (768, 768), "v": (768, 512)}
    assert ALGORITHMS["decaf"].floats_per_message(shapes, 2) == 2 * (768 + 768) + 2 * (768 + 512)
    assert ALGORITHMS["dlora_fa"].floats_per_message(shapes, 2) == 2 * 768 * 2
    assert ALGORITHMS["dlora"].floats_sent_per_round(shapes, 1, degree=2) == 2 * (1536 + 1280)
    assert ALGORITHMS["fedavg"].floats_sent_per_round(shapes, 1, degree=9) == 1536 + 1280
    assert ALGORITHMS["local"].floats_sent_per_round(shapes, 1, degree=2) == 0


def test_network_floats_count_the_servers_broadcast():
    # The paper's Table 1: FedAvg sends pN + 1 messages a round (N uploads, one broadcast).
    shapes, msg = {"q": (768, 768), "v": (768, 512)}, 1536 + 1280
    assert ALGORITHMS["fedavg"].floats_broadcast_per_round(shapes, 1) == msg
    assert ALGORITHMS["fedavg"].network_floats_per_round(shapes, 1, [9] * 10) == 11 * msg
    assert ALGORITHMS["dlora"].floats_broadcast_per_round(shapes, 1) == 0
    assert ALGORITHMS["dlora"].network_floats_per_round(shapes, 1, [2, 2, 2]) == 6 * msg
    assert ALGORITHMS["local"].network_floats_per_round(shapes, 1, [2, 2]) == 0


# name: (trains in rounds 1 and 2, travels in rounds 1 and 2); a new algorithm adds its row
CONTRACT = {
    "decaf": ("AB", "AB", "AB", "AB"), "dlora": ("AB", "AB", "AB", "AB"),
    "dlora_fa": ("B", "B", "B", "B"), "fedsa": ("AB", "AB", "A", "A"),
    "alternating": ("B", "A", "B", "A"), "hetlora": ("AB", "AB", "AB", "AB"),
    "fedavg": ("AB", "AB", "AB", "AB"), "fedavg_fa": ("B", "B", "B", "B"),
    "fedex": ("AB", "AB", "AB", "AB"), "flora": ("AB", "AB", "AB", "AB"),
    "local": ("AB", "AB", "", ""), "local_fa": ("B", "B", "", ""),
    "centralized": ("AB", "AB", "", ""),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_what_trains_and_what_travels(name):
    alg, (t1, t2, s1, s2) = ALGORITHMS[name], CONTRACT[name]
    assert (alg.trains_in(1), alg.trains_in(2), alg.trains_in(3)) == (t1, t2, t1)
    if not alg.communicates:
        assert s1 == s2 == ""
        return
    assert (alg.travels_in(1), alg.travels_in(2), alg.travels_in(3)) == (s1, s2, s1)
    ad = _adapters(1)[0]
    for rnd, sent in ((1, s1), (2, s2)):
        payload = alg.payload(ad, rnd)
        assert all((x is not None) == (f in sent) for pair in payload.values()
                   for f, x in zip("AB", pair))
        # what is counted is what travels: the floats of the payload's tensors
        floats = sum(x.numel() for pair in payload.values() for x in pair if x is not None)
        assert alg.floats_per_message(SHAPES, 2, rnd) == floats


def test_floats_of_the_one_factor_messages():
    shapes = {"q": (768, 768), "v": (768, 512)}
    fedsa, alt = ALGORITHMS["fedsa"], ALGORITHMS["alternating"]
    assert fedsa.floats_per_message(shapes, 2) == 2 * 768 + 2 * 512  # A: k r per module
    assert alt.floats_per_message(shapes, 2, rnd=1) == 2 * 768 + 2 * 768  # B: d r
    assert alt.floats_per_message(shapes, 2, rnd=2) == 2 * 768 + 2 * 512  # A: k r
    assert alt.floats_per_message(shapes, 2) == (2 * 768 * 3 + 2 * 512) / 2  # a cycle's mean
    assert alt.network_floats_per_round(shapes, 1, [2, 2, 2], rnd=1) == 6 * (768 + 768)
    with pytest.raises(ValueError, match="give the round"):
        alt.payload(_adapters(1)[0])


@pytest.mark.parametrize("name", ["fedsa", "alternating", "hetlora"])
def test_adam_tracked_is_refused_where_a_trained_factor_stays_home(name):
    with pytest.raises(ValueError, match="every factor it trains"):
        tracking(ALGORITHMS[name])


def _ring(n):
    pi = np.zeros((n, n))
    for i in range(n):
        pi[i, [i, (i + 1) % n, (i - 1) % n]] = 1 / 3
    return pi


@pytest.mark.parametrize("graph", ["complete", "ring"])
def test_alternating_mixes_are_exact_while_the_frozen_factor_is_shared(graph):
    """Rounds of ``alternating``, local training stood in for by a random change of the round's
    factor: a round's mix is exact on the product for agent i when the frozen factor is equal
    over i's neighbourhood. A uniform complete graph makes the mixed factor equal, so
    every round is exact; on a ring only round 1 (the shared A_0) is, and round 2 misses by
    sum_j pi_ij (B_j - B_i) A_j."""
    alg, n, g = ALGORITHMS["alternating"], 5, torch.Generator().manual_seed(3)
    pi = np.full((n, n), 1 / n) if graph == "complete" else _ring(n)
    ads = _adapters(n, share="A")
    for rnd in range(1, 5):
        f = "AB".index(alg.trains_in(rnd))
        ads = [{m: tuple(x + torch.randn(x.shape, generator=g).double() if i == f else x
                         for i, x in enumerate(pair)) for m, pair in ad.items()} for ad in ads]
        mixed = [_mix(alg, ads, pi, i, rnd=rnd) for i in range(n)]
        for i in range(n):
            ids = np.flatnonzero(pi[i])
            for m in SHAPES:
                want = sum(pi[i, j] * ads[j][m][1] @ ads[j][m][0] for j in ids)
                miss = want - mixed[i][m][1] @ mixed[i][m][0]
                if graph == "complete" or rnd == 1:
                    assert torch.allclose(miss, torch.zeros_like(miss), atol=1e-12)
                elif rnd == 2:
                    own_B = ads[i][m][1]
                    gap = sum(pi[i, j] * (ads[j][m][1] - own_B) @ ads[j][m][0] for j in ids)
                    assert torch.allclose(miss, gap, atol=1e-12) and float(gap.norm()) > 1e-3
        ads = mixed


def test_registry_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        register(Algorithm("decaf", "AB", "", None, "identity"))
    with pytest.raises(ValueError, match="lower_snake_case"):
        register(Algorithm("DeCAF-2", "AB", "", None, "identity"))
    with pytest.raises(ValueError, match="factor sets"):
        register(Algorithm("sends_c", "AB", "C", mix_dlora, "graph"))
    with pytest.raises(ValueError, match="exactly when it mixes"):
        register(Algorithm("sends_unmixed", "AB", "A", None, "graph"))


# ------------------------------------------------------------------ Algorithm 1 by hand


class QuadraticTask:
    """f_i(A, B) = 0.5 ||s B A - T_i||_F^2, agent i's target T_i taken from its first index."""

    num_classes = 2
    train_labels = np.array([0, 1])

    def __init__(self, targets, scale):
        self.targets, self.s = targets, scale

    def lora_shapes(self):
        return {"w": tuple(self.targets[0].shape)}

    def grad(self, A, B, i):
        G = self.s * (self.s * B @ A - self.targets[i])  # dL/dW
        return self.s * B.T @ (G / self.s), G @ A.T  # dL/dA = s B^T R, dL/dB = s R A^T

    def loss_and_grads(self, factors, indices, train_A=True, seed=None):
        A, B = factors["w"]
        i = int(indices[0])
        gA, gB = self.grad(A, B, i)
        loss = 0.5 * float(((self.s * B @ A - self.targets[i]) ** 2).sum())
        return loss, {"w": (gA if train_A else None, gB)}

    def evaluate(self, factors):
        return {}


@pytest.mark.parametrize("name", ["dlora", "dlora_fa"])
def test_two_agent_step_matches_a_hand_computation_of_algorithm_1(name):
    g = torch.Generator().manual_seed(0)
    d, k, r, s, lr = 5, 4, 2, 0.5, 0.1
    targets = [torch.randn(d, k, generator=g) for _ in range(2)]
    task = QuadraticTask(targets, s)
    alg = ALGORITHMS[name]
    A = [torch.randn(r, k, generator=g) for _ in range(2)]
    if not alg.train_A:
        A = [A[0], A[0]]
    B = [torch.randn(d, r, generator=g) for _ in range(2)]
    opt = build_optimizer(OptimConfig(name="sgd", lr=lr), 10)
    agents = [Agent(i, {"w": (A[i], B[i])}, {}, Sampler(np.array([i]), 1, 0)) for i in range(2)]
    group = AgentGroup(task, alg, opt, agents, seed=0, mix_options=MixOptions())
    payloads = group.grads_and_payloads(1)
    inbox = {i: ((0, 1), (0.5, 0.5), [payloads[0], payloads[1]]) for i in range(2)}
    group.mix_and_apply(1, inbox)

    for i in range(2):
        gA, gB = task.grad(A[i], B[i], i)  # gradient at w_t, before mixing (line 3)
        if name == "dlora":  # lines 6-7
            A_half, B_half = (A[0] + A[1]) / 2, (B[0] + B[1]) / 2
        else:  # Algorithm 2, line 6: A stays the shared A_0
            A_half, B_half = A[i], (B[0] + B[1]) / 2
        got_A, got_B = group.agents[i].factors["w"]
        assert torch.allclose(got_A, A_half - lr * gA if alg.train_A else A_half, atol=1e-6)
        assert torch.allclose(got_B, B_half - lr * gB, atol=1e-6)  # lines 15-16


def _two_agents(task, name, A, B, optim="sgd", lr=0.1, options=MixOptions()):
    opt = build_optimizer(OptimConfig(name=optim, lr=lr), 10)
    agents = [Agent(i, {"w": (A[i], B[i])}, opt.init({"w": (A[i], B[i])}),
                    Sampler(np.array([i]), 1, 0)) for i in range(2)]
    return AgentGroup(task, ALGORITHMS[name], opt, agents, 0, options)


def _communicate(group, t):
    payloads = group.grads_and_payloads(t)
    group.mix_and_apply(t, {i: ((0, 1), (0.5, 0.5), [payloads[0], payloads[1]]) for i in range(2)})


def test_fedsa_two_agent_step_by_hand():
    # FedSA-LoRA: A_i <- (A_0 + A_1) / 2 - lr gA, B_i <- B_i - lr gB (B never leaves the agent)
    g = torch.Generator().manual_seed(2)
    d, k, r, lr = 5, 4, 2, 0.1
    task = QuadraticTask([torch.randn(d, k, generator=g) for _ in range(2)], 0.5)
    A = [torch.randn(r, k, generator=g) for _ in range(2)]
    B = [torch.randn(d, r, generator=g) for _ in range(2)]
    group = _two_agents(task, "fedsa", A, B, lr=lr)
    _communicate(group, 1)
    for i in range(2):
        gA, gB = task.grad(A[i], B[i], i)
        got_A, got_B = group.agents[i].factors["w"]
        assert torch.allclose(got_A, (A[0] + A[1]) / 2 - lr * gA, atol=1e-6)
        assert torch.allclose(got_B, B[i] - lr * gB, atol=1e-6)


def test_alternating_two_rounds_by_hand():
    # round 1 trains and mixes B (A stays the shared A_0); round 2 trains and mixes A (B stays
    # each agent's own); one step a round
    g = torch.Generator().manual_seed(4)
    d, k, r, lr = 5, 4, 2, 0.1
    task = QuadraticTask([torch.randn(d, k, generator=g) for _ in range(2)], 0.5)
    A0 = torch.randn(r, k, generator=g)
    B = [torch.randn(d, r, generator=g) for _ in range(2)]
    group = _two_agents(task, "alternating", [A0, A0], B, lr=lr)
    _communicate(group, 1)
    B1 = [(B[0] + B[1]) / 2 - lr * task.grad(A0, B[i], i)[1] for i in range(2)]
    after1 = group.factors()
    for i in range(2):
        assert torch.equal(after1[i]["w"][0], A0)
        assert torch.allclose(after1[i]["w"][1], B1[i], atol=1e-6)
    _communicate(group, 2)
    for i in range(2):
        got_A, got_B = group.agents[i].factors["w"]
        gA = task.grad(A0, after1[i]["w"][1], i)[0]  # at w_2; A_0 mixed with A_0 is A_0
        assert torch.allclose(got_A, A0 - lr * gA, atol=1e-6)
        assert torch.equal(got_B, after1[i]["w"][1])


def test_a_frozen_factor_keeps_its_adam_state_across_alternating_rounds():
    g = torch.Generator().manual_seed(5)
    task = QuadraticTask([torch.randn(5, 4, generator=g) for _ in range(2)], 0.5)
    A0 = torch.randn(2, 4, generator=g)
    group = _two_agents(task, "alternating", [A0, A0], [torch.randn(5, 2, generator=g)] * 2,
                        optim="adam", lr=0.01)
    group.local_steps = 2  # rounds of two steps: steps 1-2 train B, steps 3-4 train A
    group.local_step(1)
    _communicate(group, 2)
    s1, B1 = group.agents[0].opt_state, group.agents[0].factors["w"][1]
    assert float(s1["m"]["w"][0].abs().sum()) == 0 < float(s1["m"]["w"][1].abs().sum())
    group.local_step(3)
    _communicate(group, 4)
    s2 = group.agents[0].opt_state
    assert s2["m"]["w"][1].equal(s1["m"]["w"][1]) and s2["v"]["w"][1].equal(s1["v"]["w"][1])
    assert group.agents[0].factors["w"][1].equal(B1)  # B neither trained nor mixed in round 2
    assert float(s2["m"]["w"][0].abs().sum()) > 0 and s2["count"] == 4


def test_decaf_two_agent_step_by_hand_with_factored_tsvd():
    # the full Algorithm 1 step for DeCAF with the factored TSVD, against the same arithmetic
    # written out: w_{t+1} = TSVD(mean of products) - lr * g(w_t)
    g = torch.Generator().manual_seed(1)
    d, k, r, s, lr = 6, 5, 2, 1.0, 0.05
    targets = [torch.randn(d, k, generator=g) for _ in range(2)]
    task = QuadraticTask(targets, s)
    A = [torch.randn(r, k, generator=g) for _ in range(2)]
    B = [torch.randn(d, r, generator=g) for _ in range(2)]
    agents = [Agent(i, {"w": (A[i], B[i])}, {}, Sampler(np.array([i]), 1, 0)) for i in range(2)]
    opt = build_optimizer(OptimConfig(name="sgd", lr=lr), 10)
    group = AgentGroup(task, ALGORITHMS["decaf"], opt, agents, 0, MixOptions())
    payloads = group.grads_and_payloads(1)
    group.mix_and_apply(1, {i: ((0, 1), (0.5, 0.5), [payloads[0], payloads[1]]) for i in range(2)})
    A_half, B_half = consensus.decaf_mix(torch.stack(A), torch.stack(B), torch.tensor([0.5, 0.5]))
    # lines 9-10: the product of the re-factorized pair is the best rank-r approximation of
    # the mean product, checked against a dense SVD (the paper's way)
    u, sv, vh = torch.linalg.svd((B[0] @ A[0] + B[1] @ A[1]) / 2)
    assert torch.allclose(B_half @ A_half, (u[:, :r] * sv[:r]) @ vh[:r], atol=1e-5)
    for i in range(2):
        gA, gB = task.grad(A[i], B[i], i)
        got_A, got_B = group.agents[i].factors["w"]
        assert torch.allclose(got_A, A_half - lr * gA, atol=1e-6)
        assert torch.allclose(got_B, B_half - lr * gB, atol=1e-6)


def test_aligned_mix_is_rotated_onto_each_agents_own_factors():
    ads = _adapters(3)
    pi = np.full((3, 3), 1 / 3)
    alg = ALGORITHMS["decaf"]
    plain = _mix(alg, ads, pi, 0, MixOptions(split="balanced"))
    for i in range(3):
        al = _mix(alg, ads, pi, i, MixOptions(split="aligned"))
        for n in SHAPES:
            assert torch.allclose(al[n][1] @ al[n][0], plain[n][1] @ plain[n][0], atol=1e-10)
            dist = lambda f: float(torch.linalg.norm(f[n][1] - ads[i][n][1]))
            assert dist(al) <= dist(plain) + 1e-9  # closer to the agent's own B


def test_conserved_mix_keeps_each_agents_imbalance_and_the_product():
    ads = _adapters(3)
    pi = np.full((3, 3), 1 / 3)
    alg = ALGORITHMS["decaf"]
    plain = _mix(alg, ads, pi, 0, MixOptions(split="balanced"))
    sq = lambda x: float(x.square().sum())
    for i in range(3):
        con = _mix(alg, ads, pi, i, MixOptions(split="conserved"))
        for n in SHAPES:
            assert torch.allclose(con[n][1] @ con[n][0], plain[n][1] @ plain[n][0], atol=1e-10)
            want = sq(ads[i][n][1]) - sq(ads[i][n][0])
            assert sq(con[n][1]) - sq(con[n][0]) == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("split", ["balanced", "aligned", "conserved"])
def test_decaf_mixes_of_many_agents_equal_their_mixes_alone(split):
    pi = np.array([[.5, .25, 0, 0, .25], [.25, .5, .25, 0, 0], [0, .25, .5, .25, 0],
                   [0, 0, .25, .5, .25], [.25, 0, 0, .25, .5]])
    _many_equal_alone(_adapters(5), pi, MixOptions(split=split))


def _many_equal_alone(ads, pi, opt):
    """``mix_decaf_many`` of every agent at once, each bit-identical to its mix alone."""
    from decaf_ray.algorithms import mix_decaf_many

    owns, payloads, rows = [], [], []
    for i in range(len(ads)):
        ids = np.flatnonzero(pi[i])
        owns.append(ads[i]), payloads.append([ads[j] for j in ids]), rows.append(pi[i, ids])
    many = mix_decaf_many(owns, payloads, torch.tensor(np.array(rows)), opt)
    for i in range(len(ads)):
        alone = _mix(ALGORITHMS["decaf"], ads, pi, i, opt)
        assert list(many[i]) == list(alone)
        for n in SHAPES:
            assert many[i][n][0].equal(alone[n][0]) and many[i][n][1].equal(alone[n][1])
    return many


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_refactor_state_policies(opt):
    from decaf_ray.optim import refactor_state

    ads = _adapters(2)
    old, new = ads[0], {n: (torch.eye(2, dtype=torch.float64)[[1, 0]] @ a, b[:, [1, 0]])
                        for n, (a, b) in ads[0].items()}  # the same factors, directions swapped
    optimizer = build_optimizer(OptimConfig(name=opt, lr=0.1), 10)
    grads = {n: (torch.ones_like(a), torch.ones_like(b) * 2) for n, (a, b) in old.items()}
    grads["q"] = (torch.arange(10.).reshape(2, 5).double(), grads["q"][1])
    _, state = optimizer.update(grads, optimizer.init(old), old, 1)
    assert refactor_state(state, old, new, "keep") is state
    reset = refactor_state(state, old, new, "reset")
    assert all(float(x.abs().sum()) == 0 for k, tree in reset.items() if isinstance(tree, dict)
               for a, b in tree.values() for x in (a, b))
    rotated = refactor_state(state, old, new, "rotate")
    key = "velocity" if opt == "momentum" else "m"
    # a permutation of directions permutes the rows of the A-moments
    assert torch.allclose(rotated[key]["q"][0], state[key]["q"][0][[1, 0]], atol=1e-10)


@pytest.mark.parametrize("name", ["fedsa", "alternating"])
def test_runs_from_a_config_by_name_and_counts_what_each_round_sent(name):
    from decaf_ray.experiment import run
    from decaf_ray.experiment_config import load_config

    cfg = load_config({
        "algorithm": name, "agents": 4, "topology": "ring", "rounds": 3, "local_steps": 2,
        "task": {"kind": "synthetic", "d": 6, "k": 16, "samples": 200, "test_samples": 50},
        "data": {"batch_size": 8}, "lora": {"rank": 2}, "optim": {"name": "adam", "lr": 0.05},
        "runtime": {"kind": "inprocess", "threads": 1}, "grad_norm": False})
    res = run(cfg, progress=False)
    assert res.status == "completed"
    sent = {r["round"]: r["value"] for r in res.rows
            if r["agent"] == -1 and r["metric"] == "floats_sent"}
    # a ring: two messages per agent a round; d = 6, k = 16, r = 2, one LoRA module
    per_round = {1: 2 * 12, 2: 2 * 32, 3: 2 * 12} if name == "alternating" else {1: 2 * 32}
    assert sent == {k: sum(per_round.get(j, per_round[1]) for j in range(1, k + 1))
                    for k in range(4)}


# ------------------------------------------------------------------ agents of different ranks


def _ranked(ranks, seed=0):
    """Random adapters (float64) of SHAPES, agent i of rank ranks[i]."""
    g = torch.Generator().manual_seed(seed)
    return [{n: (torch.randn(r, k, generator=g).double(), torch.randn(d, r, generator=g).double())
             for n, (d, k) in SHAPES.items()} for r in ranks]


@pytest.mark.parametrize("name", ["decaf", "hetlora"])
def test_mixes_of_different_ranks_keep_each_agents_rank(name):
    ranks, pi = [1, 3, 2, 2], _ring(4)
    ads, alg = _ranked(ranks), ALGORITHMS[name]
    for i in range(4):
        out = _mix(alg, ads, pi, i)
        for n, (d, k) in SHAPES.items():
            assert out[n][0].shape == (ranks[i], k) and out[n][1].shape == (d, ranks[i])
        if name == "decaf":  # the TSVD at r_i of the mixed product: Eckart-Young's error
            ids = np.flatnonzero(pi[i])
            for n in SHAPES:
                M = sum(pi[i, j] * ads[j][n][1] @ ads[j][n][0] for j in ids)
                miss = torch.linalg.norm(M - out[n][1] @ out[n][0])
                best = torch.linalg.svdvals(M)[ranks[i]:].norm()
                assert float(miss) == pytest.approx(float(best), abs=1e-10)


def test_decaf_is_exact_for_an_agent_whose_rank_covers_the_mixed_product():
    # agent 0 of rank 5 mixes neighbours of ranks 1 and 2 (and itself, rank 5 but with only
    # 2 nonzero directions): M has rank <= 5, so its TSVD at rank 5 is M itself
    ads = _ranked([5, 1, 2])
    ads[0] = {n: (a, torch.cat([b[:, :2], torch.zeros_like(b[:, 2:])], 1))
              for n, (a, b) in ads[0].items()}
    pi = np.full((3, 3), 1 / 3)
    out = _mix(ALGORITHMS["decaf"], ads, pi, 0)
    for n in SHAPES:
        M = sum(ad[n][1] @ ad[n][0] for ad in ads) / 3
        assert out[n][0].shape[0] == 5
        assert torch.allclose(out[n][1] @ out[n][0], M, atol=1e-10)


@pytest.mark.parametrize("split", ["balanced", "conserved"])
def test_decaf_mixes_of_many_agents_of_different_ranks_equal_their_mixes_alone(split):
    ranks = [2, 1, 2, 3, 2]
    many = _many_equal_alone(_ranked(ranks), _ring(5), MixOptions(split=split))
    assert [m["q"][0].shape[0] for m in many] == ranks


def test_diagnostics_of_different_ranks_use_the_agents_own_rank():
    from decaf_ray.algorithms import diagnostics

    ranks, pi, i = [1, 3, 2, 2], _ring(4), 1
    ads = _ranked(ranks)
    ids = np.flatnonzero(pi[i])
    w = torch.tensor(pi[i, ids])
    payloads = [ads[j] for j in ids]
    mixed = ALGORITHMS["decaf"].mix(ads[i], payloads, w, MixOptions(split="balanced"))
    diag = diagnostics(ads[i], payloads, w, mixed)
    sq = 0.0
    for n in SHAPES:  # the TSVD error is what the r_i = 3 truncation drops
        M = sum(wj * ads[j][n][1] @ ads[j][n][0] for wj, j in zip(w, ids))
        sq += float(torch.linalg.svdvals(M)[3:].square().sum())
    assert diag["tsvd_error"] == pytest.approx(sq ** 0.5, rel=1e-8)
    assert 0 < diag["tsvd_error"] <= diag["prop1_bound"]  # sqrt(1 + 3 + 2 - 3) c^2


def _hetero(algorithm, **over):
    from decaf_ray.experiment_config import load_config

    return load_config({
        "algorithm": algorithm, "agents": 5, "topology": "star", "rounds": 3, "eval_every": 3,
        "task": {"kind": "synthetic", "d": 6, "k": 16, "samples": 200, "test_samples": 50},
        "data": {"batch_size": 8}, "lora": {"rank": 2, "rank_rule": "neighbourhood"},
        "optim": {"name": "adam", "lr": 0.05}, "runtime": {"kind": "inprocess", "threads": 1},
        **over})


@pytest.mark.parametrize("name", ["decaf", "hetlora"])
def test_a_star_with_the_neighbourhood_rank_rule_runs_and_counts_each_agents_payload(name):
    from decaf_ray.experiment import run
    from decaf_ray.plan import prepare

    plan = prepare(_hetero(name))
    # the hub mixes 5 adapters, each leaf 2: mean m = 13/5, r = floor(2 m / (13/5) + 1/2)
    assert plan.ranks == (4, 2, 2, 2, 2)
    res = run(plan.config, progress=False, plan=plan)
    assert res.status == "completed"
    assert [f["linear"][0].shape[0] for _, f in sorted(res.factors.items())] == list(plan.ranks)
    # floats counted from what each agent's payload holds, sent to each of its neighbours
    alg = plan.algorithm
    sent = sum(plan.degree(i) * sum(x.numel() for pair in alg.payload(f).values() for x in pair)
               for i, f in res.factors.items())
    assert res.summary["floats_sent_per_round_per_agent"] == sent / 5
    assert res.summary["trainable_params_per_agent"] == (4 + 2 * 4) * 22 / 5
    assert res.summary["final"]["tsvd_error"] >= 0 and "prop1_bound" in res.summary["final"]


# ------------------------------------------------------------------ folds into the base weights

FOLDS = [n for n, a in ALGORITHMS.items() if a.fold is not None]


def test_the_folds_are_the_server_algorithms_fedex_and_flora():
    assert FOLDS == ["fedex", "flora"]
    assert all(ALGORITHMS[n].pi == "server" and ALGORITHMS[n].communicates for n in FOLDS)
    with pytest.raises(ValueError, match="only a server algorithm"):
        register(Algorithm("gossip_fold", "AB", "AB", None, "graph", fold=folding.FEDEX))


@pytest.mark.parametrize("name, ranks", [("fedex", [2, 2, 2, 2]), ("flora", [2, 2, 2, 2]),
                                         ("flora", [1, 3, 2, 2])])
def test_folds_are_exact(name, ranks):
    """Server weights p_j, scale s: FedEx-LoRA's W0 + delta + s B' A' is the exact average of
    the clients' W0 + s B_j A_j, with FedAvg's A' and B' (bit for bit); FLoRA's base gains
    exactly s sum_j p_j B_j A_j, whatever the ranks, and its fresh adapter (A from the seed at
    the largest rank, B = 0) adds nothing."""
    alg, ads, p, s = ALGORITHMS[name], _ranked(ranks, seed=7), [0.1, 0.2, 0.3, 0.4], 0.75
    g = torch.Generator().manual_seed(1)
    W0 = {n: torch.randn(d, k, generator=g, dtype=torch.float64) for n, (d, k) in SHAPES.items()}
    mixed, delta = _fold(alg, ads, p, MixOptions(scale=s, init_std=0.5), seed=3)
    for n in SHAPES:
        want = sum(pj * (W0[n] + s * ad[n][1] @ ad[n][0]) for pj, ad in zip(p, ads))
        got = W0[n] + delta[n] + s * mixed[n][1].double() @ mixed[n][0].double()
        assert torch.allclose(got, want, atol=1e-12)
    if name == "fedex":
        avg = ALGORITHMS["fedavg"].mix(ads[0], ads, torch.tensor(p, dtype=torch.float64),
                                       MixOptions())
        for n in SHAPES:
            assert mixed[n][0].equal(avg[n][0]) and mixed[n][1].equal(avg[n][1])
            assert float(delta[n].norm()) > 1e-3  # what FedAvg's factors miss
    else:
        fresh = init_factors(SHAPES, max(ranks), torch.Generator().manual_seed(3), 0.5)
        for n in SHAPES:
            assert mixed[n][0].equal(fresh[n][0]) and not mixed[n][1].any()


@pytest.mark.parametrize("name", FOLDS)
def test_a_fold_gives_the_same_numbers_for_the_same_inputs(name):
    ads, alg = _adapters(3), ALGORITHMS[name]
    (m1, d1), (m2, d2) = (_fold(alg, ads, [1 / 3] * 3, seed=5) for _ in range(2))
    for n in SHAPES:
        assert d1[n].equal(d2[n]) and m1[n][0].equal(m2[n][0]) and m1[n][1].equal(m2[n][1])


@pytest.mark.parametrize("name, ranks", [("fedex", [2, 2, 2]), ("flora", [1, 3, 2])])
def test_what_the_server_broadcasts_is_counted(name, ranks):
    """Uploads are the agents' payloads (A, B); the broadcast is FedEx-LoRA's A', B' and the
    d x k residual, or FLoRA's stacked factors [p_j B_j], [A_j], counted from the tensors."""
    alg, ads, p = ALGORITHMS[name], _ranked(ranks), [1 / 3] * 3
    mixed, delta = _fold(alg, ads, p)
    w = torch.tensor(p, dtype=torch.float64)
    if name == "fedex":
        sent = [x for pair in mixed.values() for x in pair] + list(delta.values())
    else:
        sent = [x for n in SHAPES
                for x in folding.stacked([a[n][0] for a in ads], [a[n][1] for a in ads], w)]
    broadcast = sum(x.numel() for x in sent)
    assert alg.floats_broadcast_per_round(SHAPES, ranks) == broadcast
    uploads = sum(x.numel() for a in ads for pair in alg.payload(a).values() for x in pair)
    assert alg.network_floats_per_round(SHAPES, ranks, [2, 2, 2]) == uploads + broadcast
    with pytest.raises(ValueError, match="every agent's rank"):
        alg.floats_broadcast_per_round(SHAPES, 2)


class BaseQuadratic(QuadraticTask):
    """QuadraticTask on a frozen base S (``set_base_delta``): f_i = 0.5 ||S + s B A - T_i||^2."""

    def __init__(self, targets, scale):
        super().__init__(targets, scale)
        self.S, self.sets = torch.zeros_like(targets[0]), 0

    def set_base_delta(self, delta):
        self.S, self.sets = torch.zeros_like(self.S) if delta is None else delta["w"], self.sets + 1

    def grad(self, A, B, i):
        R = self.S + self.s * B @ A - self.targets[i]
        return self.s * B.T @ R, self.s * R @ A.T


def test_fedex_two_rounds_by_hand():
    # every agent gets A' = mean A, B' = mean B and takes the step of its gradient at w_t there
    # (Algorithm 1's order, as FedAvg); the group's base gains s (mean B_i A_i - B' A') once a
    # round, and round 2's gradients see it
    g = torch.Generator().manual_seed(6)
    d, k, r, s, lr = 5, 4, 2, 0.5, 0.1
    task = BaseQuadratic([torch.randn(d, k, generator=g) for _ in range(2)], s)
    S = torch.zeros(d, k)
    factors = [(torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)) for _ in range(2)]
    group = _two_agents(task, "fedex", [a for a, _ in factors], [b for _, b in factors], lr=lr,
                        options=MixOptions(scale=s))
    for t in (1, 2):
        _communicate(group, t)
        A_, B_ = sum(a for a, _ in factors) / 2, sum(b for _, b in factors) / 2
        expect = BaseQuadratic(task.targets, s)
        expect.S = S
        grads = [expect.grad(a, b, i) for i, (a, b) in enumerate(factors)]
        S = S + s * (sum(b @ a for a, b in factors) / 2 - B_ @ A_)
        factors = [(A_ - lr * gA, B_ - lr * gB) for gA, gB in grads]
        assert task.sets == t and torch.allclose(task.S, S, atol=1e-6)
        assert group.base_delta["w"] is task.S
        for i in range(2):
            got_A, got_B = group.agents[i].factors["w"]
            assert torch.allclose(got_A, factors[i][0], atol=1e-6)
            assert torch.allclose(got_B, factors[i][1], atol=1e-6)


def test_flora_round_by_hand():
    # each agent steps first and publishes w_{t+1}; the base gains s mean(B_i A_i) of what was
    # published; both agents restart from A drawn from (seed, round), B = 0, Adam state anew
    from decaf_ray.agents import derive_seed
    from decaf_ray.optim import apply_updates

    g = torch.Generator().manual_seed(8)
    d, k, r, s, lr = 5, 4, 2, 0.5, 0.05
    task = BaseQuadratic([torch.randn(d, k, generator=g) for _ in range(2)], s)
    A = [torch.randn(r, k, generator=g) for _ in range(2)]
    B = [torch.randn(d, r, generator=g) for _ in range(2)]
    group = _two_agents(task, "flora", A, B, optim="adam", lr=lr,
                        options=MixOptions(scale=s, init_std=0.3))
    _communicate(group, 1)
    adam = build_optimizer(OptimConfig(name="adam", lr=lr), 10)
    before = QuadraticTask(task.targets, s)
    sent = []
    for i in range(2):  # the gradient at w_t, on the base before the fold (S = 0)
        w = {"w": (A[i], B[i])}
        updates, _ = adam.update({"w": before.grad(A[i], B[i], i)}, adam.init(w), w, 1)
        sent.append(apply_updates(w, updates)["w"])
    assert torch.allclose(task.S, s * sum(b @ a for a, b in sent) / 2, atol=1e-6)
    fresh = init_factors({"w": (d, k)}, r, torch.Generator().manual_seed(derive_seed(0, 5, 1)),
                         0.3)
    for agent in group.agents.values():
        assert agent.factors["w"][0].equal(fresh["w"][0]) and not agent.factors["w"][1].any()
        assert agent.opt_state["count"] == 0 and not agent.opt_state["m"]["w"][0].any()


def test_a_fold_refuses_agents_that_received_different_payloads():
    g = torch.Generator().manual_seed(9)
    task = BaseQuadratic([torch.randn(5, 4, generator=g) for _ in range(2)], 0.5)
    group = _two_agents(task, "fedex", [torch.randn(2, 4, generator=g)] * 2,
                        [torch.randn(5, 2, generator=g)] * 2)
    payloads = group.grads_and_payloads(1)
    inbox = {0: ((0, 1), (0.5, 0.5), [payloads[0], payloads[1]]),
             1: ((0, 1), (0.25, 0.75), [payloads[0], payloads[1]])}
    with pytest.raises(ValueError, match="same payloads and weights"):
        group.mix_and_apply(1, inbox)


def _fold_cfg(name, **lora):
    from decaf_ray.experiment_config import load_config

    return load_config({
        "algorithm": name, "agents": 4, "topology": "ring", "rounds": 3, "local_steps": 2,
        "task": {"kind": "synthetic", "d": 6, "k": 16, "samples": 200, "test_samples": 50},
        "data": {"batch_size": 8}, "lora": {"rank": 2, **lora},
        "optim": {"name": "adam", "lr": 0.05}, "runtime": {"kind": "inprocess", "threads": 1},
        "grad_norm": False})


@pytest.mark.parametrize("name, ranks", [("fedex", None), ("flora", None),
                                         ("flora", [1, 2, 3, 2])])
def test_folds_run_from_a_config_by_name_and_count_uploads_and_the_broadcast(name, ranks):
    from decaf_ray.experiment import run

    res = run(_fold_cfg(name, ranks=ranks), progress=False)
    assert res.status == "completed"
    rs = ranks or [2] * 4
    assert [f["linear"][0].shape[0] for _, f in sorted(res.factors.items())] == rs
    # d = 6, k = 16: every agent uploads (d + k) r_i; the server broadcasts (d + k) r + d k
    # (FedEx-LoRA) or the stack, (d + k) sum_j r_j (FLoRA)
    broadcast = 22 * 2 + 96 if name == "fedex" else 22 * sum(rs)
    assert res.summary["floats_sent_per_round_per_agent"] == (22 * sum(rs) + broadcast) / 4


def test_fedex_refuses_agents_of_different_ranks():
    from decaf_ray.config import ConfigError

    with pytest.raises(ConfigError, match="lora.ranks"):
        _fold_cfg("fedex", ranks=[1, 2, 3, 2])
