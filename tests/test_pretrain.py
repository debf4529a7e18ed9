"""Pretraining a stand-in CLIP (``decaf_ray.pretrain``) on a tiny model and sklearn digits: it
learns, saves whole, loads into the CLIP task, caches once. No Fashion-MNIST, no download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from decaf_ray import pretrain as pt
from decaf_ray.config import ConfigError, LoRAConfig, from_dict
from decaf_ray.factors import init_factors
from decaf_ray.pretrain import (
    DEFAULT_MODEL_CONFIG,
    PretrainConfig,
    cached_path,
    checkpoint_digest,
    checkpoint_task_fields,
    cli_pretrain,
    config_hash,
    ensure_pretrained,
    load_pretrain_config,
    pretrain,
    resolve_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2}}
# 60 steps take a few seconds; scale 20 without augmentation leaves chance within them.
BASE = {"dataset": "digits", "model_config": TINY, "steps": 60, "batch_size": 32, "lr": 1e-3,
        "logit_scale": 20.0, "augment": False, "log_every": 10, "threads": 1}
QUICK = {**BASE, "steps": 3, "name": "tiny", "test_samples": 20}



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "tiny"
    return out, pretrain(load_pretrain_config(BASE), out=out, progress=False)


def _fused_state(model):
    """The CLIP task's model (split q/k/v, peft LoRA) in open_clip's fused-attention keys."""
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
             if "lora_" not in k}
    out = {}
    for key in state:
        if ".attn.q_proj." in key:
            pre, kind = key.split(".attn.q_proj.")
            out[f"{pre}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{pre}.attn.{p}_proj.{kind}"] for p in "qkv"])
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            out[key] = state[key]
    return out


# ---------------------------------------------------------------------------- training


def test_pretrain_learns_and_saves_whole(trained):
    out, result = trained
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_config.json",
                                                      "pretrain.json"]
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary left behind
    losses = [loss for _, loss in result["losses"]]
    assert [s for s, _ in result["losses"]] == list(range(10, 61, 10))
    assert losses[-1] < losses[0] - 0.3, losses
    info = json.loads((out / "pretrain.json").read_text())
    assert info["test_accuracy"] == result["test_accuracy"] > 0.2  # chance is 0.1
    assert info["steps"] == 60 and info["dataset"] == "digits" and info["n_test"] == 359
    assert info["wall_time_s"] > 0 and info["logit_scale"] == 20.0
    assert info["config"]["out"] == str(out) == result["out"]
    assert load_pretrain_config(info["config"]) == PretrainConfig(**{**BASE, "out": str(out)})
    assert info["config_hash"] == config_hash(load_pretrain_config(BASE))
    assert json.loads((out / "model_config.json").read_text()) == TINY
    from decaf_ray.tasks.clip.model import instantiate

    state = load_file(str(out / "model.safetensors"))
    fresh = instantiate(TINY)
    assert fresh.load_state_dict(state, strict=True)  # every key, every shape
    assert result["checkpoint"] == str(out / "model.safetensors")


def test_pretrain_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain(load_pretrain_config({**QUICK, "augment": True}), out=tmp_path / "o", progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_clip_task_loads_the_checkpoint(trained):
    from decaf_ray.tasks.clip import CLIPConfig, build

    out, result = trained
    fields = checkpoint_task_fields(out)
    assert fields == {"checkpoint": str(out / "model.safetensors"), "model_config": TINY}
    lora = LoRAConfig(rank=2, alpha=1.0)
    task = build(from_dict(CLIPConfig, {"dataset": "digits", "logit_scale": 20.0, **fields}),
                 lora, 0)
    loaded = _fused_state(task.materialize())
    saved = load_file(fields["checkpoint"])
    assert set(loaded) == set(saved)
    for k in saved:
        assert torch.equal(loaded[k], saved[k]), k
    scratch = build(from_dict(CLIPConfig, {"dataset": "digits", "model_config": TINY}), lora, 0)
    random = _fused_state(scratch.materialize())
    same = [k for k in saved if torch.equal(random[k], saved[k])]
    assert "token_embedding.weight" not in same and "visual.conv1.weight" not in same
    assert len(same) < len(saved) // 4, same  # only never-trained tensors (e.g. logit_scale)
    # With B = 0 the task's classifier is the pretrained one: the same test accuracy.
    zero = init_factors(task.lora_shapes(), 2, torch.Generator().manual_seed(0))
    assert task.evaluate(zero)["test_accuracy"] == pytest.approx(result["test_accuracy"],
                                                                  abs=0.01)


# ---------------------------------------------------------------------------- cache


def test_ensure_pretrained_trains_once_then_reuses(tmp_path, monkeypatch):
    calls = []
    train = pt._train
    monkeypatch.setattr(pt, "_train", lambda *a, **k: calls.append(1) or train(*a, **k))
    first = ensure_pretrained(QUICK, cache_dir=tmp_path, progress=False)
    assert first == tmp_path / "pretrained" / f"tiny-{config_hash(load_pretrain_config(QUICK))}"
    assert (first / "pretrain.json").is_file() and len(calls) == 1
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_pretrained(QUICK, cache_dir=tmp_path, progress=False) == first
    monkeypatch.setenv("DECAF_RAY_CACHE", str(tmp_path))
    # Fields that change neither weights nor accuracy share the entry; others do not.
    assert ensure_pretrained({**QUICK, "threads": 2, "out": "elsewhere"}, progress=False) == first
    assert len(calls) == 1 and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert cached_path({**QUICK, "steps": 4}) != first
    assert cached_path({**QUICK, "lr": 2e-3}) != first
    assert sorted(p.name for p in first.parent.iterdir()) == [f".{first.name}.lock", first.name]
    yaml_file = tmp_path / "tiny.yaml"
    yaml_file.write_text(yaml.safe_dump(QUICK))
    assert ensure_pretrained(str(yaml_file), progress=False) == first and len(calls) == 1


def test_ensure_pretrained_uses_an_entry_that_appears_while_it_trains(tmp_path, monkeypatch):
    """Another process finishing first: its directory wins, ours is discarded, nothing mixes."""
    final = cached_path(QUICK, tmp_path)

    def race(cfg, progress):
        final.mkdir(parents=True)
        (final / "pretrain.json").write_text('{"who": "other"}')
        return {}, {"model.safetensors": {"w": torch.zeros(2)}, "model_config.json": TINY,
                    "pretrain.json": {"who": "me"}}

    monkeypatch.setattr(pt, "_train", race)
    assert ensure_pretrained(QUICK, cache_dir=tmp_path) == final
    assert json.loads((final / "pretrain.json").read_text()) == {"who": "other"}
    assert sorted(p.name for p in final.iterdir()) == ["pretrain.json"]
    assert sorted(p.name for p in final.parent.iterdir()) == [f".{final.name}.lock", final.name]


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, at module level or inside functions."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_pretraining_shares_the_clip_package_but_not_its_task():
    """pretrain.py names only the CLIP package's model and classifier, not its task; no module
    of the package, nor the cache, nor the pretrain config imports the training (a task build
    never trains), and the last two do not name the task either."""
    package, pre = ROOT / "decaf_ray" / "tasks" / "clip", ROOT / "decaf_ray" / "pretrain.py"
    assert {m for m in _imports(pre) if m.startswith("decaf_ray.tasks.clip")} <= {
        "decaf_ray.tasks.clip", "decaf_ray.tasks.clip.classifier", "decaf_ray.tasks.clip.model"}
    shared = ROOT / "decaf_ray" / "tasks"
    for path in [*sorted(package.glob("*.py")), shared / "checkpoints.py",
                 shared / "pretrain_config.py"]:
        found = _imports(path)
        assert not {m for m in found if m.startswith("decaf_ray.pretrain")}, path.name
        if path.parent == shared:
            assert not {m for m in found if m.startswith("decaf_ray.tasks.clip.task")}, path.name


def _standin_experiment(spec: str) -> dict:
    return {"algorithm": "dlora", "agents": 2, "topology": "ring", "rounds": 1, "local_steps": 1,
            "seed": 0, "grad_norm": False,
            "task": {"kind": "clip", "dataset": "digits", "checkpoint": f"pretrain:{spec}",
                     "logit_scale": 20.0, "test_samples": 20, "augment": False},
            "data": {"partition": "iid", "shots": 4, "batch_size": 4},
            "lora": {"rank": 2, "alpha": 1.0}, "runtime": {"kind": "inprocess", "threads": 1}}


def test_a_task_build_never_trains_the_driver_resolves_the_standin(tmp_path, monkeypatch):
    """``checkpoint: pretrain:<spec>``: a build on a cache miss fails with a one-line
    ConfigError naming task.checkpoint and trains nothing; ``resolve_checkpoint`` (the driver)
    trains once and returns the concrete file, which builds; a build given the ``pretrain:``
    form then reads the same cache entry."""
    from decaf_ray.experiment_config import load_config
    from decaf_ray.tasks import build_task

    monkeypatch.setenv("DECAF_RAY_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(QUICK))
    calls = []
    train = pt._train
    monkeypatch.setattr(pt, "_train", lambda *a, **k: calls.append(1) or train(*a, **k))
    cfg = load_config(_standin_experiment(str(spec)))
    with pytest.raises(ConfigError) as e:
        build_task(cfg.task, cfg.lora, cfg.seed)
    assert e.value.field == "task.checkpoint" and "\n" not in str(e.value)
    assert "decaf-ray pretrain" in str(e.value) and "resolve_checkpoint" in str(e.value)
    assert not calls and not (tmp_path / "cache").exists()

    resolved = resolve_checkpoint(cfg, progress=False)
    entry = cached_path(QUICK)
    assert len(calls) == 1 and resolved.task.checkpoint == str(entry / "model.safetensors")
    assert resolved.task.model_config == TINY
    assert resolved.task.checkpoint.endswith(".safetensors") and cfg.task.checkpoint.startswith(
        "pretrain:")  # the input config is left as it was
    assert resolve_checkpoint(resolved) is resolved  # concrete already: unchanged
    assert resolve_checkpoint(cfg, progress=False) == resolved and len(calls) == 1  # cached
    assert load_config(resolved.to_dict()) == resolved  # what a driver ships to its hosts

    concrete = build_task(resolved.task, resolved.lora, resolved.seed)
    lazy = build_task(cfg.task, cfg.lora, cfg.seed)  # reads the cache now that it is there
    assert lazy.cfg.checkpoint == concrete.cfg.checkpoint and len(calls) == 1
    digest = checkpoint_digest(resolved.task.checkpoint)
    import hashlib

    assert digest == hashlib.sha256(Path(resolved.task.checkpoint).read_bytes()).hexdigest()
    assert len(digest) == 64

    with pytest.raises(ConfigError) as e:
        resolve_checkpoint(load_config(_standin_experiment("no-such-preset")))
    assert e.value.field == "task.checkpoint"
    with pytest.raises(ConfigError) as e:
        build_task(*[getattr(load_config(_standin_experiment("no-such-preset")), k)
                     for k in ("task", "lora", "seed")])
    assert e.value.field == "task.checkpoint"


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("change, field", [
    ({"steps": 0}, "steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": -1e-3}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"weight_decay": -1}, "weight_decay"),
    ({"logit_scale": 0}, "logit_scale"),
    ({"warmup_steps": 60}, "warmup_steps"),
    ({"dataset": "mnist"}, "dataset"),
    ({"dataset": "imagefolder"}, "root"),
    ({"prompt": "a photo"}, "prompt"),
    ({"crop_scale": [0.5, 2.0]}, "crop_scale"),
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"threads": 0}, "threads"),
    ({"name": "a/b"}, "name"),
    ({"model_config": {"embed_dim": 32, "vision_cfg": {}}}, "model_config"),
    ({"model_config": {**TINY, "text_cfg": {**TINY["text_cfg"], "vocab_size": 100}}},
     "model_config.text_cfg.vocab_size"),
    ({"stpes": 10}, "stpes"),
    ({"kind": "clip"}, "kind"),
])
def test_bad_values_raise_config_error_naming_the_field(change, field):
    with pytest.raises(ConfigError) as e:
        load_pretrain_config({**BASE, **change})
    assert e.value.field == field, str(e.value)


def test_errors_before_training_or_writing(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty") as e:
        pretrain(load_pretrain_config(QUICK), out=full)
    assert e.value.field == "out"
    with pytest.raises(ConfigError) as e:
        pretrain(load_pretrain_config(QUICK))
    assert e.value.field == "out"
    missing = {**QUICK, "dataset": "imagefolder", "root": str(tmp_path / "nope")}
    with pytest.raises(ConfigError) as e:
        pretrain(load_pretrain_config(missing), out=tmp_path / "o")
    assert e.value.field == "dataset" and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError) as e:
        checkpoint_task_fields(tmp_path)
    assert e.value.field == "checkpoint"
    with pytest.raises(ConfigError):
        ensure_pretrained("no-such-preset", cache_dir=tmp_path)


def test_shipped_config_is_the_stand_in_and_the_preset():
    """sweeps/pretrain-fmnist.yaml: 7.6M parameters, 1600 steps of 64, AdamW 1e-3; the same
    cache entry as ensure_pretrained('pretrain-fmnist'). Loads the config only (no data)."""
    from decaf_ray.tasks.clip.model import instantiate

    cfg = load_pretrain_config(ROOT / "sweeps" / "pretrain-fmnist.yaml")
    assert cfg.dataset == "fashion_mnist" and cfg.model_config == DEFAULT_MODEL_CONFIG
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.logit_scale) == (1600, 64, 1e-3, 100.0)
    assert cfg.prompt == "a photo of a {}."
    assert cached_path(cfg, "/c") == cached_path("pretrain-fmnist", "/c")
    with torch.device("meta"):
        n = sum(p.numel() for p in instantiate(cfg.model_config).parameters())
    assert 7.5e6 < n < 7.7e6
    assert load_pretrain_config(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------- CLI


def test_cli_pretrain_out_and_cache(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(QUICK))
    assert cli_pretrain(str(path), ["steps=2"], str(tmp_path / "o")) == 0
    text = capsys.readouterr().out
    assert f"checkpoint: {tmp_path / 'o' / 'model.safetensors'}" in text
    assert "test_accuracy" in text and "2 steps" in text
    monkeypatch.setenv("DECAF_RAY_CACHE", str(tmp_path / "cache"))
    assert cli_pretrain(str(path), [], None) == 0
    assert str(cached_path(QUICK)) in capsys.readouterr().out
    assert cli_pretrain(str(path), [], None) == 0
    assert "cached" in capsys.readouterr().out
    with pytest.raises(ConfigError) as e:
        cli_pretrain(str(path), ["batch_size=0"], None)
    assert e.value.field == "batch_size"
    entry = cached_path(QUICK)
    assert sorted(p.name for p in entry.parent.iterdir()) == [f".{entry.name}.lock", entry.name]
