"""The CLIP task on a tiny random-init open_clip model: split attention, the paper's parameter
counts, the peft bridge, gradients, a short decentralised run, and the data loaders. No download."""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from decaf_ray.config import ConfigError, LoRAConfig, from_dict
from decaf_ray.experiment_config import load_config
from decaf_ray.factors import init_factors, param_count
from decaf_ray.tasks import build_task, peft_lora
from decaf_ray.tasks.clip import CLIPConfig, SplitAttention, build, instantiate

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ("daisy", "dandelion", "rose", "sunflower", "tulip")
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2}}
LORA = LoRAConfig(rank=2, alpha=1.0, dropout=0.25)



def make(lora: LoRAConfig = LORA, **task):
    spec = {"dataset": "digits", "model_config": TINY, "test_samples": 50, **task}
    return build(from_dict(CLIPConfig, spec), lora, 0)


@pytest.fixture(scope="module")
def task():
    return make()


def random_factors(task, rank=2, seed=1, scale=0.3):
    """Nonzero A and B, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, k, generator=g) * scale, torch.randn(d, rank, generator=g) * scale)
            for n, (d, k) in task.lora_shapes().items()}


# ---------------------------------------------------------------------------- attention


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitAttention(mha)
    n, length = 3, 5
    x = torch.randn((n, length, 16) if batch_first else (length, n, 16))
    causal = torch.full((length, length), float("-inf")).triu(1)
    masks = [None, causal, causal != 0, torch.randn(n * 4, length, length)]
    for mask in masks:
        for need in (False, True):
            ref, ref_w = mha(x, x, x, need_weights=need, attn_mask=mask)
            out, w = split(x, x, x, need_weights=need, attn_mask=mask)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            if need:
                torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[:, -1] = True
    ref, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(split(x, x, x, key_padding_mask=pad, need_weights=False)[0], ref,
                               atol=1e-5, rtol=1e-5)


def test_split_model_outputs_unchanged(task):
    """The task's model (split q/k/v, LoRA with B = 0) computes what open_clip's fused one does."""
    torch.manual_seed(0)
    fused = instantiate(TINY).eval()
    model = task.materialize()
    fused.load_state_dict(_fused_state(model))
    shapes = task.lora_shapes()
    peft_lora.set_factors(task.layers, init_factors(shapes, 2, torch.Generator().manual_seed(0)))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), fused.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(task.tokens), fused.encode_text(task.tokens),
                                   atol=1e-5, rtol=1e-5)


def _fused_state(model):
    """The split, LoRA-wrapped model's base weights in open_clip's fused-attention keys."""
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    out = {}
    for key in list(state):
        if ".attn.q_proj." in key:
            pre, kind = key.split(".attn.q_proj.")
            parts = [state[f"{pre}.attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{pre}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            out[key] = state[key]
    return out


# ---------------------------------------------------------------------------- shapes


def test_vit_b16_trainable_params_match_the_paper():
    """Tables 6 and 7: 92,160 (r=1) and 184,320 (r=2) for ViT-B/16, q, k, v, both encoders.
    The shapes come from a meta-device model: no weights made, nothing downloaded."""
    for rank, expected in ((1, 92_160), (2, 184_320)):
        task = build_task(from_dict(CLIPConfig, {"dataset": "digits", "model": "ViT-B-16",
                                                 "pretrained": "openai"}), LoRAConfig(rank=rank), 0)
        shapes = task.lora_shapes()
        assert task.model is None
        assert len(shapes) == 2 * 12 * 3
        assert param_count(shapes, rank) == expected
    assert shapes["visual.transformer.resblocks.0.attn.q_proj"] == (768, 768)
    assert shapes["transformer.resblocks.11.attn.v_proj"] == (512, 512)
    vision_only = make(model_config=None, model="ViT-B-16", encoders=["vision"], blocks=[-1],
                       targets=["q", "out", "mlp"]).lora_shapes()
    assert list(vision_only) == [f"visual.transformer.resblocks.11.{m}" for m in
                                 ("attn.q_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")]
    assert vision_only["visual.transformer.resblocks.11.mlp.c_fc"] == (3072, 768)


# ---------------------------------------------------------------------------- peft bridge


def test_factors_round_trip_and_merge_equals_adapter():
    task = make()
    model = task.materialize()
    factors = random_factors(task)
    peft_lora.set_factors(task.layers, factors)
    back = peft_lora.get_factors(task.layers)
    for name, (a, b) in factors.items():
        assert torch.equal(back[name][0], a) and torch.equal(back[name][1], b)
    x = task.preprocess.batch(task.data.test, np.arange(6), train=False)
    model.eval()
    with torch.no_grad():
        adapted = task.logits(x)
    bases = {n: layer.base_layer.weight.detach().clone() for n, layer in task.layers.items()}
    for name, layer in task.layers.items():
        a, b = factors[name]
        delta = LORA.scale * b @ a
        torch.testing.assert_close(peft_lora.merged_delta(layer), delta)
        torch.testing.assert_close(layer.get_delta_weight(peft_lora.ADAPTER), delta)
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, bases[name] + delta)
    with torch.no_grad():
        merged = task.logits(x)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-5)
    plain = make()
    plain.materialize()
    peft_lora.set_factors(plain.layers, init_factors(task.lora_shapes(), 2, torch.Generator()))
    with torch.no_grad():
        assert not torch.allclose(plain.logits(x), adapted, atol=1e-3)  # the adapter mattered


def test_gradients(task):
    idx = np.arange(8)
    zero_b = init_factors(task.lora_shapes(), 2, torch.Generator().manual_seed(0))
    loss, grads = task.loss_and_grads(zero_b, idx, True, 0)
    assert np.isfinite(loss)
    assert all(torch.equal(ga, torch.zeros_like(ga)) for ga, _ in grads.values())
    assert any(gb.abs().sum() > 0 for _, gb in grads.values())
    factors = random_factors(task)
    _, grads = task.loss_and_grads(factors, idx, False, 0)
    assert all(ga is None for ga, _ in grads.values())
    for name, (ga, gb) in task.loss_and_grads(factors, idx, True, 0)[1].items():
        assert ga.shape == factors[name][0].shape and gb.shape == factors[name][1].shape
        assert ga.dtype == torch.float32 and ga.abs().sum() > 0
    # Same step seed -> same dropout and crops, whatever the global generator holds.
    torch.manual_seed(1)
    one = task.loss_and_grads(factors, idx, True, 7)
    torch.manual_seed(2)
    two = task.loss_and_grads(factors, idx, True, 7)
    assert one[0] == two[0] and all(torch.equal(one[1][n][1], two[1][n][1]) for n in factors)
    assert task.loss_and_grads(factors, idx, True, 8)[0] != one[0]


def test_a_step_leaves_the_global_rng_alone(task):
    """Augmentation and dropout draw from the step's seed; the caller's generator is as it was,
    after a single step and after a batched one."""
    factors, idx = random_factors(task), np.arange(8)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    task.loss_and_grads(factors, idx, True, 3)
    assert torch.equal(torch.get_rng_state(), state)
    task.loss_and_grads_many([factors, factors], [idx, idx + 8], True, [3, 4])
    assert torch.equal(torch.get_rng_state(), state)
    # On the CPU the stream is the one the step's seed starts in torch's default generator:
    # the numbers of a runtime that seeded the global generator before each step.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(3)
        ref = task._loss_and_grads(factors, idx, True)
    assert ref[0] == task.loss_and_grads(factors, idx, True, 3)[0]


def test_micro_batches_give_the_same_gradient():
    """Without dropout and augmentation (whose draws depend on the chunking)."""
    whole = make(LoRAConfig(rank=2, alpha=1.0), augment=False)
    chunked = copy.copy(whole)
    chunked.cfg = from_dict(CLIPConfig, {**_cfg_dict(whole.cfg), "micro_batch": 3})
    factors, idx = random_factors(whole), np.arange(8)
    la, ga = whole.loss_and_grads(factors, idx, True, 0)
    lb, gb = chunked.loss_and_grads(factors, idx, True, 0)
    assert lb == pytest.approx(la, rel=1e-5)
    for n in factors:
        torch.testing.assert_close(gb[n][0], ga[n][0], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(gb[n][1], ga[n][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("train_A, sizes", [(True, (8, 8, 8)), (False, (8, 5, 3))])
def test_batched_step_equals_one_agent_at_a_time(task, train_A, sizes):
    """Several agents in one pass (runtime.batch_agents): each gets the loss and gradient of its
    own pass, with augmentation and LoRA dropout on, equal and unequal batch sizes."""
    factors = [random_factors(task, seed=s) for s in (1, 2, 3)]
    starts = np.cumsum((0,) + sizes)
    indices = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    seeds = [11, 12, 13]
    many = task.loss_and_grads_many(factors, indices, train_A, seeds)
    assert len(many) == 3
    for f, idx, seed, (loss, grads) in zip(factors, indices, seeds, many):
        ref_loss, ref = task.loss_and_grads(f, idx, train_A, seed)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for n, (ga, gb) in ref.items():
            torch.testing.assert_close(grads[n][1], gb, atol=1e-6, rtol=1e-4)
            if train_A:
                torch.testing.assert_close(grads[n][0], ga, atol=1e-6, rtol=1e-4)
            else:
                assert grads[n][0] is None
    # An agent's draws are its own: the same with a different companion.
    pair = task.loss_and_grads_many([factors[0], factors[2]], [indices[0], indices[2]], train_A,
                                    [seeds[0], seeds[2]])
    assert pair[0][0] == pytest.approx(many[0][0], rel=1e-6)
    # The peft layers are left as they were: a plain step afterwards still uses them.
    assert not any(m.disable_adapters for m in task.layers.values())


def test_batched_step_needs_the_rows_it_was_told():
    from decaf_ray.tasks.stacked_lora import StackedLoRA

    task = make()
    task.materialize()
    with StackedLoRA(task.layers, [random_factors(task)] * 2, True) as lora:
        lora.rows = [3, 3]
        with pytest.raises(RuntimeError, match="rows"):
            task.model.encode_image(torch.zeros(5, 3, 16, 16))


def _cfg_dict(cfg):
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_evaluate(task):
    metrics = task.evaluate(random_factors(task))
    assert set(metrics) == {"test_loss", "test_accuracy"}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert len(task.test_labels) == 50 and task.num_classes == 10


# ---------------------------------------------------------------------------- experiments


def experiment(algorithm: str) -> dict:
    return {"algorithm": algorithm, "agents": 3, "topology": "ring", "rounds": 6,
            "local_steps": 2, "eval_every": 3, "seed": 0, "grad_norm": False,
            "task": {"kind": "clip", "dataset": "digits", "model_config": TINY, "augment": False,
                     "test_samples": 50},
            "data": {"partition": "iid", "shots": 20, "batch_size": 16},
            "lora": {"rank": 2, "alpha": 1.0, "dropout": 0.25},
            "optim": {"name": "adamw", "lr": 1e-2},
            "runtime": {"kind": "inprocess", "threads": 1}}


def network(rows, metric):
    return [r["value"] for r in rows if r["agent"] == -1 and r["metric"] == metric]


@pytest.mark.parametrize("algorithm", ["decaf", "dlora"])
def test_training_lowers_the_loss_and_is_deterministic(algorithm):
    from decaf_ray.experiment import run
    from decaf_ray.plan import prepare

    cfg = load_config(experiment(algorithm))
    first = run(cfg, progress=False)
    assert first.status == "completed"
    train = network(first.rows, "train_loss")
    assert len(train) == 2 and train[-1] < train[0]
    assert network(first.rows, "test_loss")[-1] < network(first.rows, "test_loss")[0]
    again = run(cfg, progress=False, plan=prepare(cfg))  # a fresh task: same seeded weights
    assert again.rows == first.rows


def test_batched_agents_train_as_one_at_a_time():
    """runtime.batch_agents: the same run, the agents of each host in one pass per step."""
    from decaf_ray.experiment import run

    base = experiment("decaf")
    base["task"]["augment"] = True
    one = run(load_config({**base, "runtime": {**base["runtime"], "agents_per_host": 3}}),
              progress=False)
    batched = run(load_config({**base, "runtime": {**base["runtime"], "agents_per_host": 3,
                                                   "batch_agents": 3}}), progress=False)
    assert batched.status == one.status == "completed"
    assert [r["metric"] for r in batched.rows] == [r["metric"] for r in one.rows]
    np.testing.assert_allclose([r["value"] for r in batched.rows],
                               [r["value"] for r in one.rows], rtol=1e-4, atol=1e-6)


def test_a_restored_group_replays_exactly_whenever_the_model_loads():
    """Replay and resume: a fresh host whose model loads inside the first step after a restore
    gives the uninterrupted group's numbers (its model loaded long before), whatever the global
    generator holds; ``load`` changes no number."""
    from decaf_ray.agents import AgentGroup
    from decaf_ray.plan import prepare
    from decaf_ray.optim import build_optimizer

    spec = experiment("dlora")
    spec["task"]["augment"] = True
    cfg = load_config(spec)
    plan = prepare(cfg)

    def group(task):
        return AgentGroup.build(cfg, task, plan.algorithm,
                                build_optimizer(cfg.optim, cfg.total_steps),
                                dict(enumerate(plan.shards)))

    plan.task.load()
    whole = group(plan.task)
    for t in (1, 2):
        whole.local_step(t)
    snapshot = copy.deepcopy(whole.snapshot())
    for t in (3, 4):
        whole.local_step(t)
    fresh = prepare(cfg).task
    assert fresh.model is None
    resumed = group(fresh)
    resumed.restore(snapshot)
    torch.manual_seed(99)
    for t in (3, 4):
        resumed.local_step(t)  # the model loads inside the first of these
    for aid, agent in whole.agents.items():
        assert resumed.agents[aid].losses == agent.losses
        for n, (a, b) in agent.factors.items():
            assert torch.equal(resumed.agents[aid].factors[n][0], a)
            assert torch.equal(resumed.agents[aid].factors[n][1], b)


def test_batched_agents_refuse_micro_batches():
    from decaf_ray.plan import prepare

    spec = experiment("decaf")
    spec["task"]["micro_batch"] = 4
    spec["runtime"] = {**spec["runtime"], "agents_per_host": 3, "batch_agents": 3}
    with pytest.raises(ConfigError, match="micro_batch") as e:
        prepare(load_config(spec))
    assert e.value.field == "runtime.batch_agents"


def test_sweep_config_loads_and_describes():
    from decaf_ray.cli import main

    path = ROOT / "sweeps" / "clip-tiny-digits.yaml"
    cfg = load_config(path)
    assert cfg.task.kind == "clip" and cfg.agents == 10 and cfg.lora.rank == 2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["describe", str(path)]) == 0
    text = out.getvalue()
    assert "trainable_params: 2304" in text and "(n=40)" in text


# ---------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def flowers5(tmp_path_factory):
    """A tiny ImageFolder tree: 5 flower classes of 4 to 6 seeded-noise 24x24 JPEGs each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("flowers5")
    rng = np.random.default_rng(0)
    for c, name in enumerate(FLOWERS):
        (root / name).mkdir()
        for i in range(4 + c % 3):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.jpg")
    return root


