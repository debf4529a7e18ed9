"""What the decoder tasks (``causal_lm``, ``instruct``) share: a peft-wrapped decoder made on
first use, its adapted shapes known before that, and evaluations remembered by adapter.

``DecoderTask.__init__`` computes the adapted shapes on the meta device (no weights; for the hub
ids in ``causal_lm_model.KNOWN_CONFIGS`` no download); ``materialize`` (the runtimes call
``load`` once at setup, or the first step does) loads the tokenizer and weights on the device
``devices.resolve(cfg.device)`` gives and wraps them in peft, leaving torch's generators as they
were. Subclasses set ``self.codec`` beforehand when they build their own tokenizer, and define
``_evaluate`` (remembered by ``evaluate``) and ``_loaded`` (what to make once the tokenizer is
there).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Iterable

import torch

from decaf_ray import devices
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks import peft_lora as pl
from decaf_ray.tasks.causal_lm_model import (hf_config, load_base_model, load_codec,
                                             meta_lora_shapes)
from decaf_ray.tasks.step_rng import step_rng

_REMEMBERED = 16  # evaluations kept: agents often share one adapter (at the start, under FedAvg)


class DecoderTask:
    """The lazily loaded peft decoder of a ``DecoderConfig``; see the module docstring."""

    def __init__(self, cfg: Any, lora_cfg: Any, seed: int, codec: Any = None):
        self.cfg, self.lora_cfg, self.seed = cfg, lora_cfg, seed
        self.codec = codec
        self.config = hf_config(cfg, None if codec is None else codec.size)
        self._shapes = meta_lora_shapes(self.config, cfg.targets, lora_cfg)
        self.model = self.layers = self.device = None
        self._evals: dict[bytes, dict[str, float]] = {}
        self._w0: dict[str, torch.Tensor] = {}  # the adapted weights as loaded, once changed

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

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
        self.device = devices.resolve(self.cfg.device)
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
        self._loaded()
        self.model, self.layers = model, layers

    def _loaded(self) -> None:
        """Whatever needs the tokenizer, made once it is loaded (before the model is set)."""

    def accumulate(self, factors: Factors, train_A: bool, sums: Iterable[torch.Tensor],
                   weight: float) -> tuple[float, Grads]:
        """One training step's ``(loss, grads)``: ``factors`` swapped in, then each micro-batch's
        summed loss from ``sums`` (a lazy iterable: its forward passes run here, after the swap,
        in train mode) back-propagated divided by ``weight``, so the result is their mean over
        ``weight`` units (answer or response tokens). Gradients are float32 CPU tensors, A's
        None when not ``train_A``."""
        pl.begin_step(self.layers, factors, train_A)
        self.model.train()
        total = 0.0
        for nll in sums:
            (nll / weight).backward()
            total += float(nll.detach())
        grads = pl.get_grads(self.layers, train_A)
        pl.zero_grads(self.layers)
        return total / weight, grads

    def evaluate(self, factors: Factors) -> dict[str, float]:
        """``_evaluate(factors)``, remembered by the adapter's bytes: it is deterministic, and an
        equal adapter (agents often share one) is evaluated once."""
        key = digest(factors)
        if key not in self._evals:
            if len(self._evals) >= _REMEMBERED:
                self._evals.pop(next(iter(self._evals)))
            self._evals[key] = self._evaluate(factors)
        return dict(self._evals[key])

    def _evaluate(self, factors: Factors) -> dict[str, float]:
        raise NotImplementedError

    def set_base_delta(self, delta: dict[str, torch.Tensor] | None) -> None:
        """The adapted modules' frozen weights become W0 + ``delta[name]`` (None: W0 again;
        ``peft_lora.set_base_delta``), and the evaluations remembered by adapter are
        forgotten: the same adapter on another base scores otherwise."""
        self.materialize()
        pl.set_base_delta(self.layers, self._w0, delta)
        self._evals.clear()


def digest(factors: Factors) -> bytes:
    """A 16-byte hash of an adapter's names, shapes and float32 values."""
    h = hashlib.blake2b(digest_size=16)
    for name, (a, b) in factors.items():
        h.update(name.encode())
        for t in (a, b):
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.digest()
