"""The causal LM's model side: its architecture without weights, GGUF files, loading.

``hf_config`` gives the transformers config of a ``CausalLMConfig``'s model without loading
weights (a random ``model_config``, a GGUF's metadata, ``KNOWN_CONFIGS`` for published hub ids,
else the hub's or folder's config file); ``meta_peft_model`` the peft model on the meta device
(names and shapes, no weights), ``meta_lora_shapes`` the adapted shapes from it. ``load_codec``
and ``load_base_model`` load the tokenizer and the frozen weights, which the task wraps in peft.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decaf_ray.config import ConfigError, LoRAConfig
from decaf_ray.tasks import peft_lora as pl
from decaf_ray.tasks import text_data as td
from decaf_ray.tasks.causal_lm_config import CausalLMConfig

_LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA2_13B = dict(_LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                   num_attention_heads=40, num_key_value_heads=40)
_SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True)
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B, "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": _LLAMA2_13B, "meta-llama/Llama-2-13b-chat-hf": _LLAMA2_13B,
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M, "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
}
"""Architectures of published hub models, so shapes (and ``describe``) need no download."""
_INIT = 3  # seed stream of a random model's weights (text_data's streams are 0-2)


def _dtype_kw() -> str:
    """``dtype`` (transformers >= 4.56) or the older ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def resolve_gguf(spec: str, model: str) -> tuple[str, str]:
    """``(folder or repo, file name)`` for ``from_pretrained(folder, gguf_file=name)``."""
    if spec.startswith("auto:"):
        package, _, name = spec[5:].partition("/")
        found = importlib.util.find_spec(package)  # a top-level spec: the package is not imported
        if found is None or not found.submodule_search_locations:
            raise ConfigError("gguf_file", f"no installed package {package!r} to find a GGUF in")
        folder = Path(next(iter(found.submodule_search_locations)))
        files = sorted(folder.glob(name or "*.gguf"))
        if len(files) != 1:
            raise ConfigError("gguf_file", f"expected one {name or '*.gguf'} in {folder}, "
                                           f"found {[f.name for f in files]}")
        return str(folder), files[0].name
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path.resolve().parent), path.name
    if Path(model).is_dir() and not (Path(model) / spec).is_file():
        raise ConfigError("gguf_file", f"no such file: {spec} (nor in {model})")
    return model, spec  # a file inside the local folder or hub repo ``model``


def hf_config(cfg: CausalLMConfig, vocab_size: int | None = None):
    """The transformers config of the model, without loading weights (GGUF: metadata only)."""
    from transformers import AutoConfig

    if cfg.model_config is not None:
        kw = dict(cfg.model_config)
        if vocab_size is not None:
            kw.setdefault("vocab_size", vocab_size)
        if vocab_size is not None and kw["vocab_size"] < vocab_size:
            raise ConfigError("model_config.vocab_size",
                              f"must be >= the tokenizer's {vocab_size} tokens")
        try:
            return AutoConfig.for_model(kw.pop("model_type", "llama"), **kw)
        except (ValueError, TypeError) as e:
            raise ConfigError("model_config", str(e)) from None
    if cfg.gguf_file is not None:
        folder, name = resolve_gguf(cfg.gguf_file, cfg.model)
        quick = _gguf_quick_config(Path(folder) / name)
        return quick if quick is not None else AutoConfig.from_pretrained(folder, gguf_file=name)
    if not Path(cfg.model).is_dir() and cfg.model in KNOWN_CONFIGS:
        kw = dict(KNOWN_CONFIGS[cfg.model])
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    return AutoConfig.from_pretrained(cfg.model)