def test_image_folder_flowers5(flowers5):
    task = make(dataset="imagefolder", root=str(flowers5), max_per_class=3, test_fraction=0.34,
                test_samples=None, cache_mb=16)
    assert task.class_names == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert np.bincount(task.train_labels).tolist() == [2] * 5
    assert np.bincount(task.test_labels).tolist() == [1] * 5
    x = task.preprocess.batch(task.data.train, np.arange(4), train=True)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    loss, _ = task.loss_and_grads(random_factors(task), np.arange(10), True, 0)
    assert np.isfinite(loss)
    assert set(task.evaluate(random_factors(task))) == {"test_loss", "test_accuracy"}
    same = make(dataset="imagefolder", root=str(flowers5), max_per_class=3, test_fraction=0.34)
    assert same.data.train.paths == task.data.train.paths  # the split is seeded


def test_coop_split_file_and_ucf101_names(flowers5, tmp_path):
    import json

    from decaf_ray.tasks.image_data import ucf101_name

    assert ucf101_name("Apply_Eye_Makeup") == ucf101_name("ApplyEyeMakeup") == "Apply Eye Makeup"
    files = {c: sorted(p.name for p in (flowers5 / c).iterdir())[:3] for c in ("rose", "tulip")}
    rows = [[f"{c}/{f}", i, f"{c}_flower"] for i, c in enumerate(files) for f in files[c]]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": rows[:2] + rows[3:5], "val": [], "test": [rows[2], rows[5]]}))
    task = make(dataset="imagefolder", root=str(flowers5), split_file=str(split), test_samples=None)
    assert task.class_names == ["rose flower", "tulip flower"]
    assert task.train_labels.tolist() == [0, 0, 1, 1] and task.test_labels.tolist() == [0, 1]
    assert task.prompts[1] == "a photo of a tulip flower."


