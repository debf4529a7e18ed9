"""What one trial asks of a cluster, and how many trials fit at once: from the config alone.

``size_trial(cfg)`` reads an ``ExperimentConfig`` and, without data, weights or network (CLIP:
open_clip's architecture table and a meta-device model; causal LM: ``KNOWN_CONFIGS`` or a local
config and a meta-device model; synthetic: its d and k), gives the trial's placement (hosts,
CPUs and GPUs per host and per trial, base-model copies) and an **estimate** of the memory one
host needs on its device, in parts (bytes; GB below means 10^9 bytes):

    weights      frozen params x bytes: CLIP keeps float32 weights (bf16 is autocast);
                 a causal LM loads bf16 on CUDA for ``precision: auto``, else float32.
    adapters     agents_per_host x (A and B x 4 B + trainable x 4 B x (optimizer states + 1
                 gradient)); states: sgd 0, momentum 1, adam/adamw 2. Today factors and states
                 live in host RAM, so on a GPU this is an upper bound (a few MB to GB).
    activations  what autograd saves for one backward pass, c bytes per layer x token x width:
                 CLIP: agents per pass (batch_agents) x [vision layers x images x (grid^2 + 1) x
                   width + text layers x classes x context x width] x c, plus, under bf16
                   autocast, a 2 B copy of each adapted tower's frozen weights (the casts that
                   linear layers save); images = micro_batch or data.batch_size;
                 causal LM: layers x (micro_batch x max_length) x hidden x c (an upper
                   bound: prompts are padded to the longest in the micro batch), plus 5 B (10 B
                   in float32) per attention score for ``attn_implementation: eager``; with
                   gradient checkpointing 4 B per layer x token x hidden plus one layer's c.
                 c is measured on the CPU with torch's saved-tensor hooks on ViT-B/16 and a
                 LLaMA-shaped model (LoRA on q, k, v / q, v) and raised 20% for kernels that
                 differ on CUDA: ``ACTIVATION_BYTES``.
    cuda context 0.5 GB per process on a GPU.
    folded base  (``fedex``, ``flora``: algorithms that fold into the frozen weights) per adapted
                 (d, k) weight: a copy of W0 at the weights' dtype (the task sets W0 + S, never
                 in place), S (float32, host RAM) and the round's delta (float32, transient).

Omitted: the allocator's fragmentation and cached blocks, cuDNN/cuBLAS workspaces, evaluation's
transient no-grad activations (eval_batch_size, one layer at a time), the image cache and data in
host RAM (``cache_mb``), the coordinator, and Ray's own processes. Treat the total as a floor
with some margin, not a promise.

How many such trials fit on a cluster at once: ``decaf_ray.packing``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig
from decaf_ray.placement import host_count
from decaf_ray.sweep_resources import DRIVER_CPUS

GB = 1e9
CUDA_CONTEXT = 0.5 * GB
"""What one CUDA context takes on its GPU, per host process."""
DECODERS = ("causal_lm", "instruct")
ACTIVATION_BYTES = {"clip": {2: 48, 4: 76}, "causal_lm": {2: 56, 4: 85}}
"""c per (layer x token x width) by activation bytes (2: bf16, 4: float32). Measured on the CPU
(saved-tensor hooks, one real training step): ViT-B/16 37 (vision) and 41 (text) bf16, 63
float32; LLaMA-shaped (intermediate 2.69 x hidden, LoRA q, v) 46 bf16, 70 float32; +20%."""
CHECKPOINT_BYTES = {2: 4, 4: 7}
"""Per layer x token x hidden with gradient checkpointing (measured 3 in bf16; +20%)."""
EAGER_SCORE_BYTES = {2: 5, 4: 10}
"""Per attention score (heads x length^2 per sequence and layer) with eager attention."""
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2, "adam_tracked": 3}
"""Tensors of a factor's size each optimizer keeps: adam_tracked's M, V and tracker (and
AMSGrad's moving average besides its running max)."""
CLIP_CLASSES = {"digits": 10, "fashion_mnist": 10, "flowers102": 102, "food101": 101, "ucf101": 101}
ASSUMED_CLASSES = 100


# ---------------------------------------------------------------------------- one trial


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    formula: str


@dataclasses.dataclass(frozen=True)
class TrialSize:
    """What one trial of a config asks for (see the module docstring)."""

    placement: str
    """``hosts`` (AgentHost actors), ``train_workers`` (Centralized on Ray Train) or
    ``inprocess`` (every agent in the trial's own process)."""
    hosts: int
    agents_per_host: int
    batch_agents: int
    host: tuple[float, float]
    """(CPUs, GPUs) of each host bundle."""
    driver_cpus: float
    device: str
    parts: tuple[Part, ...]
    rounds: int
    local_steps: int
    training_agents: int
    model: str = ""
    """The model in words (a hub id, a GGUF file, a random config, a CLIP architecture)."""
    trainable: int = 0
    """LoRA parameters each agent trains (the paper's Tables 6-7 count)."""

    memory = property(lambda self: sum(p.bytes for p in self.parts))
    """Bytes one host needs on its device (the estimate's total)."""
    bundles = property(lambda self: [(self.driver_cpus, 0.0)] * (self.driver_cpus > 0)
                       + [self.host] * self.hosts)
    """(CPUs, GPUs) of each bundle the trial reserves: the driver's sliver, then its hosts."""
    cpus = property(lambda self: sum(c for c, _ in self.bundles))
    gpus = property(lambda self: sum(g for _, g in self.bundles))
    steps_per_agent = property(lambda self: self.rounds * self.local_steps)


def size_trial(cfg: ExperimentConfig, task: Any = None) -> TrialSize:
    """Size one trial of ``cfg``. ``task``, a built task (optional), gives exact class counts
    and vocabularies where the config alone cannot (``describe CONFIG`` has one)."""
    from decaf_ray.algorithms import ALGORITHMS
    from decaf_ray.factors import param_count

    rt, central = cfg.runtime, ALGORITHMS[cfg.algorithm].centralized
    agents = 1 if central else cfg.agents
    batch = cfg.data.batch_size
    if rt.kind == "inprocess":
        placement, hosts, per, driver = "inprocess", 1, agents, 0.0
        host = (float(rt.threads or 1), rt.gpus_per_host)  # the trial's own process is the host
    elif central:
        placement, hosts, per = "train_workers", rt.train_workers, 1
        host, driver = (rt.cpus_per_host or 1.0, rt.gpus_per_host), DRIVER_CPUS
        batch = -(-batch // rt.train_workers)
    else:
        placement, per = "hosts", rt.agents_per_host
        hosts = host_count(agents, per)
        host, driver = (rt.cpus_per_host or 1.0, rt.gpus_per_host), DRIVER_CPUS
    per = min(per, agents)
    device = cfg.task.device if hasattr(cfg.task, "device") else "cpu"
    cuda = host[1] > 0 and not device.startswith(("cpu", "mps"))
    n_pass = min(rt.batch_agents, per) if cfg.task.kind == "clip" else 1
    shapes = _lora_shapes(cfg, task)
    trainable = param_count(shapes, _largest_rank(cfg, shapes),
                            ALGORITHMS[cfg.algorithm].train_A)
    parts = _task_parts(cfg, task, cuda, batch, n_pass) + [_adapters(cfg, per, shapes, trainable)]
    if ALGORITHMS[cfg.algorithm].fold is not None:
        parts.append(_folded_base(cfg.task, shapes, cuda))
    if cuda:
        parts.append(Part("cuda context", CUDA_CONTEXT, "one CUDA context per host process"))
    return TrialSize(placement, hosts, per, n_pass, host, driver, "cuda" if cuda else "cpu",
                     tuple(parts), cfg.rounds, cfg.local_steps, agents, _model(cfg.task),
                     trainable)


def _model(t) -> str:
    if t.kind in DECODERS:
        what = ("a random model_config" if t.model_config is not None else
                f"{t.model} ({t.gguf_file})" if t.gguf_file else t.model)
        return f"{what}, LoRA on {', '.join(t.targets)}"
    if t.kind == "clip":
        return f"CLIP {t.model} ({t.pretrained or ('a checkpoint' if t.checkpoint else 'random init')})"
    return f"{t.kind} {getattr(t, 'd', '')} x {getattr(t, 'k', '')}"


def _task_parts(cfg, task, cuda: bool, batch: int, n_pass: int) -> list[Part]:
    kind = cfg.task.kind
    if kind == "clip":
        return _clip_parts(cfg.task, task, cuda, batch, n_pass)
    if kind in DECODERS:
        return _lm_parts(cfg.task, task, cuda, batch)
    if kind == "synthetic":
        t = cfg.task
        return [Part("weights", t.d * t.k * 4.0, f"{t.d} x {t.k} x 4 B (float32, CPU)"),
                Part("activations", batch * (t.d + t.k) * 4.0 * 2,
                     f"batch {batch} x (d {t.d} + k {t.k}) x 4 B x 2")]
    raise ConfigError("task.kind", f"no memory estimate for task kind {kind!r}; sizing knows "
                                   "clip, causal_lm, instruct and synthetic")


def _adapters(cfg: ExperimentConfig, per: int, shapes: dict[str, tuple[int, int]],
              trained: int) -> Part:
    """The agents' factors, and for the ``trained`` of them optimizer states and a gradient."""
    from decaf_ray.factors import param_count

    full = param_count(shapes, _largest_rank(cfg, shapes), True)
    states = OPTIMIZER_STATES[cfg.optim.name] + (cfg.optim.h == "amsgrad")
    return Part("adapters", per * (full + trained * (states + 1)) * 4.0,
                f"{per} agents x ({full:,} factor params + {trained:,} trained x ({states} "
                f"{cfg.optim.name} states + 1 gradient)) x 4 B")


def _folded_base(t, shapes: dict[str, tuple[int, int]], cuda: bool) -> Part:
    """What a fold adds to a host: W0's copy at the weights' dtype, S and the round's delta."""
    weight = 2 if t.kind in DECODERS and _bf16(t, cuda) else 4  # CLIP's stay float32
    dk = sum(d * k for d, k in shapes.values())
    return Part("folded base", dk * (weight + 8.0), f"{dk:,} adapted weights x ({weight} B W0 "
                "copy + 4 B S + 4 B the round's delta)")


def _bf16(t, cuda: bool) -> bool:
    """Whether the task computes in bfloat16: asked for, or ``auto`` on a GPU."""
    return t.precision == "bfloat16" or (t.precision == "auto" and cuda)


def _largest_rank(cfg: ExperimentConfig, shapes: dict[str, tuple[int, int]]) -> int:
    """The largest rank an agent may hold (``LoRAConfig.max_rank``), for an upper bound on
    memory (and the trainable count reported: the largest agent's)."""
    return cfg.lora.max_rank(min(min(dk) for dk in shapes.values()))


def _lora_shapes(cfg: ExperimentConfig, task: Any) -> dict[str, tuple[int, int]]:
    if task is not None:
        return task.lora_shapes()
    t = cfg.task
    if t.kind == "clip":
        return dict(_clip_meta(t)[2])
    if t.kind in DECODERS:
        return dict(_lm_meta(_lm_config(t, None), tuple(t.targets))[1])
    return {"linear": (t.d, t.k)}


# ---------------------------------------------------------------------------- CLIP


def _clip_meta(t) -> tuple[dict, int, tuple, dict[str, int]]:
    """(architecture, params, LoRA shapes, params of each tower's transformer) of the CLIP of
    task config ``t``, from a meta-device model (remembered per architecture and placement)."""
    from decaf_ray.tasks.clip import architecture

    spec = t.checkpoint[len("pretrain:"):] if (t.checkpoint or "").startswith("pretrain:") else None
    if spec is not None:  # a stand-in: its pretrain config names the architecture (none trained)
        from decaf_ray.tasks.pretrain_config import as_config

        t = dataclasses.replace(t, model_config=as_config(spec).model_config, checkpoint=None)
    arch = architecture(t)[0]
    key = json.dumps(arch, sort_keys=True, default=str)
    return (arch, *_clip_counts(key, tuple(t.targets), tuple(t.encoders), tuple(t.blocks or ())))


@functools.lru_cache(maxsize=32)
def _clip_counts(arch_json: str, targets: tuple, encoders: tuple, blocks: tuple):
    import torch

    from decaf_ray.config import LoRAConfig
    from decaf_ray.tasks import peft_lora
    from decaf_ray.tasks.clip import CLIPConfig, adapt, instantiate

    arch = json.loads(arch_json)
    with torch.device("meta"):
        model = instantiate(arch)
    params = sum(p.numel() for p in model.parameters())
    towers = {"vision": sum(p.numel() for n, p in model.named_parameters()
                            if n.startswith("visual.transformer.")),
              "text": sum(p.numel() for n, p in model.named_parameters()
                          if n.startswith("transformer."))}
    tcfg = CLIPConfig(dataset="digits", model_config=arch, targets=list(targets),
                      encoders=list(encoders), blocks=list(blocks) or None)
    shapes = tuple(peft_lora.shapes(adapt(model, tcfg, LoRAConfig(rank=1))).items())
    return params, shapes, towers


def _clip_classes(t, task) -> tuple[int, str]:
    if task is not None and getattr(task, "num_classes", None):
        return task.num_classes, ""
    if t.class_names:
        return len(t.class_names), ""
    if t.dataset in CLIP_CLASSES and t.split_file is None:
        return CLIP_CLASSES[t.dataset], ""
    root = Path(t.root).expanduser() if t.root else None
    if t.split_file is None and root is not None and root.is_dir():
        found = sum(1 for p in root.iterdir() if p.is_dir())
        if found:
            return found, ""
    return ASSUMED_CLASSES, f" (classes unknown without the data: {ASSUMED_CLASSES} assumed)"


def _clip_parts(t, task, cuda: bool, batch: int, n_pass: int) -> list[Part]:
    arch, params, _, towers = _clip_meta(t)
    bf16 = _bf16(t, cuda)
    ab = 2 if bf16 else 4
    c = ACTIVATION_BYTES["clip"][ab]
    images = min(t.micro_batch or batch, batch)
    classes, note = _clip_classes(t, task)
    vis, txt = arch["vision_cfg"], arch["text_cfg"]
    size = vis.get("image_size", 224)
    grid = int(size if isinstance(size, int) else size[0]) // int(vis.get("patch_size", 16))
    towers_in = {"vision": (vis, images * (grid * grid + 1), f"{images} images x {grid * grid + 1}"),
                 "text": (txt, classes * txt.get("context_length", 77),
                          f"{classes} prompts x {txt.get('context_length', 77)}")}
    per_agent, terms, casts = 0.0, [], 0.0
    for enc in t.encoders:
        tower, tokens, what = towers_in[enc]
        layers = tower.get("layers", 12)
        first = min(b % layers for b in t.blocks) if t.blocks else 0
        saved = layers - first  # autograd keeps activations from the first adapted block on
        per_agent += saved * tokens * tower["width"] * c
        terms.append(f"{enc} {saved} layers x ({what}) tokens x {tower['width']}")
        casts += towers[enc] * 2.0 if bf16 else 0.0
    formula = (f"{n_pass} agent(s) per pass x [{' + '.join(terms)}] x {c} B{note}"
               + (f" + {casts / GB:.2f} GB bf16 casts of the adapted towers' weights" if casts else ""))
    return [Part("weights", params * 4.0, f"{params:,} params x 4 B (float32"
                 + (", bf16 autocast)" if bf16 else ")")),
            Part("activations", n_pass * per_agent + casts, formula)]


# ---------------------------------------------------------------------------- causal LM


def _lm_config(t, task):
    if task is not None and getattr(task, "config", None) is not None:
        return task.config
    from decaf_ray.tasks.causal_lm_model import hf_config

    try:
        return hf_config(t, None)
    except OSError as e:  # a hub id outside KNOWN_CONFIGS, without network or cache
        raise ConfigError("task.model", f"{t.model}: its architecture is not known offline "
                          f"({str(e).splitlines()[0][:120]}); use a local folder, a GGUF "
                          "file or one of causal_lm_model.KNOWN_CONFIGS") from None


_LM_META: dict[tuple[str, tuple], tuple[int, dict]] = {}


def _lm_meta(config, targets: tuple) -> tuple[int, dict[str, tuple[int, int]]]:
    """(params, LoRA shapes) of a meta-device causal LM (remembered per config and targets)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from decaf_ray.config import LoRAConfig
    from decaf_ray.tasks.causal_lm_model import meta_lora_shapes

    key = (config.to_json_string(), targets)
    if key not in _LM_META:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        _LM_META[key] = params, meta_lora_shapes(config, list(targets), LoRAConfig(rank=1))
    return _LM_META[key]


def _lm_parts(t, task, cuda: bool, batch: int) -> list[Part]:
    config = _lm_config(t, task)
    params, _ = _lm_meta(config, tuple(t.targets))
    bf16 = _bf16(t, cuda)
    ab = 2 if bf16 else 4
    layers, hidden = config.num_hidden_layers, config.hidden_size
    micro = min(t.micro_batch, batch)
    tokens, c = micro * t.max_length, ACTIVATION_BYTES["causal_lm"][ab]
    formula = f"{layers} layers x {tokens:,} tokens ({micro} x max_length {t.max_length}) x {hidden}"
    if t.gradient_checkpointing:  # each layer's input kept, one layer recomputed at a time
        act = layers * tokens * hidden * CHECKPOINT_BYTES[ab] + tokens * hidden * c
        formula += f" x {CHECKPOINT_BYTES[ab]} B checkpoints + one layer x {c} B"
    else:
        act = layers * tokens * hidden * c
        formula += f" x {c} B"
    if t.attn_implementation == "eager":
        heads = config.num_attention_heads
        act += layers * micro * heads * t.max_length ** 2 * EAGER_SCORE_BYTES[ab]
        formula += f" + eager scores {layers} x {micro} x {heads} heads x {t.max_length}^2 x {EAGER_SCORE_BYTES[ab]} B"
    parts = [Part("weights", params * float(ab), f"{params:,} params x {ab} B "
                  f"({'bfloat16' if bf16 else 'float32'})"),
             Part("activations", float(act), formula)]
    if t.kind == "instruct":  # every position's logits (causal_lm keeps only the last few)
        vocab = config.vocab_size
        parts.append(Part("logits", float(tokens * vocab * (ab + 8)),
                          f"{tokens:,} tokens x vocab {vocab:,} x ({ab} B + float32 copy and "
                          "its gradient 8 B)"))
    return parts
