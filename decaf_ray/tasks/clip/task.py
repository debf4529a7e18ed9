"""The CLIP task: few-shot classification with LoRA on both encoders (the CLIP-LoRA recipe the
paper follows), and its batched step for several agents at once.

Cheap until used: ``build`` reads labels and file lists and computes the adapted shapes on a
meta-device model (no weights, no download, never training); the real model is made by ``load``
(which the runtimes call once at setup, so load time is measured apart) or else on the first
``loss_and_grads`` or ``evaluate``, on the device ``devices.resolve(cfg.device)`` gives (``auto``:
what Ray assigned to this process).

Randomness: a step's augmentation (CPU generator) and LoRA dropout (the model device's
generator) draw from the step's own ``seed`` (``step_rng``), after the model is loaded, so the
numbers do not depend on when the model loaded, and the caller's RNG is left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decaf_ray import devices
from decaf_ray.config import ConfigError, LoRAConfig
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks import image_data, peft_lora, stacked_lora
from decaf_ray.tasks.clip import classifier
from decaf_ray.tasks.clip.config import CLIPConfig
from decaf_ray.tasks.clip.model import (OPENAI_MEAN, OPENAI_STD, adapt, architecture, base_model,
                                        image_size, instantiate, tokenizer)
from decaf_ray.tasks.step_rng import seeded_step, step_indices, step_rng


class CLIPTask:
    """The built task; ``model`` and ``layers`` exist after ``load()``."""

    def __init__(self, cfg: CLIPConfig, lora_cfg: LoRAConfig):
        self.cfg, self.lora_cfg = cfg, lora_cfg
        self.arch, self.tag = architecture(cfg)
        try:
            self.data = image_data.load(cfg)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise ConfigError("task", f"dataset {cfg.dataset}: {e}") from None
        except OSError as e:  # a download without network (urllib's URLError is an OSError)
            raise ConfigError("task.root", f"could not download {cfg.dataset} into {cfg.root} "
                              f"({getattr(e, 'reason', e)}); put a copy there and set "
                              "download: false") from None
        self.class_names = self.data.class_names
        self.num_classes: int | None = len(self.class_names)
        self.train_labels: np.ndarray = self.data.train.labels
        self.test_labels: np.ndarray = self.data.test.labels
        self.prompts = [cfg.prompt.format(c) for c in self.class_names]
        text = self.arch["text_cfg"]
        if "hf_tokenizer_name" not in text and text.get("vocab_size", 49408) < 49408:
            raise ConfigError("task.model_config", "text_cfg.vocab_size must be >= 49408, the "
                              "size of open_clip's tokenizer")
        self.image_size = image_size(self.arch)
        mean = cfg.mean or (self.tag or {}).get("mean") or OPENAI_MEAN
        std = cfg.std or (self.tag or {}).get("std") or OPENAI_STD
        self.preprocess = image_data.Preprocess(self.image_size, mean, std, cfg.augment,
                                                cfg.hflip, tuple(cfg.crop_scale), cfg.cache_mb)
        with torch.device("meta"):
            meta = instantiate(self.arch)
        self._shapes = peft_lora.shapes(adapt(meta, cfg, lora_cfg))
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}
        self._text_cache: Tensor | None = None
        self._test_features: Tensor | None = None
        self._w0: dict[str, Tensor] = {}  # the adapted weights as loaded, once changed

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """``<block>.attn.{q,k,v}_proj`` (and out_proj, mlp.c_fc/c_proj) -> (d, k); vision first."""
        return dict(self._shapes)

    # ------------------------------------------------------------------ model

    def load(self) -> None:
        """Make the real model now (idempotent): the Task protocol's optional load phase."""
        self.materialize()

    def materialize(self) -> nn.Module:
        """Make the real model once: weights (tag, checkpoint or seeded init), split attention,
        LoRA, device. Leaves torch's global RNG as it was."""
        if self.model is not None:
            return self.model
        cfg = self.cfg
        dev = devices.resolve(cfg.device)
        model = base_model(cfg)  # weights on the CPU, drawn from init_seed when not loaded
        with step_rng(cfg.init_seed, torch.device("cpu")):  # peft's own draws, then replaced
            layers = adapt(model, cfg, self.lora_cfg)
        model.eval().to(dev)
        self.tokens = tokenizer(cfg, self.arch)(self.prompts).to(dev)
        self.device = dev
        self.bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.model, self.layers = model, layers
        return model

    def set_base_delta(self, delta: dict[str, Tensor] | None) -> None:
        """The adapted modules' frozen weights become W0 + ``delta[name]`` (None: W0 again;
        ``peft_lora.set_base_delta``). The cached text and test-image features stay: they
        are cached only for an encoder without LoRA, whose weights no delta touches."""
        self.materialize()
        peft_lora.set_base_delta(self.layers, self._w0, delta)

    def _set_training(self, training: bool) -> None:
        """Train mode (LoRA dropout on) for steps, eval mode for evaluation, switched only on a
        change: ``nn.Module.train`` walks every submodule, about 1 ms on even a small CLIP, which
        consecutive agent steps would otherwise pay twice each. Only the root's flag is read:
        nothing else may switch a submodule's mode."""
        if self.model.training != training:
            self.model.train(training)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _text_features(self) -> Tensor:
        """(C, e) normalised prompt features; cached when the text encoder is not adapted."""
        if "text" in self.cfg.encoders:
            return self.model.encode_text(self.tokens, normalize=True)
        if self._text_cache is None:
            with torch.no_grad(), self._autocast():
                self._text_cache = self.model.encode_text(self.tokens, normalize=True)
        return self._text_cache

    def logits(self, images: Tensor) -> Tensor:
        """(m, C) float32 logits of normalised images (m, 3, S, S) at the current factors, in
        the model's current mode (train after a step: LoRA dropout on)."""
        with self._autocast():
            img = self.model.encode_image(images.to(self.device), normalize=True)
            return classifier.logits(img, self._text_features(), self.cfg.logit_scale)

    # ------------------------------------------------------------------ Task protocol

    def _loss_and_grads(self, factors: Factors, idx: np.ndarray, train_A: bool
                        ) -> tuple[float, Grads]:
        """Mean cross-entropy on training images ``indices`` at ``factors``, and its gradient.

        Augmentation, then LoRA dropout, draw from ``seed`` (``step_rng``: the CPU generator, and
        the model's CUDA device's). Chunks of ``micro_batch`` accumulate the mean gradient (the
        same one without dropout and augmentation, whose draws depend on the chunking).
        Returns (loss, {module: (grad A (r, k) or None, grad B (d, r))}), float32 on the CPU.

        ``loss_and_grads(factors, indices, train_A, seed)`` is this step under ``seeded_step``.
        """
        peft_lora.begin_step(self.layers, factors, train_A)
        self._set_training(True)
        chunk = self.cfg.micro_batch or idx.size
        total = 0.0
        for start in range(0, idx.size, chunk):
            part = idx[start:start + chunk]
            x = self.preprocess.batch(self.data.train, part, train=True)
            y = torch.as_tensor(self.train_labels[part], device=self.device)
            loss = F.cross_entropy(self.logits(x), y, reduction="sum") / idx.size
            loss.backward()
            total += float(loss.detach())
        grads = peft_lora.get_grads(self.layers, train_A)
        peft_lora.zero_grads(self.layers)
        return total, grads

    loss_and_grads = seeded_step(_loss_and_grads)

    def loss_and_grads_many(self, factors: list[Factors], indices: list[np.ndarray],
                            train_A: bool, seeds: list[int]) -> list[tuple[float, Grads]]:
        """``loss_and_grads`` of n agents in one forward and backward pass.

        The agents' image batches go through the encoders together, each adapted layer adding
        each agent's LoRA delta on that agent's rows (``stacked_lora.StackedLoRA``); the prompts go
        through the text encoder once per agent. The summed per-agent mean losses are
        differentiated once, which gives each agent its own gradient. ``seeds[k]`` seeds agent
        k's augmentation and LoRA dropout as ``loss_and_grads(..., seeds[k])`` seeds its own, so
        an agent's draws do not depend on who shares the pass and, on the CPU, are the ones
        ``loss_and_grads`` makes: the results equal it up to float rounding (the frozen layers
        multiply more rows at once). ``micro_batch`` does not apply here: the pass holds every
        agent's activations. The caller's RNG is left as it was.
        Returns [(loss, grads)] in agent order.
        """
        model = self.materialize()
        with step_rng(None, self.device):  # the caller's generators, restored afterwards
            return self._loss_and_grads_many(model, factors, indices, train_A, seeds)

    def _loss_and_grads_many(self, model: nn.Module, factors: list[Factors],
                             indices: list[np.ndarray], train_A: bool, seeds: list[int]
                             ) -> list[tuple[float, Grads]]:
        xs, ys, gens = [], [], []
        for idx, seed in zip(indices, seeds):
            idx = step_indices(idx, "loss_and_grads_many (per agent)")
            with step_rng(seed, torch.device("cpu")):  # augmentation, as loss_and_grads's
                xs.append(self.preprocess.batch(self.data.train, idx, train=True))
                gens.append(_dropout_generator(self.device, seed))
            ys.append(torch.as_tensor(self.train_labels[idx], device=self.device))
        n, counts = len(factors), [len(y) for y in ys]
        self._set_training(True)
        with stacked_lora.StackedLoRA(self.layers, factors, train_A, gens) as lora, self._autocast():
            lora.rows = counts
            img = model.encode_image(torch.cat(xs).to(self.device), normalize=True)
            if "text" in self.cfg.encoders:
                lora.rows = [len(self.tokens)] * n
                txt = model.encode_text(self.tokens.repeat(n, 1), normalize=True)
                txt = txt.view(n, len(self.tokens), -1)
            else:
                txt = self._text_features().expand(n, -1, -1)
            losses = [F.cross_entropy(classifier.logits(part, txt[k], self.cfg.logit_scale), ys[k])
                      for k, part in enumerate(img.split(counts))]
        torch.stack(losses).sum().backward()
        grads = lora.grads()
        return [(float(loss.detach()), g) for loss, g in zip(losses, grads)]

    @torch.no_grad()
    def evaluate(self, factors: Factors) -> dict[str, float]:
        """``test_loss`` (mean cross-entropy) and ``test_accuracy`` over the test set."""
        self.materialize()
        peft_lora.set_factors(self.layers, factors)
        self._set_training(False)
        with self._autocast():
            txt = self._text_features()
        return classifier.evaluate(self._test_image_features, txt, self.test_labels,
                                   self.cfg.logit_scale, self.cfg.eval_batch_size, self._autocast)

    def _test_image_features(self, part: np.ndarray) -> Tensor:
        """Normalised test image features; all of them cached when the vision tower is frozen."""
        if "vision" in self.cfg.encoders:
            return self._encode_test(part)
        if self._test_features is None:
            n, bs = len(self.test_labels), self.cfg.eval_batch_size
            self._test_features = torch.cat([self._encode_test(np.arange(s, min(n, s + bs)))
                                             for s in range(0, n, bs)])
        return self._test_features[torch.as_tensor(part, device=self.device)]

    def _encode_test(self, part: np.ndarray) -> Tensor:
        x = self.preprocess.batch(self.data.test, part, train=False).to(self.device)
        return self.model.encode_image(x, normalize=True)


