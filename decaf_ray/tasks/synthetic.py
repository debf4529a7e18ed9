"""A synthetic task with a known answer: one frozen linear layer and a planted low-rank shift.

The frozen model is ``W0`` (d, k), adapted by one LoRA module ``"linear"``: ``W = W0 + s B A``.
The data come from ``W* = W0 + Delta*`` with ``Delta* = U V`` of rank ``true_rank`` and
``||Delta*||_F = shift_scale * sqrt(d)`` (``W0``'s entries are N(0, 1/k), so ``||W0||_F`` is about
``sqrt(d)`` too: by default the shift is as large as the base model). Because the loss is the
model's own likelihood, the population optimum of the shift is ``Delta*`` and ``evaluate`` reports
how far an adapter is from it (``shift_error``).

Forms:
    classification: ``x ~ N(0, I_k)``, ``y ~ Categorical(softmax(W* x))``, cross-entropy loss.
        ``noise`` is the label temperature: ``W0`` and ``Delta*`` are drawn at the unit scale above
        and divided by ``noise`` (default 0.1: Bayes accuracy about 0.92 at d=10, k=32, while
        ``W0`` alone gets about 0.5). Softmax ignores a shift shared by all classes, so
        ``Delta*`` is drawn with zero column sums and ``shift_error`` compares the centred shift.
        The labels are the classes.
    regression: cluster ``c`` (balanced over ``clusters``), ``x ~ N(mu_c, I_k)`` with
        ``||mu_c|| = separation``, ``y = (W* + heterogeneity D_c) x + noise eps``, loss
        ``0.5 * sum_j (y_j - f_j)^2`` averaged over examples. The labels are the cluster ids.
        ``D_c = U_h diag(z_c) V_h`` has rank ``true_rank``, ``sum_c z_c = 0``, RMS norm over
        clusters ``||Delta*||_F``, and ``V_h x`` independent of the cluster mean (``V_h mu_c = 0``),
        so each cluster's optimum is ``W* + heterogeneity D_c`` but the optimum over the balanced
        mixture stays exactly ``W*``: non-IID agents disagree, the network's answer is known.

Randomness: the model, the training set and the test set use three generators derived from
``seed``, so changing ``samples`` changes neither the planted model nor the test set. A step's
dropout draws from the step's own seed (``loss_and_grads(..., seed)``), never from the caller's
generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from decaf_ray.config import LoRAConfig, require
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks.step_rng import step_indices, step_rng

MODULE = "linear"
_CPU = torch.device("cpu")
_MODEL, _TRAIN, _TEST = 0, 1, 2  # generator streams


@dataclass(frozen=True)
class SyntheticConfig:
    """A linear model with a planted rank-``true_rank`` shift; see the module docstring."""

    kind: str = "synthetic"
    form: Literal["classification", "regression"] = "classification"
    d: int = 10
    """Output dimension; the number of classes for classification."""
    k: int = 32
    """Input dimension."""
    true_rank: int = 2
    clusters: int = 10
    """Regression only: number of input clusters (their ids are the labels)."""
    samples: int = 2000
    test_samples: int = 1000
    noise: float = 0.1
    """Regression: output noise std. Classification: label temperature (smaller = cleaner)."""
    heterogeneity: float = 0.0
    """Regression only: scale of each cluster's own shift D_c relative to Delta*."""
    separation: float = 1.0
    """Regression only: norm of the cluster means."""
    shift_scale: float = 1.0
    """||Delta*||_F / sqrt(d), before the classification temperature."""
    any_rank: ClassVar[bool] = True
    """Its step reads the rank from the factors it is given, so agents may differ in rank
    (``lora.ranks``); tasks that build one rank into a peft model do not say this."""

    def __post_init__(self):
        cls = self.form == "classification"
        require(self.kind == "synthetic", "kind", "must be 'synthetic'")
        require(self.d >= (2 if cls else 1), "d",
                f"must be >= {2 if cls else 1} for {self.form} (got {self.d})")
        require(self.k >= 1, "k", f"must be >= 1 (got {self.k})")
        # Classification's shift has zero column sums, which costs one dimension of rank.
        max_rank = min(self.d - 1 if cls else self.d, self.k)
        require(1 <= self.true_rank <= max_rank, "true_rank",
                f"must be in [1, {max_rank}] (min({'d - 1' if cls else 'd'}, k)); "
                f"got {self.true_rank}")
        require(self.clusters >= 1, "clusters", "must be >= 1")
        require(self.samples >= 1, "samples", "must be >= 1")
        require(self.test_samples >= 1, "test_samples", "must be >= 1")
        require(self.noise > 0 if cls else self.noise >= 0, "noise",
                "must be > 0 (a temperature)" if cls else "must be >= 0 (an output std)")
        require(self.heterogeneity >= 0, "heterogeneity", "must be >= 0")
        require(not cls or self.heterogeneity == 0, "heterogeneity",
                "must be 0 for classification, whose heterogeneity comes from the label "
                "partition (data.partition); use form 'regression' for per-cluster shifts")
        require(self.separation >= 0, "separation", "must be >= 0")
        require(self.shift_scale > 0, "shift_scale", "must be > 0")


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent torch generator per (seed, stream), leaving the global RNG alone."""
    state = np.random.SeedSequence([seed % 2**64, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _orthonormal(n: int, gen: torch.Generator) -> Tensor:
    """A random (n, n) orthogonal matrix (QR of a Gaussian)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.float()


