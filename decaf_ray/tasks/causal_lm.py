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

import numpy as np
import torch
import torch.nn.functional as F

from decaf_ray.config import LoRAConfig
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks import peft_lora as pl
from decaf_ray.tasks import text_data as td
from decaf_ray.tasks.causal_lm_config import CausalLMConfig
from decaf_ray.tasks.decoder import DecoderTask
from decaf_ray.tasks.step_rng import seeded_step

# CausalLMConfig is named here for the task registry (``TASKS`` points at this module, whose
# ``build`` it calls).
__all__ = ["CausalLMConfig", "CausalLMTask", "build"]


class CausalLMTask(DecoderTask):
    """The built task: ``train``/``test`` examples, ``train_labels`` (0/1), lazy model."""

    num_classes: int | None = 2

    def __init__(self, cfg: CausalLMConfig, lora_cfg: LoRAConfig, seed: int):
        data_seed = seed if cfg.data_seed is None else cfg.data_seed
        self.train, self.test = td.load_splits(cfg, data_seed)
        self.train_labels: np.ndarray = np.array([e.label for e in self.train], dtype=np.int64)
        self.test_labels: np.ndarray = np.array([e.label for e in self.test], dtype=np.int64)
        super().__init__(cfg, lora_cfg, seed, self._builtin_codec(cfg))
        self.answers = None
        self._cache: dict[tuple[int, int], list[int]] = {}

    def _builtin_codec(self, cfg: CausalLMConfig) -> td.Codec | None:
        kind = cfg.tokenizer
        if kind == "auto" and cfg.model_config is not None:
            kind = "words"
        if kind == "words":
            return td.WordCodec([e.prompt for e in self.train + self.test] + list(td.ANSWERS))
        return td.ByteCodec() if kind == "bytes" else None

    def _loaded(self) -> None:
        self.answers = td.answer_ids(self.codec)

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
        answers = [self.answers[self.train_labels[i]] for i in idx]
        mb = self.cfg.micro_batch
        sums = (self._answer_nll([self.prompt_ids(0, i) for i in idx[s:s + mb]],
                                 answers[s:s + mb]).sum() for s in range(0, idx.size, mb))
        return self.accumulate(factors, train_A, sums, self.loss_weight(idx))

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

    def _evaluate(self, factors: Factors) -> dict[str, float]:
        """``test_loss`` (mean NLL per answer token of the true answer), ``test_accuracy``,
        ``test_f1`` (F1 of " yes"), without dropout (``evaluate`` remembers it by adapter)."""
        lp = self.scores(factors)
        gold = torch.as_tensor(self.test_labels)
        pred = lp.argmax(1)
        n_tok = torch.tensor([len(self.answers[g]) for g in self.test_labels], dtype=torch.float32)
        loss = float(-lp.gather(1, gold[:, None])[:, 0].sum() / n_tok.sum())
        return {"test_loss": loss, "test_accuracy": float((pred == gold).float().mean()),
                "test_f1": td.binary_f1(pred.tolist(), self.test_labels.tolist())}


def build(task_cfg: CausalLMConfig, lora_cfg: LoRAConfig, seed: int) -> CausalLMTask:
    """The task of ``task_cfg``: data read and shapes computed now, weights on first use."""
    return CausalLMTask(task_cfg, lora_cfg, seed)
