"""``decaf-ray export``: a run's adapter as a PEFT directory that peft loads onto the same base
model with the run's own numbers (a tiny LLaMA and a tiny open_clip, each trained two rounds
through the CLI), a hub model's export without its weights, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from decaf_ray.cli import main
from decaf_ray.factors import mean
from decaf_ray.results import load_adapters, load_run_config
from decaf_ray.tasks import build_task
from decaf_ray.tasks import peft_lora as pl
from decaf_ray.tasks.step_rng import step_rng

ROOT = Path(__file__).resolve().parents[1]
WIC = ROOT / "tests" / "data" / "wic"
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
CLIP = {"embed_dim": 32,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2}}
COMMON = {"agents": 3, "topology": "ring", "rounds": 2, "local_steps": 1, "seed": 0,
          "grad_norm": False, "runtime": {"kind": "inprocess", "threads": 1}}
CAUSAL_LM = {**COMMON, "algorithm": "decaf",
             "task": {"kind": "causal_lm", "model_config": LLAMA, "dataset": "wic",
                      "train_file": str(WIC / "train_prompt.jsonl"),
                      "test_file": str(WIC / "val.jsonl"), "train_samples": 24,
                      "test_samples": 8, "max_length": 48},
             "data": {"partition": "iid", "batch_size": 4},
             "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1},
             "optim": {"name": "adam", "lr": 0.05}}
CLIP_RUN = {**COMMON, "algorithm": "dlora",
            "task": {"kind": "clip", "dataset": "digits", "model_config": CLIP, "augment": False,
                     "test_samples": 20, "targets": ["q", "v", "out"]},
            "data": {"partition": "iid", "shots": 4, "batch_size": 8},
            "lora": {"rank": 2, "alpha": 1.0, "dropout": 0.25, "scaling": "alpha/sqrt(r)"},
            "optim": {"name": "adamw", "lr": 1e-2}}


def _run(tmp: Path, cfg: dict) -> Path:
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "run.yaml"), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def _export(run: Path, agent: str, out: Path) -> Path:
    assert main(["export", str(run), "--agent", agent, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("lm"), CAUSAL_LM)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("clip"), CLIP_RUN)


def _factors(run: Path, agent: str):
    adapters = load_adapters(run / "adapters.safetensors")
    return mean(list(adapters.values())) if agent == "mean" else adapters[int(agent)]


# ---------------------------------------------------------------------------- causal LM


@pytest.mark.parametrize("agent", ["1", "mean"])
def test_causal_lm_export_loads_in_peft_with_the_runs_logits(lm_run, tmp_path, agent):
    from peft import PeftModel

    from decaf_ray.tasks.causal_lm_model import load_base_model

    out = _export(lm_run, agent, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    modes = {(out / f).stat().st_mode & 0o777 for f in ("adapter_config.json",
                                                         "adapter_model.safetensors")}
    assert len(modes) == 1  # the weights are as readable as the config
    conf = json.loads((out / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"], conf["task_type"]) == \
        (4, 8.0, 0.1, "CAUSAL_LM")
    assert sorted(conf["target_modules"]) == ["q_proj", "v_proj"]
    assert conf["base_model_name_or_path"] is None  # a random model: no name to load it by

    cfg = load_run_config(lm_run)
    task = build_task(cfg.task, cfg.lora, cfg.seed)  # the run's own model, this agent's factors
    task.materialize()
    pl.set_factors(task.layers, _factors(lm_run, agent))
    with step_rng(None, torch.device("cpu")):  # the same random base, drawn from the run's seed
        base = load_base_model(task.cfg, task.config, torch.device("cpu"), cfg.seed)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    prompts = [task.prompt_ids(1, i) for i in range(3)]
    ids = torch.tensor([p[:min(map(len, prompts))] for p in prompts])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits,
                                   task.model.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_a_hub_model_exports_without_its_weights_and_names_its_base(tmp_path):
    """A SmolLM2 run's adapter: the model is built on the meta device from the known
    architecture (nothing downloaded), and the config names the hub id to load."""
    from decaf_ray.config import LoRAConfig
    from decaf_ray.factors import init_factors
    from decaf_ray.tasks.causal_lm_model import KNOWN_CONFIGS, hf_config, meta_lora_shapes

    run = tmp_path / "run"
    run.mkdir()
    cfg = {**CAUSAL_LM, "task": {**CAUSAL_LM["task"], "model_config": None,
                                 "model": "HuggingFaceTB/SmolLM2-135M"}}
    (run / "config.json").write_text(json.dumps(cfg))
    task = load_run_config(run).task
    assert task.model in KNOWN_CONFIGS
    shapes = meta_lora_shapes(hf_config(task), task.targets, LoRAConfig(rank=4))
    f = init_factors(shapes, 4, torch.Generator().manual_seed(0))
    save_file({f"agent0/{n}/{p}": t for n, (a, b) in f.items() for p, t in (("A", a), ("B", b))},
              str(run / "adapters.safetensors"))
    out = _export(run, "0", tmp_path / "adapter")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(shapes) == 2 * 2 * 30
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight"
    assert torch.equal(saved[key], f["model.layers.3.self_attn.v_proj"][0])


def test_a_folder_model_loads_by_the_name_the_export_gives(tmp_path):
    """``base_model_name_or_path`` names the run's model folder: peft's AutoPeftModel loads
    base and adapter from the export alone, with the run's logits."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=1024, **LLAMA)
                                     ).save_pretrained(folder)
    run = tmp_path / "run"
    run.mkdir()
    task_cfg = {**CAUSAL_LM["task"], "model_config": None, "model": str(folder),
                "tokenizer": "words", "precision": "float32"}
    (run / "config.json").write_text(json.dumps({**CAUSAL_LM, "task": task_cfg}))
    cfg = load_run_config(run)
    task = build_task(cfg.task, cfg.lora, cfg.seed)
    g = torch.Generator().manual_seed(1)
    f = {n: (torch.randn(4, k, generator=g), torch.randn(d, 4, generator=g))
         for n, (d, k) in task.lora_shapes().items()}
    save_file({f"agent0/{n}/{p}": t for n, (a, b) in f.items() for p, t in (("A", a), ("B", b))},
              str(run / "adapters.safetensors"))
    out = _export(run, "0", tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(folder)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    task.materialize()
    pl.set_factors(task.layers, f)
    ids = torch.tensor([task.prompt_ids(1, 0)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits,
                                   task.model.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("agent", ["2", "mean"])
def test_clip_export_loads_onto_base_model_with_the_runs_features(clip_run, tmp_path, agent):
    from peft import PeftModel

    from decaf_ray.tasks.clip import classifier
    from decaf_ray.tasks.clip.model import base_model

    out = _export(clip_run, agent, tmp_path / "adapter")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["use_rslora"]) == (2, 1.0, True)

    cfg = load_run_config(clip_run)
    task = build_task(cfg.task, cfg.lora, cfg.seed)
    task.materialize()
    pl.set_factors(task.layers, _factors(clip_run, agent))
    task.model.eval()
    loaded = PeftModel.from_pretrained(base_model(cfg.task), str(out)).eval()
    assert set(pl.lora_layers(loaded)) == set(task.layers)
    clip = loaded.get_base_model()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img, txt = clip.encode_image(x, normalize=True), clip.encode_text(task.tokens, normalize=True)
        torch.testing.assert_close(img, task.model.encode_image(x, normalize=True), rtol=0, atol=1e-6)
        torch.testing.assert_close(txt, task.model.encode_text(task.tokens, normalize=True),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(classifier.logits(img, txt, cfg.task.logit_scale),
                                   task.logits(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- refusals


def _refused(capsys, run: Path, out: Path, field: str, *, agent: str = "mean") -> str:
    capsys.readouterr()
    assert main(["export", str(run), "--agent", agent, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {field}: " in err, err
    return err


def test_refusals_say_why_in_one_line_and_write_nothing(lm_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert "not a run directory" in _refused(capsys, tmp_path, out, "run")
    assert "0..2 or 'mean'" in _refused(capsys, lm_run, out, "--agent", agent="3")
    _refused(capsys, lm_run, out, "--agent", agent="-1")
    _refused(capsys, lm_run, out, "--agent", agent="one")

    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "config.json").write_text((lm_run / "config.json").read_text())
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    assert "(summary status: failed)" in _refused(capsys, failed, out, "run")

    edited = tmp_path / "edited"
    edited.mkdir()
    cfg = json.loads((lm_run / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**cfg, "lora": {**cfg["lora"], "rank": 8}}))
    (edited / "adapters.safetensors").write_bytes((lm_run / "adapters.safetensors").read_bytes())
    assert "does not fit the run's model" in _refused(capsys, edited, out, "run")

    for name in ("fedex", "flora"):  # the model is W0 + S + s B A: no adapter alone is it
        folded = tmp_path / name
        folded.mkdir()
        cfg = json.loads((lm_run / "config.json").read_text())
        (folded / "config.json").write_text(json.dumps({**cfg, "algorithm": name}))
        (folded / "adapters.safetensors").write_bytes(
            (lm_run / "adapters.safetensors").read_bytes())
        err = _refused(capsys, folded, out, "run")
        assert f"{name} folds its server averages into the base weights" in err

    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    (synthetic / "config.json").write_text(json.dumps({"task": {"kind": "synthetic"}}))
    assert "no model to adapt" in _refused(capsys, synthetic, out, "run")
    assert not out.exists()

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    assert "not an empty directory" in _refused(capsys, lm_run, full, "--out")
    assert [p.name for p in full.iterdir()] == ["x"]
    assert "cannot write it" in _refused(capsys, lm_run, full / "x" / "adapter", "--out")