def test_food101_files_and_labels_through_torchvisions_public_loader(tmp_path):
    """flowers102 and food101 read their files and labels through torchvision's public interface
    (``loader=str``: an item is (path, label)), checked here on a Food-101 layout written by the
    test (meta/<split>.json and the image folder; nothing is decoded, nothing downloaded)."""
    import json

    base = tmp_path / "food-101"
    (base / "images").mkdir(parents=True)
    (base / "meta").mkdir()
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"],
                      "baby_back_ribs": ["baby_back_ribs/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "baby_back_ribs": ["baby_back_ribs/5"]}}
    for split, rows in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(rows))
    task = make(dataset="food101", root=str(tmp_path), download=False, test_samples=None)
    assert task.class_names == ["apple pie", "baby back ribs"]
    images = base / "images"
    assert task.data.train.paths == [str(images / "apple_pie" / "1.jpg"),
                                     str(images / "apple_pie" / "2.jpg"),
                                     str(images / "baby_back_ribs" / "3.jpg")]
    assert task.train_labels.tolist() == [0, 0, 1] and task.test_labels.tolist() == [0, 1]
    assert task.data.test.paths[1] == str(images / "baby_back_ribs" / "5.jpg")


def _idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("t10k", 20)):
        _idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    task = make(dataset="fashion_mnist", root=str(tmp_path), download=False, test_samples=None)
    assert task.class_names[0] == "T-shirt/top" and len(task.class_names) == 10
    assert len(task.train_labels) == 30 and len(task.test_labels) == 20
    assert task.data.train.get(0).shape == (3, 28, 28)
    pooled = make(dataset="fashion_mnist", root=str(tmp_path), split="random", test_fraction=0.2,
                  download=False, test_samples=None)
    assert len(pooled.train_labels) == 40 and len(pooled.test_labels) == 10


