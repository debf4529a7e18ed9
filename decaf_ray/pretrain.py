"""Pretrain a small open_clip CLIP from scratch: a stand-in foundation model for the CLIP task.

Why the CLIP task needs one offline, and how well it does: docs/results/README.md.

``pretrain`` trains ALL weights of an open_clip model with the CLIP task's own classifier, the
cosine similarity between the image features and the text features of ``prompt.format(class_name)``
per class times a logit scale, under cross-entropy, then evaluates on the test split and saves
into ``out/``::

    model.safetensors   the open_clip state dict (safetensors only)
    model_config.json   the open_clip model config (embed_dim, vision_cfg, text_cfg)
    pretrain.json       the resolved config, test accuracy and loss, steps, wall time, losses

The directory appears whole or not at all (written to a temporary sibling, then renamed).

The data part reuses the CLIP task: a ``CLIPConfig`` is built from this config's data fields and
``decaf_ray.tasks.image_data`` loads, splits and preprocesses the images exactly as the task will
(same resize, crop, normalisation and tokenizer), so a checkpoint drops into the task as is::

    task:
      kind: clip
      dataset: digits
      checkpoint: <out>/model.safetensors      # checkpoint_task_fields(out) gives both fields
      model_config: {...}                      # the contents of <out>/model_config.json

``ensure_pretrained(name_or_cfg)`` trains a config once and caches it under
``${DECAF_RAY_CACHE:-~/.cache/decaf-ray}/pretrained/<name>-<hash of the config>``;
``resolve_checkpoint(experiment_cfg)`` is what a driver calls once for a CLIP task whose
``checkpoint`` is ``pretrain:<spec>``: it trains a missing stand-in and returns the config naming
the concrete file, so that no task build, on any host, ever trains.

The config (``PretrainConfig``, in ``decaf_ray.tasks.pretrain_config``), the cache and its
atomic publishing (``decaf_ray.tasks.checkpoints``), the model (``decaf_ray.tasks.clip.model``)
and the classifier's evaluation (``decaf_ray.tasks.clip.classifier``) live in their own modules,
which the CLIP task reads too; this module is the training and its entry points.

Randomness: the init, the batch order and the augmentation come from ``cfg.seed`` alone, on the
CPU generator and the training device's; the caller's generators are left as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from decaf_ray import devices
from decaf_ray.versions import versions
from decaf_ray.config import ConfigError
from decaf_ray.tasks.checkpoints import (cache_root, cached_path, checkpoint_digest,
                                         checkpoint_task_fields, file_lock, publish,
                                         standin_spec)
from decaf_ray.tasks.clip import classifier
from decaf_ray.tasks.clip import model as clip_model
from decaf_ray.tasks.pretrain_config import (DEFAULT_MODEL_CONFIG, PRESETS, PretrainConfig,
                                             as_config, config_hash, load_pretrain_config)
from decaf_ray.tasks.step_rng import step_rng


# ---------------------------------------------------------------------------- training


def pretrain(cfg: PretrainConfig, out: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train all weights of ``cfg.model_config`` on ``cfg.dataset``, evaluate, save into ``out``
    (default ``cfg.out``), and return what ``pretrain.json`` holds plus ``out`` and
    ``checkpoint`` paths.

    Raises:
        ConfigError: no output directory, or one that already holds files; the data cannot be
            loaded; the model config does not build. Raised before any training or writing.
    """
    target = out if out is not None else cfg.out
    if target is None:
        raise ConfigError("out", "is required (or use ensure_pretrained(cfg) to train into the "
                          "cache)")
    target = Path(target).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError("out", f"{target} already exists and is not empty; choose another "
                          "directory or remove it")
    result, files = _train(dataclasses.replace(cfg, out=str(target)), progress)
    publish(files, target, use_existing=False)
    return {**result, "out": str(target), "checkpoint": str(target / "model.safetensors")}


