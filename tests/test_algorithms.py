"""Contract tests every algorithm passes, and Algorithm 1 checked by hand."""

import numpy as np
import pytest
import torch

from decaf_ray import consensus
from decaf_ray.agents import Agent, AgentGroup, Sampler
from decaf_ray.algorithms import ALGORITHMS, Algorithm, MixOptions, register
from decaf_ray.config import OptimConfig
from decaf_ray.factors import init_factors
from decaf_ray.optim import build_optimizer

SHAPES = {"q": (6, 5), "v": (6, 5), "o": (4, 7)}
COMMUNICATING = [a for a in ALGORITHMS.values() if a.communicates]


def _adapters(m, rank=2, seed=0, share_A=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        f = init_factors(SHAPES, rank, g, std=1.0)
        out.append({n: (a.double(), torch.randn(b.shape, generator=g).double())
                    for n, (a, b) in f.items()})
    if share_A:
        out = [{n: (out[0][n][0], b) for n, (_, b) in f.items()} for f in out]
    return out


def _mix(alg, adapters, pi, i, opt=MixOptions()):
    ids = np.flatnonzero(pi[i])
    w = torch.tensor(pi[i, ids], dtype=torch.float64)
    return alg.mix(adapters[i], [alg.payload(adapters[j]) for j in ids], w, opt)


@pytest.mark.parametrize("alg", COMMUNICATING, ids=lambda a: a.name)
def test_shapes_are_stable(alg):
    ads = _adapters(4, share_A=not alg.train_A)
    pi = np.full((4, 4), 0.25)
    out = _mix(alg, ads, pi, 0)
    for n in SHAPES:
        assert out[n][0].shape == ads[0][n][0].shape and out[n][1].shape == ads[0][n][1].shape


@pytest.mark.parametrize("alg", COMMUNICATING, ids=lambda a: a.name)
def test_complete_graph_gives_the_exact_average(alg):
    ads = _adapters(5, share_A=not alg.train_A)
    pi = np.full((5, 5), 0.2)
    out = _mix(alg, ads, pi, 3)
    for n in SHAPES:
        mean_prod = sum(b @ a for a, b in (ad[n] for ad in ads)) / 5
        if alg.name == "decaf":
            # the exact TSVD of the average product: the best rank-r approximation
            u, s, vh = torch.linalg.svd(mean_prod)
            best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            assert torch.allclose(out[n][1] @ out[n][0], best, atol=1e-10)
        else:
            assert torch.allclose(out[n][1], sum(ad[n][1] for ad in ads) / 5, atol=1e-12)
            assert torch.allclose(out[n][0], sum(ad[n][0] for ad in ads) / 5, atol=1e-12)
            if not alg.train_A:  # FA: the product average is exact too
                assert torch.allclose(out[n][1] @ out[n][0], mean_prod, atol=1e-12)


@pytest.mark.parametrize("alg", [a for a in COMMUNICATING if a.name != "decaf"], ids=lambda a: a.name)
def test_doubly_stochastic_pi_preserves_the_network_mean(alg):
    n = 6
    pi = np.zeros((n, n))
    for i in range(n):
        pi[i, [i, (i + 1) % n, (i - 1) % n]] = 1 / 3
    ads = _adapters(n, share_A=not alg.train_A)
    mixed = [_mix(alg, ads, pi, i) for i in range(n)]
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


@pytest.mark.parametrize("alg", COMMUNICATING, ids=lambda a: a.name)
def test_same_inputs_same_numbers(alg):
    ads = _adapters(3, share_A=not alg.train_A)
    pi = np.full((3, 3), 1 / 3)
    a, b = _mix(alg, ads, pi, 1), _mix(alg, ads, pi, 1)
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


def test_registry_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        register(Algorithm("decaf", True, None, "identity"))
    with pytest.raises(ValueError, match="lower_snake_case"):
        register(Algorithm("DeCAF-2", True, None, "identity"))


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
    from decaf_ray.algorithms import mix_decaf_many

    ads = _adapters(5)
    pi = np.array([[.5, .25, 0, 0, .25], [.25, .5, .25, 0, 0], [0, .25, .5, .25, 0],
                   [0, 0, .25, .5, .25], [.25, 0, 0, .25, .5]])
    opt = MixOptions(split=split)
    owns, payloads, rows = [], [], []
    for i in range(5):
        ids = np.flatnonzero(pi[i])
        owns.append(ads[i]), payloads.append([ads[j] for j in ids]), rows.append(pi[i, ids])
    many = mix_decaf_many(owns, payloads, torch.tensor(np.array(rows)), opt)
    for i in range(5):
        alone = _mix(ALGORITHMS["decaf"], ads, pi, i, opt)
        assert list(many[i]) == list(alone)
        for n in SHAPES:
            assert many[i][n][0].equal(alone[n][0]) and many[i][n][1].equal(alone[n][1])


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