def test_checkpoint_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = instantiate(TINY).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    task = make(checkpoint=str(path), init_seed=99)
    model = task.materialize()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), atol=1e-5, rtol=1e-5)


def test_config_errors():
    bad = [({"targets": ["q", "x"]}, "targets"), ({"encoders": []}, "encoders"),
           ({"prompt": "no slot"}, "prompt"), ({"dataset": "imagefolder"}, "root"),
           ({"pretrained": "openai"}, "pretrained"), ({"crop_scale": [0.5, 0.1]}, "crop_scale"),
           ({"split": "official"}, "split"), ({"dataset": "mnist"}, "dataset"),
           ({"precision": "bf16"}, "precision"), ({"precision": "fp32"}, "precision")]
    for change, field in bad:
        with pytest.raises(ConfigError) as e:
            from_dict(CLIPConfig, {"dataset": "digits", "model_config": TINY, **change})
        assert e.value.field == field
    with pytest.raises(ConfigError, match="valid: auto, float32, bfloat16"):
        from_dict(CLIPConfig, {"dataset": "digits", "precision": "bf16"})
    with pytest.raises(ConfigError, match="dataset"):
        from_dict(CLIPConfig, {})
    with pytest.raises(ConfigError, match="task.model"):
        build(from_dict(CLIPConfig, {"dataset": "digits", "model": "ViT-Nope"}), LORA, 0)
    with pytest.raises(ConfigError, match="task.blocks"):
        make(blocks=[5])
    with pytest.raises(ConfigError, match="task.pretrained"):
        build(from_dict(CLIPConfig, {"dataset": "digits", "pretrained": "nope"}), LORA, 0)
