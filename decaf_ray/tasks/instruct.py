"""Instruction-tuning task: LoRA on a transformers decoder trained on Alpaca-style records, the
loss on the response tokens only; held-out loss and perplexity every evaluation, and at the end
of a run the generative benchmarks (the paper's Table 5).

The config (``InstructConfig``) is in ``instruct_config``; records, templates, truncation, the
partitioners' labels and the benchmark files in ``instruct_data``; the model is loaded as the
``causal_lm`` task loads it (``decoder.DecoderTask``: a hub id, a folder, a GGUF file or a random
``model_config``, whose tokenizer is then ``bytes``).

A step's loss is the mean cross-entropy per response token (EOS included) over the batch, so
``loss_weight`` is the batch's response tokens and data-parallel workers split it exactly;
micro-batches go in order of length (less padding), right-padded. LoRA dropout draws from the
step's seed (``step_rng``).

``evaluate_final(factors, agent)`` (the run's last evaluation) adds, for the agents in
``generate_agents``: greedy answers to the AdvBench behaviours and the MT-Bench (two turns) and
Vicuna-bench questions, returned as ``generations`` (saved to ``generations.jsonl``), and
``advbench_refusal_rate``, the fraction of AdvBench answers containing a refusal prefix
(llm-attacks' test). MT-Bench and Vicuna-bench are scored afterwards by ``decaf_ray.judge``.
Agents holding equal adapters (FedAvg, or DLoRA on a complete graph) share one set of answers:
greedy decoding gives an equal adapter equal answers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from decaf_ray.config import LoRAConfig
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks import instruct_data as idata
from decaf_ray.tasks import peft_lora as pl
from decaf_ray.tasks import text_data as td
from decaf_ray.tasks.decoder import DecoderTask, digest
from decaf_ray.tasks.generate import greedy
from decaf_ray.tasks.instruct_config import InstructConfig
from decaf_ray.tasks.step_rng import seeded_step

# InstructConfig is named here for the task registry (``TASKS`` points at this module).
__all__ = ["InstructConfig", "InstructTask", "build"]


class InstructTask(DecoderTask):
    """The built task: ``train``/``test`` records, ``train_labels`` (see ``split_by``), the
    benchmark prompts, lazy model."""

    def __init__(self, cfg: InstructConfig, lora_cfg: LoRAConfig, seed: int):
        data_seed = seed if cfg.data_seed is None else cfg.data_seed
        self.train, self.test = idata.load_records(cfg, data_seed)
        self.train_labels: np.ndarray = idata.split_labels(self.train, cfg.split_by,
                                                           cfg.clusters, data_seed)
        self.num_classes: int | None = int(self.train_labels.max()) + 1
        self.bench = idata.load_benchmarks(cfg, data_seed) if cfg.benchmarks else []
        bytes_codec = cfg.tokenizer == "bytes" or (cfg.tokenizer == "auto"
                                                   and cfg.model_config is not None)
        super().__init__(cfg, lora_cfg, seed, td.ByteCodec() if bytes_codec else None)
        self.template: idata.Template | None = None
        self._examples: dict[tuple[int, int], tuple[list[int], int]] = {}
        self._answers: dict[bytes, list[dict[str, Any]]] = {}  # the last adapter's answers

    def _loaded(self) -> None:
        self.template = idata.Template(self.cfg.template, self.codec)
        if self.codec.eos_id is None:
            raise ValueError(f"{self.cfg.model}: the tokenizer has no end-of-sequence token")

    def set_base_delta(self, delta: dict[str, torch.Tensor] | None) -> None:
        """``DecoderTask.set_base_delta``, and the remembered benchmark answers forgotten."""
        super().set_base_delta(delta)
        self._answers = {}

    def example(self, split: int, i: int) -> tuple[list[int], int]:
        """``(ids, n_prompt)`` of record ``i`` of ``split`` (0 train, 1 test), cached."""
        key = (split, int(i))
        if key not in self._examples:
            rec = (self.train if split == 0 else self.test)[int(i)]
            self._examples[key] = idata.example(self.template.record_prompt(rec),
                                                self.codec.encode(rec.output), self.codec.eos_id,
                                                self.cfg.max_length)
        return self._examples[key]

    def _nll(self, examples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, int]:
        """Summed NLL of the response tokens of ``examples`` (right-padded), and their count."""
        width = max(len(ids) for ids, _ in examples)
        ids = torch.full((len(examples), width), self.codec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        target = torch.full((len(examples), width), -100, dtype=torch.long)
        for r, (seq, n_prompt) in enumerate(examples):
            ids[r, :len(seq)] = torch.as_tensor(seq)
            mask[r, :len(seq)] = 1
            target[r, n_prompt:len(seq)] = torch.as_tensor(seq[n_prompt:])
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=mask.to(self.device)).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                              target[:, 1:].reshape(-1).to(logits.device), ignore_index=-100,
                              reduction="sum")
        return nll, int((target[:, 1:] != -100).sum())

    def _by_length(self, split: int, idx: np.ndarray) -> list[tuple[list[int], int]]:
        examples = [self.example(split, i) for i in idx]
        return [examples[k] for k in np.argsort([len(e[0]) for e in examples], kind="stable")]

    # ------------------------------------------------------------------ the Task protocol

    def _loss_and_grads(self, factors: Factors, idx: np.ndarray, train_A: bool
                        ) -> tuple[float, Grads]:
        """Mean cross-entropy per response token on training records ``idx``, and its gradient
        (float32 CPU tensors; A's None when not ``train_A``). Under ``seeded_step``."""
        examples, mb = self._by_length(0, idx), self.cfg.micro_batch
        sums = (self._nll(examples[s:s + mb])[0] for s in range(0, len(examples), mb))
        return self.accumulate(factors, train_A, sums, self.loss_weight(idx))

    loss_and_grads = seeded_step(_loss_and_grads)

    def loss_weight(self, indices: np.ndarray) -> float:
        """Response tokens of training records ``indices``: ``loss_and_grads`` is a mean over
        them."""
        self.materialize()
        return float(sum(max(len(ids) - max(n, 1), 0)
                         for ids, n in (self.example(0, i) for i in np.asarray(indices))))

    @torch.no_grad()
    def _evaluate(self, factors: Factors) -> dict[str, float]:
        """``test_loss`` (mean NLL per held-out response token) and ``test_perplexity``
        (its exp), without dropout (``evaluate`` remembers it by adapter)."""
        self.materialize()
        pl.set_factors(self.layers, factors)
        self.model.eval()
        examples = self._by_length(1, np.arange(len(self.test)))
        total, count = 0.0, 0
        for s in range(0, len(examples), self.cfg.eval_batch_size):
            nll, n = self._nll(examples[s:s + self.cfg.eval_batch_size])
            total, count = total + float(nll), count + n
        loss = total / max(count, 1)
        return {"test_loss": loss, "test_perplexity": math.exp(min(loss, 700.0))}

    def evaluate_final(self, factors: Factors, agent: int) -> dict[str, Any]:
        """``evaluate`` and, for an agent in ``generate_agents``, the benchmarks' answers
        (``generations``) and ``advbench_refusal_rate``; see the module docstring."""
        out: dict[str, Any] = self.evaluate(factors)
        wanted = self.cfg.generate_agents
        if not self.bench or (wanted is not None and agent not in wanted):
            return out
        key = digest(factors)  # greedy answers of an equal adapter are equal: made once
        if key not in self._answers:
            self.materialize()
            pl.set_factors(self.layers, factors)
            self._answers = {key: self._answer(self.bench, agent)}
        records = [dict(r) for r in self._answers[key]]
        adv = [r["refused"] for r in records if r["benchmark"] == "advbench"]
        if adv:
            out["advbench_refusal_rate"] = float(np.mean(adv))
        out["generations"] = records
        return out

    def _answer(self, items: list[idata.BenchItem], agent: int) -> list[dict[str, Any]]:
        """Greedy answers to every turn of ``items``, turn by turn (a later turn sees the
        earlier answers), as records for ``generations.jsonl``."""
        answers: list[list[str]] = [[] for _ in items]
        budget = max(self.cfg.max_length - self.cfg.max_new_tokens, self.cfg.max_length // 2)
        for turn in range(max(len(it.turns) for it in items)):
            rows = [k for k, it in enumerate(items) if len(it.turns) > turn]
            prompts = [idata.fit_prompt(self.template.prompt(items[k].turns[:turn + 1],
                                                             answers[k]), budget) for k in rows]
            new = greedy(self.model, prompts, pad_id=self.codec.pad_id, eos_id=self.codec.eos_id,
                         max_new_tokens=self.cfg.max_new_tokens,
                         batch_size=self.cfg.generate_batch, device=self.device,
                         seed=self.seed, desc=f"agent {agent}: turn {turn + 1}")
            for k, ids in zip(rows, new):
                answers[k].append(self.template.clean(self.codec.decode(ids)))
        out = []
        for it, ans in zip(items, answers):
            rec = {"benchmark": it.benchmark, "question_id": it.question_id,
                   "category": it.category, "turns": list(it.turns), "answers": ans}
            if it.reference:
                rec["reference"] = list(it.reference)
            if it.benchmark == "advbench":
                rec["refused"] = idata.refused(ans[0], self.cfg.refusal_prefixes)
            out.append(rec)
        return out


def build(task_cfg: InstructConfig, lora_cfg: LoRAConfig, seed: int) -> InstructTask:
    """The task of ``task_cfg``: data and benchmarks read, shapes computed now, weights on first
    use."""
    return InstructTask(task_cfg, lora_cfg, seed)
