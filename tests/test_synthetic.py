"""The synthetic task: deterministic data, correct gradients, a reachable known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decaf_ray.config import ConfigError, LoRAConfig, from_dict
from decaf_ray.factors import init_factors
from decaf_ray.tasks import build_task
from decaf_ray.tasks.synthetic import SyntheticConfig, build

LORA = LoRAConfig(rank=2, alpha=2.0)
FORMS = ["classification", "regression"]



def make(seed: int = 0, lora: LoRAConfig = LORA, **task):
    return build(from_dict(SyntheticConfig, task), lora, seed)


def random_factors(task, rank: int = 2, seed: int = 1):
    """Nonzero A (r, k) and B (d, r), so neither gradient vanishes by construction."""
    g = torch.Generator().manual_seed(seed)
    d, k = task.lora_shapes()["linear"]
    return {"linear": (torch.randn(rank, k, generator=g) * 0.3,
                       torch.randn(d, rank, generator=g) * 0.3)}


def gradient_descent(task, lr: float, steps: int, indices=None):
    f = init_factors(task.lora_shapes(), LORA.rank, torch.Generator().manual_seed(0))
    idx = np.arange(len(task.train_labels)) if indices is None else indices
    for _ in range(steps):
        _, g = task.loss_and_grads(f, idx, True, 0)
        f = {n: (a - lr * g[n][0], b - lr * g[n][1]) for n, (a, b) in f.items()}
    return f


@pytest.mark.parametrize("form", FORMS)
def test_shapes_labels_and_registry(form):
    task = build_task(from_dict(SyntheticConfig, {"form": form, "samples": 300}), LORA, 0)
    assert task.lora_shapes() == {"linear": (10, 32)}
    assert task.train_labels.dtype == np.int64 and task.train_labels.shape == (300,)
    assert task.num_classes == 10
    assert 0 <= task.train_labels.min() and task.train_labels.max() < task.num_classes
    if form == "regression":  # clusters are balanced
        assert np.bincount(task.train_labels).tolist() == [30] * 10
    assert task.x_train.dtype == torch.float32


@pytest.mark.parametrize("form", FORMS)
def test_determinism_and_global_rng_untouched(form):
    state = torch.get_rng_state()
    t1, t2, t3 = make(0, form=form), make(0, form=form), make(1, form=form)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(t1.x_train, t2.x_train) and torch.equal(t1.y_train, t2.y_train)
    assert torch.equal(t1.x_test, t2.x_test) and torch.equal(t1.delta, t2.delta)
    np.testing.assert_array_equal(t1.train_labels, t2.train_labels)
    f, idx = random_factors(t1), np.arange(0, 200, 3)
    (l1, g1), (l2, g2) = t1.loss_and_grads(f, idx, True, 0), t2.loss_and_grads(f, idx, True, 0)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(g1["linear"], g2["linear"]))
    assert not torch.equal(t1.x_train, t3.x_train) and not torch.equal(t1.delta, t3.delta)


def test_more_samples_keep_the_model_and_test_set():
    small, big = make(0, samples=100), make(0, samples=500)
    assert torch.equal(small.delta, big.delta) and torch.equal(small.w0, big.w0)
    assert torch.equal(small.x_test, big.x_test)


@pytest.mark.parametrize("form", FORMS)
def test_gradients_match_the_analytic_formula(form):
    task = make(0, form=form)
    f, idx = random_factors(task), np.array([5, 17, 17, 400, 1999, 3, 250])
    loss, grads = task.loss_and_grads(f, idx, True, 0)
    a, b = (t.double() for t in f["linear"])
    s, x = LORA.scale, task.x_train[idx].double()
    out = x @ (task.w0.double() + s * b @ a).T
    if form == "classification":
        y = torch.nn.functional.one_hot(task.y_train[idx], 10).double()
        p = torch.softmax(out, 1)
        ref_loss = -(y * torch.log(p)).sum(1).mean()
        resid = p - y
    else:
        resid = out - task.y_train[idx].double()
        ref_loss = 0.5 * resid.pow(2).sum(1).mean()
    G = resid.T @ x / len(idx)  # dL/dW (d, k)
    ga, gb = grads["linear"]
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(gb.double(), s * G @ a.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ga.double(), s * b.T @ G, rtol=1e-4, atol=1e-5)
    assert ga.dtype == gb.dtype == torch.float32


@pytest.mark.parametrize("form", FORMS)
def test_gradient_matches_finite_difference(form):
    task = make(0, form=form)
    f, idx = random_factors(task), np.arange(64)
    _, grads = task.loss_and_grads(f, idx, True, 0)
    g = torch.Generator().manual_seed(9)
    dirs = [torch.randn(t.shape, generator=g) for t in f["linear"]]
    eps = 1e-3

    def loss_at(t):
        return task.loss_and_grads({"linear": tuple(p + t * d for p, d in zip(f["linear"], dirs))},
                                   idx, True, 0)[0]

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads["linear"], dirs))
    assert numeric == pytest.approx(analytic, rel=2e-2)


@pytest.mark.parametrize("form", FORMS)
def test_zero_B_gives_zero_grad_A(form):
    task = make(0, form=form)
    f = init_factors(task.lora_shapes(), 2, torch.Generator().manual_seed(0))
    _, grads = task.loss_and_grads(f, np.arange(64), True, 0)
    ga, gb = grads["linear"]
    assert torch.count_nonzero(ga) == 0
    assert gb.norm() > 1e-3


@pytest.mark.parametrize("form", FORMS)
def test_frozen_A_and_caller_tensors_untouched(form):
    task = make(0, form=form)
    f, idx = random_factors(task), np.arange(32)
    before = [t.clone() for t in f["linear"]]
    loss_full, full = task.loss_and_grads(f, idx, True, 0)
    loss_fa, fa = task.loss_and_grads(f, idx, False, 0)
    assert fa["linear"][0] is None and loss_fa == loss_full
    torch.testing.assert_close(fa["linear"][1], full["linear"][1])
    assert all(torch.equal(t, u) and not t.requires_grad for t, u in zip(f["linear"], before))
    assert not any(g.requires_grad for g in full["linear"])


def test_dropout_draws_from_the_step_seed_alone_and_not_in_evaluation():
    task = make(0, lora=LoRAConfig(rank=2, alpha=2.0, dropout=0.5))
    f, idx = random_factors(task), np.arange(64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    l1, g1 = task.loss_and_grads(f, idx, True, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
    torch.manual_seed(7)  # whatever the global generator holds, the step's draws are its seed's
    l2, g2 = task.loss_and_grads(f, idx, True, 3)
    l3, _ = task.loss_and_grads(f, idx, True, 4)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(g1["linear"], g2["linear"]))
    assert l1 != l3
    # The stream is torch's CPU generator seeded with the step's seed (the CPU numbers of the
    # runtime that seeded the global generator before each step).
    torch.manual_seed(3)
    x = task.x_train[torch.as_tensor(idx)]
    xin = torch.nn.functional.dropout(x, 0.5, training=True)
    a, b = f["linear"]
    out = x @ task.w0.T + task.scale * (xin @ a.T) @ b.T
    assert float(torch.nn.functional.cross_entropy(out, task.y_train[torch.as_tensor(idx)])) == l1
    assert task.evaluate(f) == task.evaluate(f)


@pytest.mark.parametrize("form", FORMS)
def test_true_shift_scores_zero_error(form):
    task = make(0, form=form)
    u, sv, vh = torch.linalg.svd(task.delta / LORA.scale)
    b, a = u[:, :2] * sv[:2].sqrt(), sv[:2].sqrt()[:, None] * vh[:2]
    assert task.evaluate({"linear": (a, b)})["shift_error"] < 1e-4
    assert task.evaluate({"linear": (torch.zeros_like(a), b)})["shift_error"] == pytest.approx(1.0)
    if form == "classification":  # a logit shift shared by all classes is invisible
        common = torch.zeros_like(b)
        common[:, 0] = 1.0
        moved = task.evaluate({"linear": (a, b + common)})
        assert moved["shift_error"] < 1e-4
        assert moved["test_loss"] == pytest.approx(task.evaluate({"linear": (a, b)})["test_loss"],
                                                   rel=1e-4)


def test_one_agent_learns_classification():
    task = make(0, samples=1000)
    f0 = init_factors(task.lora_shapes(), 2, torch.Generator().manual_seed(0))
    start = task.evaluate(f0)
    end = task.evaluate(gradient_descent(task, lr=0.5, steps=200))
    assert end["test_loss"] < 0.2 * start["test_loss"]
    # chance is 0.1, the frozen W0 about 0.5, the Bayes classifier about 0.92
    assert end["test_accuracy"] > max(0.85, start["test_accuracy"] + 0.3)
    assert end["shift_error"] < 0.2


def test_one_agent_recovers_the_regression_shift():
    # Curvature grows with the shift's singular values: at defaults GD is stable for lr <~ 0.3.
    task = make(0, form="regression", samples=500)
    start = task.evaluate(init_factors(task.lora_shapes(), 2, torch.Generator().manual_seed(0)))
    end = task.evaluate(gradient_descent(task, lr=0.2, steps=100))
    assert start["shift_error"] == pytest.approx(1.0)
    assert end["test_loss"] < 0.05 * start["test_loss"]
    assert end["shift_error"] < 0.05


def test_heterogeneous_clusters_disagree_but_the_mixture_optimum_is_the_shift():
    task = make(0, form="regression", heterogeneity=1.0)
    everyone = task.evaluate(gradient_descent(task, lr=0.2, steps=150))
    one_cluster = np.flatnonzero(task.train_labels == 0)
    # A cluster's own optimum W* + D_c is larger than W*, hence more curved: a smaller step.
    alone = task.evaluate(gradient_descent(task, lr=0.1, steps=150, indices=one_cluster))
    assert everyone["shift_error"] < 0.15
    assert alone["shift_error"] > 0.5


def test_degenerate_but_valid_shapes():
    task = make(0, form="regression", d=1, k=1, true_rank=1, clusters=3, samples=30)
    assert torch.count_nonzero(task.mus) == 0  # no room for means beside the shift
    loss, grads = task.loss_and_grads(random_factors(task, rank=2), np.arange(30), True, 0)
    assert np.isfinite(loss) and grads["linear"][1].shape == (1, 2)


@pytest.mark.parametrize("field, values", [
    ("true_rank", {"true_rank": 11}),
    ("true_rank", {"true_rank": 10}),  # classification loses one rank to centring
    ("true_rank", {"true_rank": 0}),
    ("true_rank", {"form": "regression", "k": 3, "true_rank": 4}),
    ("d", {"d": 1}),
    ("k", {"k": 0}),
    ("clusters", {"form": "regression", "clusters": 0}),
    ("samples", {"samples": 0}),
    ("test_samples", {"test_samples": 0}),
    ("noise", {"noise": 0.0}),
    ("noise", {"form": "regression", "noise": -0.1}),
    ("heterogeneity", {"heterogeneity": 0.5}),
    ("heterogeneity", {"form": "regression", "heterogeneity": -1.0}),
    ("separation", {"form": "regression", "separation": -1.0}),
    ("shift_scale", {"shift_scale": 0.0}),
    ("kind", {"kind": "clip"}),
    ("form", {"form": "ranking"}),
])
def test_invalid_config_names_the_field(field, values):
    with pytest.raises(ConfigError) as err:
        from_dict(SyntheticConfig, values)
    assert err.value.field == field