_GGUF_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _gguf_quick_config(path: Path):
    """The shape fields of a local llama/mistral GGUF's config from its metadata alone
    (milliseconds; transformers' own parse reads the whole vocabulary, seconds). None when the
    file is not local, the architecture is another, or this transformers lacks the reader; the
    loaded model's shapes are checked against these when the task loads it."""
    if not path.is_file():
        return None
    try:
        from transformers import AutoConfig
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        from transformers.integrations.gguf.reader import read_gguf_metadata

        meta, tensors = read_gguf_metadata(str(path), ())
        arch = meta["general.architecture"]
        if arch not in ("llama", "mistral"):
            return None
        kw = {hf: meta[f"{arch}.{key}"] for key, hf in GGUF_CONFIG_MAPPING[arch].items()
              if hf in _GGUF_SHAPE_KEYS and f"{arch}.{key}" in meta}
        if "vocab_size" not in kw and isinstance(meta.get("tokenizer.ggml.tokens"), int):
            kw["vocab_size"] = meta["tokenizer.ggml.tokens"]
        return AutoConfig.for_model(arch, tie_word_embeddings="output.weight" not in tensors, **kw)
    except Exception:  # any surprise: take transformers' full (slow) parse instead
        return None


def meta_lora_shapes(config, targets: list[str], lora_cfg: LoRAConfig) -> dict[str, tuple[int, int]]:
    """Adapted module -> (d, k), from a weightless (meta device) copy of the peft model."""
    return pl.shapes(pl.lora_layers(meta_peft_model(config, pl.peft_config(lora_cfg, targets))))


def meta_peft_model(config, peft_cfg) -> nn.Module:
    """The decoder of ``config`` wrapped by peft's ``get_peft_model`` with ``peft_cfg`` (a
    ``LoraConfig``), on the meta device: the task's module names and shapes, no weights (its
    LoRA weights too are on the meta device). Raises ConfigError("targets") when peft finds none
    of the targets."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated property
        model = AutoModelForCausalLM.from_config(config)
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as e:
            raise ConfigError("targets", str(e).splitlines()[0]) from None


def load_codec(cfg: CausalLMConfig) -> td.HFCodec:
    """The transformers tokenizer of ``cfg``: ``cfg.tokenizer`` when it names one, else the
    model's own (a GGUF's from the same file)."""
    from transformers import AutoTokenizer

    gguf = resolve_gguf(cfg.gguf_file, cfg.model) if cfg.gguf_file else None
    source = cfg.tokenizer if cfg.tokenizer != "auto" else gguf[0] if gguf else cfg.model
    tk = {"gguf_file": gguf[1]} if gguf and cfg.tokenizer == "auto" else {}
    return td.HFCodec(AutoTokenizer.from_pretrained(source, **tk))


def load_base_model(cfg: CausalLMConfig, config, device: torch.device, seed: int) -> nn.Module:
    """The frozen decoder of ``cfg`` on ``device``, not yet wrapped in peft, without a KV cache.

    ``model_config``: random weights drawn from ``seed`` (stream ``_INIT``) through torch's
    global generator, which the caller restores; otherwise the pretrained (or GGUF) weights,
    on CUDA straight onto the GPU. bfloat16 for ``precision: bfloat16``, or ``auto`` on CUDA.
    """
    from transformers import AutoModelForCausalLM

    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and device.type == "cuda")
    kw: dict[str, Any] = {_dtype_kw(): torch.bfloat16 if bf16 else torch.float32}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    if cfg.model_config is not None:
        torch.manual_seed(int(td.stream_rng(seed, _INIT).integers(2**62)))
        model = AutoModelForCausalLM.from_config(config, **kw)
    else:
        if device.type == "cuda":  # straight onto the GPU, no CPU copy of the weights
            kw["device_map"] = {"": str(device)}
        gguf = resolve_gguf(cfg.gguf_file, cfg.model) if cfg.gguf_file else None
        source = {"pretrained_model_name_or_path": gguf[0], "gguf_file": gguf[1]} if gguf else \
            {"pretrained_model_name_or_path": cfg.model}
        model = AutoModelForCausalLM.from_pretrained(**source, **kw)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)