def _dropout_generator(device: torch.device, seed: int) -> torch.Generator:
    """Where agent k's dropout draws from in a batched pass. On the CPU: torch's default
    generator as it stands after the agent's augmentation, which is where ``loss_and_grads``'s
    dropout draws from, so the masks are the same. Elsewhere a generator seeded alike (fused
    dropout kernels draw differently from ``bernoulli_``)."""
    if device.type == "cpu":
        gen = torch.Generator()
        gen.set_state(torch.random.default_generator.get_state())
        return gen
    return torch.Generator(device).manual_seed(seed)


def build(task_cfg: CLIPConfig, lora_cfg: LoRAConfig, seed: int) -> CLIPTask:
    """The task of ``task_cfg`` with ``lora_cfg``'s rank, alpha, dropout and scaling; cheap (no
    weights are made or downloaded until ``load``, ``loss_and_grads`` or ``evaluate``). ``seed``
    is not read: weights no tag or checkpoint gives come from ``task_cfg.init_seed``, the same on
    every host, and each step brings its own seed.

    A build never trains: ``checkpoint: pretrain:<name or pretrain YAML>`` is read from the
    stand-in cache as it stands (the driver trains a missing one once, with
    ``decaf_ray.pretrain.resolve_checkpoint``, and hands hosts the concrete file instead)."""
    return CLIPTask(_cached_standin(task_cfg), lora_cfg)


def _cached_standin(cfg: CLIPConfig) -> CLIPConfig:
    """``cfg`` with ``checkpoint: pretrain:<spec>`` replaced by the cached checkpoint and its
    model config; raises ConfigError("task.checkpoint") when the cache has no such entry."""
    # Imported here, not at the top: checkpoints imports pretrain_config, which imports
    # clip.config, and importing that first runs this package's __init__, which imports this
    # module; at the top, whichever of the two loaded first would meet the other half made.
    from decaf_ray.tasks import checkpoints

    spec = checkpoints.standin_spec(cfg.checkpoint)
    if spec is None:
        return cfg
    return dataclasses.replace(cfg, **checkpoints.cached_task_fields(spec))
