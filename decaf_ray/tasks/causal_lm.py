"""Causal-LM task: LoRA on a transformers decoder answering yes/no questions (WiC, BoolQ).

The config (``CausalLMConfig``, which model and data) is in ``causal_lm_config``; the model's
architecture, GGUF files and loading in ``causal_lm_model``; prompts and tokenizers in
``text_data``; this module is the task.

``build`` reads the data and computes the adapted shapes on the meta device (no weights, and for
the hub ids in ``causal_lm_model.KNOWN_CONFIGS`` no download); weights and the tokenizer load in
``load`` (which the runtimes call once at setup) or else on the first ``loss_and_grads`` /
``evaluate``, on the device ``devices.resolve(cfg.device)`` gives (``auto``: what Ray assigned to
this process). A step's LoRA dropout draws from its own ``seed`` on that device (``step_rng``),
after the model is loaded, so numbers do not depend on when it loaded. The loss is the
cross-entropy of the answer tokens given the prompt (mean over answer tokens); the prediction is
the answer with the higher summed log-probability; ``test_f1`` is the F1 of " yes". Prompts are
left-padded with explicit position ids, so every answer ends at the last position and only the
last few logits are computed.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from decaf_ray import devices
from decaf_ray.config import LoRAConfig
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks import peft_lora as pl
from decaf_ray.tasks import text_data as td
from decaf_ray.tasks.causal_lm_config import CausalLMConfig
from decaf_ray.tasks.causal_lm_model import (hf_config, load_base_model, load_codec,
                                             meta_lora_shapes)
from decaf_ray.tasks.step_rng import seeded_step, step_rng

# CausalLMConfig is named here for the task registry (``TASKS`` points at this module, whose
# ``build`` it calls).
__all__ = ["CausalLMConfig", "CausalLMTask", "build"]


class CausalLMTask:
    """The built task: ``train``/``test`` examples, ``train_labels`` (0/1), lazy model."""

    num_classes: int | None = 2

    def __init__(self, cfg: CausalLMConfig, lora_cfg: LoRAConfig, seed: int):
        self.cfg, self.lora_cfg, self.seed = cfg, lora_cfg, seed
        data_seed = seed if cfg.data_seed is None else cfg.data_seed
        self.train, self.test = td.load_splits(cfg, data_seed)
        self.train_labels: np.ndarray = np.array([e.label for e in self.train], dtype=np.int64)
        self.test_labels: np.ndarray = np.array([e.label for e in self.test], dtype=np.int64)
        self.codec: td.Codec | None = self._builtin_codec()
        self.config = hf_config(cfg, None if self.codec is None else self.codec.size)
        self._shapes = meta_lora_shapes(self.config, cfg.targets, lora_cfg)
        self.model = self.layers = self.device = self.answers = None
        self._cache: dict[tuple[int, int], list[int]] = {}
        self._evals: dict[bytes, dict[str, float]] = {}

    def _builtin_codec(self) -> td.Codec | None:
        kind = self.cfg.tokenizer
        if kind == "auto" and self.cfg.model_config is not None:
            kind = "words"
        if kind == "words":
            return td.WordCodec([e.prompt for e in self.train + self.test] + list(td.ANSWERS))
        return td.ByteCodec() if kind == "bytes" else None

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    # ------------------------------------------------------------------ lazy model

    def load(self) -> None:
        """Load the model now (idempotent): the Task protocol's optional load phase."""
        self.materialize()

    def materialize(self) -> None:
        """Load the tokenizer and weights, wrap them in peft; a no-op after the first call.

        Leaves torch's global RNG as it found it (peft's init of A draws from it), so the first
        step's dropout does not depend on whether this host had loaded the model already.
        """
        if self.model is not None:
            return
        cfg = self.cfg
        self.device = devices.resolve(cfg.device)
        with step_rng(None, self.device), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self._load()

    def _load(self) -> None:
        from peft import get_peft_model

        cfg = self.cfg
        if self.codec is None:
            self.codec = load_codec(cfg)
        model = load_base_model(cfg, self.config, self.device, self.seed)
        model = get_peft_model(model, pl.peft_config(self.lora_cfg, cfg.targets))
        layers = pl.lora_layers(model)
        if pl.shapes(layers) != self._shapes:
            raise ValueError(f"{cfg.model}: the loaded model's LoRA shapes differ from its config's")
        self.answers = td.answer_ids(self.codec)
        self.model, self.layers = model, layers

    def prompt_ids(self, split: int, i: int) -> list[int]:
        """Token ids of prompt ``i`` of ``split`` (0 train, 1 test), cut to fit (cached)."""
        key = (split, int(i))
        if key not in self._cache:
            ex = (self.train if split == 0 else self.test)[int(i)]
            budget = self.cfg.max_length - max(len(a) for a in self.answers)
            self._cache[key] = td.encode_prompt(self.codec, ex, budget)
        return self._cache[key]

    def _forward(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """Logits (B, keep, V) at the last ``keep`` positions of left-padded ``seqs``."""
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.codec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, n - len(s):] = torch.as_tensor(s)
            mask[r, n - len(s):] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), logits_to_keep=keep)
        return out.logits

    def _answer_nll(self, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        """(B,) summed negative log-likelihood of each answer after its prompt."""
        k = max(len(a) for a in answers)
        logits = self._forward([p + a for p, a in zip(prompts, answers)], k + 1)[:, :k].float()
        target = torch.full((len(answers), k), -100, dtype=torch.long)
        for r, a in enumerate(answers):
            target[r, k - len(a):] = torch.as_tensor(a)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.to(logits.device).reshape(-1),
                              ignore_index=-100, reduction="none")
        return nll.view(len(answers), k).sum(1)

    # ------------------------------------------------------------------ the Task protocol

    def _loss_and_grads(self, factors: Factors, idx: np.ndarray, train_A: bool
                        ) -> tuple[float, Grads]:
        """Mean cross-entropy per answer token on training rows ``indices``, and its gradient.

        LoRA dropout is active and draws from ``seed`` on the model's device (``step_rng``).
        Returns gradients as float32 CPU tensors; A's is None when not ``train_A``.

        ``loss_and_grads(factors, indices, train_A, seed)`` is this step under ``seeded_step``.
        """
        pl.begin_step(self.layers, factors, train_A)
        self.model.train()
        answers = [self.answers[self.train_labels[i]] for i in idx]
        tokens, total = self.loss_weight(idx), 0.0
        mb = self.cfg.micro_batch
        for s in range(0, idx.size, mb):
            nll = self._answer_nll([self.prompt_ids(0, i) for i in idx[s:s + mb]], answers[s:s + mb]).sum()
            (nll / tokens).backward()
            total += float(nll.detach())
        grads = pl.get_grads(self.layers, train_A)
        pl.zero_grads(self.layers)
        return total / tokens, grads

    loss_and_grads = seeded_step(_loss_and_grads)

    def loss_weight(self, indices: np.ndarray) -> float:
        """Answer tokens of training rows ``indices``: ``loss_and_grads`` is a mean over them."""
        self.materialize()
        return float(sum(len(self.answers[self.train_labels[i]]) for i in np.asarray(indices)))

    @torch.no_grad()
    def scores(self, factors: Factors, split: int = 1, indices: np.ndarray | None = None
               ) -> torch.Tensor:
        """(n, 2) log-probability of " no" and " yes" (summed over their tokens) per prompt."""
        self.materialize()
        pl.set_factors(self.layers, factors)
        self.model.eval()
        n = len(self.test if split == 1 else self.train)
        idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        prompts = [self.prompt_ids(split, i) for i in idx]
        order = np.argsort([len(p) for p in prompts], kind="stable")  # less padding per batch
        out = torch.empty(len(idx), len(self.answers))
        single = all(len(a) == 1 for a in self.answers)
        for s in range(0, len(order), self.cfg.eval_batch_size):
            rows = order[s:s + self.cfg.eval_batch_size]
            batch = [prompts[r] for r in rows]
            if single:  # one pass: the last position scores every one-token answer
                logp = torch.log_softmax(self._forward(batch, 1)[:, -1].float(), -1)
                out[rows] = logp[:, [a[0] for a in self.answers]].cpu()
            else:
                for c, a in enumerate(self.answers):
                    out[rows, c] = -self._answer_nll(batch, [a] * len(batch)).cpu()
        return out

    def evaluate(self, factors: Factors) -> dict[str, float]:
        """``test_loss`` (mean NLL per answer token of the true answer), ``test_accuracy``,
        ``test_f1`` (F1 of " yes"), without dropout.

        Deterministic, so results are remembered by the adapter's bytes (agents often share
        one, e.g. at the start): an equal adapter is evaluated once.
        """
        key = _digest(factors)
        if key not in self._evals:
            if len(self._evals) >= 16:
                self._evals.pop(next(iter(self._evals)))
            self._evals[key] = self._evaluate(factors)
        return dict(self._evals[key])

    def _evaluate(self, factors: Factors) -> dict[str, float]:
        lp = self.scores(factors)
        gold = torch.as_tensor(self.test_labels)
        pred = lp.argmax(1)
        n_tok = torch.tensor([len(self.answers[g]) for g in self.test_labels], dtype=torch.float32)
        loss = float(-lp.gather(1, gold[:, None])[:, 0].sum() / n_tok.sum())
        return {"test_loss": loss, "test_accuracy": float((pred == gold).float().mean()),
                "test_f1": td.binary_f1(pred.tolist(), self.test_labels.tolist())}


def _digest(factors: Factors) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name, (a, b) in factors.items():
        h.update(name.encode())
        for t in (a, b):
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.digest()


def build(task_cfg: CausalLMConfig, lora_cfg: LoRAConfig, seed: int) -> CausalLMTask:
    """The task of ``task_cfg``: data read and shapes computed now, weights on first use."""
    return CausalLMTask(task_cfg, lora_cfg, seed)