class SyntheticTask:
    """The built task. Public tensors (float32): ``w0`` (d, k), ``delta`` (d, k) = Delta*,
    ``x_train`` (n, k), ``y_train`` (n,) int64 classes or (n, d) targets, ``x_test``, ``y_test``;
    regression also ``mus`` (clusters, k), ``u_h`` (d, r*), ``v_h`` (r*, k), ``z`` (clusters, r*).
    ``base`` is the frozen weight the model uses: ``w0``, or W0 + S once an algorithm folds S
    into it (``set_base_delta``).
    """

    def __init__(self, cfg: SyntheticConfig, scale: float, dropout: float, seed: int):
        self.cfg, self.scale, self.dropout = cfg, float(scale), float(dropout)
        self.classification = cfg.form == "classification"
        self.num_classes: int | None = cfg.d if self.classification else cfg.clusters
        self._plant(_generator(seed, _MODEL))
        self.x_train, self.y_train, labels = self._sample(cfg.samples, _generator(seed, _TRAIN))
        self.x_test, self.y_test, _ = self._sample(cfg.test_samples, _generator(seed, _TEST))
        self.train_labels: np.ndarray = labels.numpy().astype(np.int64)
        self.base, self.base_delta = self.w0, None

    def _plant(self, gen: torch.Generator) -> None:
        """Draw W0, Delta* and, for regression, the cluster means and per-cluster shifts."""
        c, r = self.cfg, self.cfg.true_rank
        self.w0 = torch.randn(c.d, c.k, generator=gen) / math.sqrt(c.k)
        u = torch.randn(c.d, r, generator=gen)
        if self.classification:
            u = u - u.mean(0)  # only the class-centred part of a logit shift is identifiable
        delta = u @ torch.randn(r, c.k, generator=gen)
        self.delta = delta * (c.shift_scale * math.sqrt(c.d) / delta.norm())
        if self.classification:
            self.w0, self.delta = self.w0 / c.noise, self.delta / c.noise
            return
        basis = _orthonormal(c.k, gen)
        # Means live where V_h cannot see them, so the mixture optimum stays exactly W*.
        mus = torch.randn(c.clusters, c.k - r, generator=gen) @ basis[:, r:].T
        self.mus = c.separation * mus / mus.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.u_h, self.v_h = _orthonormal(c.d, gen)[:, :r], basis[:, :r].T.contiguous()
        z = torch.randn(c.clusters, r, generator=gen)
        z = z - z.mean(0)
        rms = z.pow(2).sum(1).mean().sqrt()
        self.z = z * (self.delta.norm() / rms) if rms > 0 else z

    def _sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """n examples: x (n, k), y ((n,) classes or (n, d) targets), labels (n,) int64."""
        c, w_star = self.cfg, self.w0 + self.delta
        if self.classification:
            x = torch.randn(n, c.k, generator=gen)
            y = torch.multinomial(torch.softmax(x @ w_star.T, 1), 1, generator=gen)[:, 0]
            return x, y, y
        # Balanced clusters keep the empirical mixture close to the one whose optimum is W*.
        cl = (torch.arange(n) % c.clusters)[torch.randperm(n, generator=gen)]
        x = self.mus[cl] + torch.randn(n, c.k, generator=gen)
        own = ((x @ self.v_h.T) * self.z[cl]) @ self.u_h.T  # D_c x, without forming D_c
        y = x @ w_star.T + c.heterogeneity * own + c.noise * torch.randn(n, c.d, generator=gen)
        return x, y, cl

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """{"linear": (d, k)}."""
        return {MODULE: (self.cfg.d, self.cfg.k)}

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of logits (n, d), or 0.5 * mean squared error summed over outputs."""
        if self.classification:
            return F.cross_entropy(out, y)
        return 0.5 * (out - y).pow(2).sum(1).mean()

    def load(self) -> None:
        """Nothing to load: the task is made whole by ``build``."""

    def set_base_delta(self, delta: dict[str, Tensor] | None) -> None:
        """The frozen weight becomes W0 + ``delta["linear"]`` ((d, k) float32; None: W0 again),
        computed from W0, never added in place, so the same S gives the same weights whatever
        came before (a restored run). ``evaluate``'s ``shift_error`` then measures
        S + s B A, the whole change to W0, against Delta*."""
        self.base_delta = None if delta is None else delta[MODULE].float()
        self.base = self.w0 if delta is None else self.w0 + self.base_delta

    def loss_and_grads(self, factors: Factors, indices: np.ndarray, train_A: bool, seed: int
                       ) -> tuple[float, Grads]:
        """Mean loss on training examples ``indices`` (m,) and its gradient.

        Dropout (``lora.dropout``) acts on the LoRA branch's input, like peft, and draws from
        ``seed`` (the CPU generator seeded for this step only; the caller's is left alone).

        Returns:
            (loss, {"linear": (grad A (r, k) or None when not ``train_A``, grad B (d, r))}),
            float32 tensors detached from the caller's factors (which are never modified).
        """
        idx = torch.as_tensor(step_indices(indices))
        x, y = self.x_train[idx], self.y_train[idx]
        a0, b0 = factors[MODULE]
        a = a0.detach().float().requires_grad_(train_A)
        b = b0.detach().float().requires_grad_(True)
        if self.dropout > 0:
            with step_rng(seed, _CPU):
                xin = F.dropout(x, self.dropout, training=True)
        else:
            xin = x
        loss = self._loss(x @ self.base.T + self.scale * (xin @ a.T) @ b.T, y)
        if train_A:
            ga, gb = torch.autograd.grad(loss, (a, b))
        else:
            ga, (gb,) = None, torch.autograd.grad(loss, (b,))
        return float(loss.detach()), {MODULE: (ga, gb)}

    @torch.no_grad()
    def evaluate(self, factors: Factors) -> dict[str, float]:
        """Test metrics, without dropout.

        Returns:
            ``test_loss``; ``test_accuracy`` (classification); ``shift_error`` =
            ||s B A - Delta*||_F / ||Delta*||_F (classification: of the class-centred shift;
            S + s B A after folds into the base).
        """
        a, b = factors[MODULE]
        shift = self.scale * (b.float() @ a.float())
        if self.base_delta is not None:
            shift = shift + self.base_delta
        out = self.x_test @ (self.w0 + shift).T
        metrics = {"test_loss": float(self._loss(out, self.y_test))}
        if self.classification:
            metrics["test_accuracy"] = float((out.argmax(1) == self.y_test).float().mean())
            shift = shift - shift.mean(0)  # softmax cannot see a shift shared by all classes
        metrics["shift_error"] = float((shift - self.delta).norm() / self.delta.norm())
        return metrics


def build(task_cfg: SyntheticConfig, lora_cfg: LoRAConfig, seed: int) -> SyntheticTask:
    """The task of ``task_cfg`` with ``lora_cfg``'s scale and dropout; data drawn from ``seed``."""
    return SyntheticTask(task_cfg, lora_cfg.scale, lora_cfg.dropout, seed)