def _train(cfg: PretrainConfig, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and evaluate in memory; returns (pretrain.json contents, {file name: content})."""
    import torch

    from decaf_ray.tasks import image_data

    data_cfg = cfg.data_config()
    arch, _ = clip_model.architecture(data_cfg)
    try:
        data = image_data.load(data_cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise ConfigError("dataset", f"{cfg.dataset}: {e}") from None
    if len(data.train) == 0 or len(data.test) == 0:
        raise ConfigError("dataset", f"{cfg.dataset}: empty train or test split")
    pre = image_data.Preprocess(clip_model.image_size(arch), clip_model.OPENAI_MEAN,
                                clip_model.OPENAI_STD, cfg.augment, cfg.hflip,
                                tuple(cfg.crop_scale), cache_mb=1024)
    dev = devices.resolve(cfg.device)
    prompts = [cfg.prompt.format(c) for c in data.class_names]
    tokens = clip_model.tokenizer(data_cfg, arch)(prompts).to(dev)

    start = time.perf_counter()
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.enter_context(step_rng(cfg.seed, dev))  # the caller's RNG is restored after
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
            stack.callback(torch.set_num_threads, threads)
        try:
            model = clip_model.instantiate(arch).to(dev)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise ConfigError("model_config", f"open_clip cannot build it: {e}") from None
        n_params = sum(p.numel() for p in model.parameters())
        losses = _fit(model, cfg, lambda idx: pre.batch(data.train, idx, train=True),
                      torch.as_tensor(data.train.labels), tokens, progress)
        train_time = time.perf_counter() - start
        scale = float(torch.as_tensor(_scale(model, cfg)).detach())
        metrics = _evaluate(model, pre, data.test, tokens, scale, cfg.eval_batch_size, dev)
    wall = time.perf_counter() - start

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    result = {
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "steps": cfg.steps,
        "wall_time_s": round(wall, 2),
        "train_time_s": round(train_time, 2),
        "dataset": cfg.dataset,
        "class_names": list(data.class_names),
        "n_train": len(data.train),
        "n_test": len(data.test),
        "params": n_params,
        "logit_scale": scale,
        "losses": losses,
        "config_hash": config_hash(cfg),
        "config": cfg.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "threads": cfg.threads or threads,
        "device": str(dev),
    }
    files = {"model.safetensors": state, "model_config.json": arch, "pretrain.json": result}
    return result, files


def _fit(model, cfg: PretrainConfig, images, labels, tokens, progress: bool) -> list[list[float]]:
    """Train all of ``model``'s weights for ``cfg.steps`` AdamW steps on batches of training
    images (``images(idx)``: (m, 3, S, S) on the CPU) and their ``labels`` (n,); returns the
    loss curve, ``[[step, mean loss over the last log_every steps], ...]``."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    dev = tokens.device
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    order = _batches(len(labels), cfg.batch_size, cfg.steps, cfg.seed)
    losses: list[list[float]] = []
    window: list[float] = []
    model.train()
    bar = tqdm(total=cfg.steps, desc=f"pretrain {cfg.resolved_name}", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    for step in range(1, cfg.steps + 1):
        idx = next(order)
        x = images(idx).to(dev)
        y = labels[idx].to(dev)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        loss = F.cross_entropy(_scale(model, cfg) * img @ txt.T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"pretrain loss is {value} at step {step}; lower lr")
        window.append(value)
        if step % cfg.log_every == 0 or step == cfg.steps:
            losses.append([step, float(np.mean(window))])
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            window = []
        bar.update(1)
    bar.close()
    return losses


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no decay on biases, norms, logit_scale and other 1-d parameters."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "logit_scale" in name or ".ln_" in f".{name}" or "bias" in name
        (plain if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def _lr_factor(cfg: PretrainConfig, step: int) -> float:
    """Multiplier of ``lr`` for the update after ``step`` updates (LambdaLR's convention)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Batches of training indices: seeded epochs of permutations, batches may span epochs."""
    rng = np.random.default_rng([seed, 7])
    buf = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(buf) < batch_size:
            buf = np.concatenate([buf, rng.permutation(n)])
        idx, buf = buf[:batch_size], buf[batch_size:]
        yield idx


def _scale(model, cfg: PretrainConfig):
    """The logit scale: fixed, or the model's learned one (exp, clamped at 100, as CLIP)."""
    if cfg.logit_scale is not None:
        return cfg.logit_scale
    return model.logit_scale.exp().clamp(max=100.0)


def _evaluate(model, pre, test, tokens, scale: float, batch_size: int, dev) -> dict[str, float]:
    """The CLIP task's test metrics of the trained model (float32, no LoRA)."""
    import torch

    model.eval()
    with torch.no_grad():
        txt = model.encode_text(tokens, normalize=True)
    return classifier.evaluate(
        lambda part: model.encode_image(pre.batch(test, part, train=False).to(dev), normalize=True),
        txt, test.labels, scale, batch_size)


# ---------------------------------------------------------------------------- cache


def ensure_pretrained(name_or_cfg: Any, cache_dir: str | Path | None = None,
                      progress: bool = True) -> Path:
    """The checkpoint directory of a pretrain config, trained on first use and cached.

    ``name_or_cfg``: a ``PretrainConfig``, a mapping, a YAML path, or a preset name from
    ``PRESETS`` (``pretrain-fmnist``). The directory is
    ``<cache_dir or ${DECAF_RAY_CACHE:-~/.cache/decaf-ray}>/pretrained/<name>-<hash>`` and holds
    model.safetensors, model_config.json, pretrain.json. Concurrent callers do not corrupt it:
    training goes to a temporary directory renamed into place; a caller finding the directory
    complete uses it; callers on the same machine wait for one another (a file lock) instead of
    training twice.
    """
    cfg = as_config(name_or_cfg)
    final = cached_path(cfg, cache_dir)
    if (final / "pretrain.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if (final / "pretrain.json").is_file():  # trained by whoever held the lock
            return final
        if final.exists() and not any(final.iterdir()):
            final.rmdir()
        _, files = _train(dataclasses.replace(cfg, out=str(final)), progress)
        publish(files, final, use_existing=True)
    return final



def resolve_checkpoint(cfg, cache_dir: str | Path | None = None, progress: bool = True):
    """``cfg`` (an ``ExperimentConfig``) with a CLIP ``task.checkpoint: pretrain:<spec>`` made
    concrete: the stand-in is looked up in the cache, trained there on a miss
    (``ensure_pretrained``), and ``task.checkpoint`` / ``task.model_config`` become its file and
    model config (``checkpoint_task_fields``). Any other config comes back unchanged.

    For drivers: call it once, before hosts build tasks, so no host trains and every host loads
    the same bytes (``checkpoint_digest`` of the returned ``task.checkpoint`` names them).

    Raises:
        ConfigError("task.checkpoint"): ``spec`` is neither a preset nor a pretrain YAML.
    """
    spec = standin_spec(getattr(cfg.task, "checkpoint", None))
    if getattr(cfg.task, "kind", None) != "clip" or spec is None:
        return cfg
    try:
        entry = ensure_pretrained(spec, cache_dir, progress)
    except ConfigError as e:
        if e.field == "pretrained":  # as_config's field for a name it does not know
            raise ConfigError("task.checkpoint", f"pretrain:{spec}: {e.message}") from None
        raise
    except FileNotFoundError as e:
        raise ConfigError("task.checkpoint", f"pretrain:{spec}: {e}") from None
    task = dataclasses.replace(cfg.task, **checkpoint_task_fields(entry))
    return dataclasses.replace(cfg, task=task)


# ---------------------------------------------------------------------------- CLI


def cli_pretrain(config_path: str, overrides: list[str], out: str | None) -> int:
    """``decaf-ray pretrain CONFIG [--set KEY=VALUE ...] [--out DIR]``.

    With ``--out`` (or ``out:`` in the config) trains into that directory (which must not exist
    or be empty); without, trains into the cache (``ensure_pretrained``; an existing entry is
    reused, not retrained). Prints the checkpoint, its test accuracy and the CLIP task fields.
    ConfigError propagates (the CLI maps it to exit status 2; nothing is written).
    """
    cfg = load_pretrain_config(config_path, overrides)
    if out is not None:
        cfg = dataclasses.replace(cfg, out=out)
    if cfg.out is None:
        cached = (cached_path(cfg) / "pretrain.json").is_file()
        target = ensure_pretrained(cfg)
        note = " (cached: already trained)" if cached else ""
    else:
        target = Path(pretrain(cfg)["out"])
        note = ""
    info = json.loads((target / "pretrain.json").read_text())
    fields = checkpoint_task_fields(target)
    print(f"pretrained {info['config'].get('name') or cfg.resolved_name}: {info['dataset']}, "
          f"{info['steps']} steps in {info['wall_time_s']:.1f}s{note}; "
          f"test_accuracy {info['test_accuracy']:.4f}, test_loss {info['test_loss']:.4f}")
    print(f"checkpoint: {fields['checkpoint']}")
    print("CLIP task fields (task: kind: clip, ...):")
    print(f"  checkpoint: {fields['checkpoint']}")
    print(f"  model_config: {json.dumps(fields['model_config'])}")
    return 0


__all__ = ["PretrainConfig", "DEFAULT_MODEL_CONFIG", "PRESETS", "load_pretrain_config",
           "config_hash", "pretrain", "ensure_pretrained", "resolve_checkpoint", "cached_path",
           "cache_root", "checkpoint_task_fields", "checkpoint_digest", "cli_pretrain"]
