"""``decaf-ray export RUN [--agent I|mean] --out DIR``: one agent's adapter, or the network
average, as a standard PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, and peft's model card ``README.md``).

peft writes it itself: the run's task model is built on the meta device (no weights; for a hub
model only its config file, none for the hub ids ``causal_lm_model.KNOWN_CONFIGS`` knows), wrapped
by ``get_peft_model`` with the run's LoRA config (r, lora_alpha, lora_dropout, use_rslora for
``alpha/sqrt(r)``, target_modules as the task placed them), the chosen factors copied into its
LoRA weights (A (r, k) -> ``lora_A.weight``, B (d, r) -> ``lora_B.weight``), then
``save_pretrained``. So key names and config are peft's own, and ``PeftModel.from_pretrained``
on the same base model gives the run's model with that adapter.

``--agent mean`` exports the network average v-bar (A and B each averaged over the agents,
``decaf_ray.factors.mean``): the point at which a run's ``grad_norm`` is measured. It is not
the average of the agents' products B A, and need not score like any one agent.

Runs of an algorithm that folds into the base weights (``fedex``, ``flora``) are refused: their
model is W0 + S + s B A, the base delta S being the run's too, so no adapter alone on the
unchanged base is it (FLoRA's adapters are even fresh, B = 0, at the end of every round). The
run keeps S in ``base_delta.safetensors`` (``results``): W0 + S is that run's base.

The base model to load into:
    causal_lm  the run's ``task.model`` (``base_model_name_or_path``, task_type ``CAUSAL_LM``);
               a GGUF or a random ``model_config`` has no such name: rebuild it with
               ``decaf_ray.tasks.causal_lm_model.load_base_model``.
    clip       ``decaf_ray.tasks.clip.model.base_model(cfg.task)``: open_clip with decaf-ray's
               q/k/v split, weights as the task made them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from decaf_ray.algorithms import ALGORITHMS
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig
from decaf_ray.factors import Factors, mean
from decaf_ray.results import (check_out_dir, load_adapters, load_run_config,
                               readable_like_the_rest)
from decaf_ray.tasks import peft_lora as pl

ADAPTERS = "adapters.safetensors"


def cmd_export(args) -> int:
    """The CLI's ``export``: ``args.run``, ``args.agent`` (an index or ``mean``), ``args.out``."""
    out = export(args.run, args.agent, args.out)
    which = "the network average" if args.agent == "mean" else f"agent {args.agent}"
    print(f"export: {which} of {args.run} -> {out}")
    return 0


def export(run: str | Path, agent: str | int, out: str | Path) -> Path:
    """Write agent ``agent`` (an index, or ``"mean"``) of run directory ``run`` as a PEFT adapter
    directory ``out`` (absent or empty). Every check comes before anything is written.

    Raises:
        ConfigError: not a run directory, a task with no model (synthetic), no adapters (a run
            that failed, or has not ended), an agent out of range, ``out`` not empty or not
            writable, a model config that cannot be read, or adapters that do not fit the
            run's model.
    """
    cfg = _run_config(Path(run))
    factors = _agent_factors(Path(run), agent)
    out = Path(out)
    check_out_dir(out)
    model = _meta_peft_model(cfg, list(factors))
    layers = pl.lora_layers(model)
    have = {n: (b.shape[0], a.shape[1], a.shape[0]) for n, (a, b) in factors.items()}
    want = {n: (d, k, cfg.lora.rank) for n, (d, k) in pl.shapes(layers).items()}
    if have != want:
        raise ConfigError("run", f"{ADAPTERS} does not fit the run's model (modules or shapes "
                                 "differ from config.json's); was config.json edited?")
    pl.fill_factors(layers, factors)
    try:
        # no embedding layers: decaf-ray adapts linear layers only and never resizes a vocabulary
        # ("auto" would ask the hub for the base model's config to find out)
        model.save_pretrained(str(out), save_embedding_layers=False)
    except OSError as e:
        raise ConfigError("--out", f"{out}: cannot write it ({e.strerror or e})") from None
    readable_like_the_rest(out / "adapter_model.safetensors")
    return out


def _run_config(run: Path) -> ExperimentConfig:
    if not (run / "config.json").is_file():
        raise ConfigError("run", f"{run} is not a run directory (no config.json)")
    try:
        cfg = load_run_config(run)
    except json.JSONDecodeError as e:
        raise ConfigError("run", f"{run / 'config.json'} is not JSON ({e.msg}, line {e.lineno})"
                          ) from None
    except ConfigError as e:
        raise e.under(f"{run / 'config.json'}") from None
    if cfg.task.kind not in ("causal_lm", "clip"):
        raise ConfigError("run", f"a {cfg.task.kind} task has no model to adapt, so no PEFT "
                                 "adapter to export (causal_lm and clip runs have one)")
    if ALGORITHMS[cfg.algorithm].fold is not None:
        raise ConfigError("run", f"{cfg.algorithm} folds its server averages into the base "
                                 "weights, so no adapter on the unchanged base is the run's model "
                                 "(its base delta S is in base_delta.safetensors): nothing to "
                                 "export as a PEFT adapter")
    return cfg


def _agent_factors(run: Path, agent: str | int) -> Factors:
    """Agent ``agent``'s factors, or the network average for ``"mean"``."""
    path = run / ADAPTERS
    if not path.is_file():
        status = _status(run)
        raise ConfigError("run", f"{run} has no {ADAPTERS} (" + (
            f"summary status: {status})" if status else "no summary: still running, or killed)"))
    adapters = load_adapters(path)
    if str(agent) == "mean":
        return mean(list(adapters.values()))
    n = len(adapters)
    try:
        i = int(str(agent))
    except ValueError:
        i = -1
    if i not in adapters:
        raise ConfigError("--agent", f"must be an agent index 0..{n - 1} or 'mean' (got {agent!r})")
    return adapters[i]


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _meta_peft_model(cfg: ExperimentConfig, names: list[str]) -> nn.Module:
    """The run's task model in peft, weightless (meta device); ``names``: the adapted modules."""
    if cfg.task.kind == "clip":
        return _clip_model(cfg, names)
    return _causal_lm_model(cfg)


def _causal_lm_model(cfg: ExperimentConfig) -> nn.Module:
    from decaf_ray.tasks import build_task
    from decaf_ray.tasks.causal_lm_model import hf_config, meta_peft_model

    task = cfg.task
    if task.model_config is not None and "vocab_size" not in task.model_config:
        # a random model's vocabulary is its built-in tokenizer's, made from the data
        config = build_task(task, cfg.lora, cfg.seed).config
    else:
        try:
            config = hf_config(task)
        except OSError as e:  # a hub id not in the cache, offline
            raise ConfigError("task.model", f"{task.model}: cannot read its config "
                              f"({str(e).strip().splitlines()[0]})") from None
    # peft's base_model_name_or_path is the model's name_or_path, as from_pretrained sets it:
    # a hub id or a folder; a GGUF or a random model has none that loads it alone
    named = task.model_config is None and task.gguf_file is None
    config.name_or_path = task.model if named else ""
    pcfg = dataclasses.replace(pl.peft_config(cfg.lora, task.targets), task_type="CAUSAL_LM")
    return meta_peft_model(config, pcfg)


def _clip_model(cfg: ExperimentConfig, names: list[str]) -> nn.Module:
    from peft import get_peft_model

    from decaf_ray.tasks.clip.model import base_model

    pcfg = pl.peft_config(cfg.lora, names)
    # exact names, as decaf_ray.tasks.clip.model.adapt gives them: a list would also match every
    # name that ends with one (text "transformer.resblocks.0..." ends vision's)
    pcfg.target_modules = "|".join(re.escape(n) for n in names)
    with torch.device("meta"):
        return get_peft_model(base_model(cfg.task, weights=False), pcfg)
