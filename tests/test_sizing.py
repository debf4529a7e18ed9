"""Sizing trials for a cluster (``decaf_ray.sizing``, ``decaf-ray describe --cluster``): from the
config alone, offline; the shipped GPU sweeps fit the cluster each states in its
``# cluster:`` line."""

import contextlib
import io
from pathlib import Path

import pytest

from decaf_ray import packing, sizing
from decaf_ray.cli import main
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import load_config
from decaf_ray.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
GPU_SWEEPS = ["fig2ab", "fig2c", "fig3a", "fig3b", "fig3c", "table2", "table3", "table6-clip",
              "table6-llm", "table7-clip", "table7-llm"]
A100 = packing.parse_cluster("2x8xA100-80GB")


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------- cluster specs


def test_cluster_specs():
    assert A100.nodes == ((64.0, 8), (64.0, 8)) and A100.gpu_memory == 80e9  # 8 CPUs per GPU
    l4 = packing.parse_cluster("1x4xL4-24GB")
    assert l4.nodes == ((32.0, 4),) and l4.gpu_memory == 24e9
    assert packing.parse_cluster("1x4xl4-24gb-48CPU").nodes == ((48.0, 4),)
    assert packing.parse_cluster("3x2xH100-94.5GB").gpu_memory == 94.5e9


@pytest.mark.parametrize("spec", ["8xA100-80GB", "0x8xA100-80GB", "2x0xA100-80GB", "2x8xA100",
                                  "2x8xA100-80", "2x8xA100-0GB", "2x8xA100-80GB-0CPU", "", "big"])
def test_bad_cluster_specs_name_the_flag_and_an_example(spec):
    with pytest.raises(ConfigError) as e:
        packing.parse_cluster(spec)
    assert e.value.field == "--cluster" and "e.g. 2x8xA100-80GB" in e.value.message


def test_bad_cluster_on_the_cli_is_one_line_and_exit_2():
    code, out, err = cli("describe", ROOT / "sweeps" / "fig3c.yaml", "--cluster", "2x8xA100")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("decaf-ray: error: --cluster:") and "2x8xA100-80GB" in err


# ---------------------------------------------------------------------------- the shipped sweeps


@pytest.mark.parametrize("name", GPU_SWEEPS)
def test_every_shipped_gpu_sweep_fits_its_stated_cluster(name):
    path = ROOT / "sweeps" / f"{name}.yaml"
    assert packing.stated_cluster(path) == packing.PAPER_CLUSTER  # the file's '# cluster:' line
    cluster = packing.parse_cluster(packing.stated_cluster(path))
    sweep = load_sweep(path)
    shapes = {sizing.size_trial(sweep.config_for(p)) for p in sweep.points()}
    for trial in shapes:
        got = packing.fit(trial, cluster)
        assert got.problems == () and got.trials >= 1, (name, got)
        assert trial.device == "cuda" and trial.memory <= got.share
        assert trial.hosts <= 4  # few base-model copies per trial (fig3c: 40 agents, 4 hosts)


def test_both_base_files_state_the_cluster():
    for base in ("clip-vitb16-flowers", "llama2-7b-wic"):
        assert packing.stated_cluster(ROOT / "sweeps" / "base" / f"{base}.yaml") == packing.PAPER_CLUSTER


def test_describe_of_a_paper_sweep_works_offline_and_prints_the_memory_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli("describe", ROOT / "sweeps" / "fig3c.yaml", "--set",
                         f"task.root={tmp_path / 'no-data-here'}")  # never read: no dataset needed
    assert code == 0, err
    assert "(the file's '# cluster:' line): 3 distinct shape(s)" in out
    block = out.split("## 1 trial(s): agents,local_steps: [40, 4]")[1].splitlines()
    assert block[1:7] == ["model: CLIP ViT-B-16 (openai)",
                          "trainable params per agent: 184,320",  # the paper's, rank 2
                          "hosts: 4 (AgentHost actors); 10 agent(s) per host, 5 per forward pass",
                          "per host: 3 CPUs, 0.5 GPU",
                          "per trial: 12.01 CPUs, 2 GPUs (incl. the driver's 0.01 CPU)",
                          "base-model copies: 4"]
    assert block[7].startswith("memory per host (GPU, estimate): ")
    for part in ("weights: 0.60 GB = 149,620,737 params x 4 B", "activations:", "adapters:",
                 "cuda context: 0.50 GB"):
        assert any(line.startswith(f"  {part}") for line in block), part
    assert "trials at once: 8 (bound by GPUs)" in block
    assert "steps: 2,000 per agent (500 rounds x 4 local steps), 80,000 agent-steps (40 agent(s))" in block
    assert not (tmp_path / "no-data-here").exists()
    code, out, _ = cli("describe", ROOT / "sweeps" / "table3.yaml", "--cluster", "2x8xA100-80GB")
    assert code == 0 and "weights: 13.48 GB = 6,738,415,616 params x 2 B (bfloat16)" in out
    assert "DOES NOT FIT" not in out and out.count("memory fits:") == 3


# ---------------------------------------------------------------------------- estimates by hand

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32,
                            "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                          "layers": 2}}


def _config(task, **runtime):
    return load_config({"agents": 4, "topology": "ring", "rounds": 5, "local_steps": 3,
                        "task": task, "data": {"batch_size": 8}, "lora": {"rank": 2},
                        "optim": {"name": "adamw", "lr": 0.01}, "runtime": runtime})


def test_clip_estimate_equals_hand_computed_numbers():
    cfg = _config({"kind": "clip", "dataset": "digits", "model_config": TINY_CLIP},
                  agents_per_host=4, batch_agents=2, gpus_per_host=0.5, cpus_per_host=2)
    t = sizing.size_trial(cfg)
    parts = {p.name: p.bytes for p in t.parts}
    # A block of width w: ln_1 2w + in_proj 3w^2+3w + out_proj w^2+w + ln_2 2w + mlp 8w^2+5w
    block = 12 * 32**2 + 13 * 32
    visual = 3 * 8 * 8 * 32 + 32 + 17 * 32 + 64 + 2 * block + 64 + 32 * 16  # conv, cls, pos, ln, proj
    text = 49408 * 32 + 77 * 32 + 2 * block + 64 + 32 * 16 + 1               # tokens, pos, ln, proj, scale
    assert parts["weights"] == (visual + text) * 4  # float32 weights under bf16 autocast
    # q, k, v of 2 blocks in 2 towers: 12 modules of (32 + 32) x rank 2; adamw: 2 states + grad
    factors = 12 * 64 * 2
    assert parts["adapters"] == 4 * (factors + factors * 3) * 4
    # 2 agents per pass x [vision 2 x 8 images x (4^2 + 1) tokens x 32 + text 2 x 10 digits x 77 x 32]
    # x 48 B, plus the bf16 casts of both towers' blocks (2 B each)
    per_agent = (2 * 8 * 17 * 32 + 2 * 10 * 77 * 32) * 48
    assert parts["activations"] == 2 * per_agent + 2 * (2 * block) * 2
    assert parts["cuda context"] == 0.5e9
    assert t.memory == sum(parts.values())
    assert (t.hosts, t.host, t.cpus, t.gpus) == (1, (2.0, 0.5), 2.01, 0.5)
    assert (t.steps_per_agent, t.training_agents) == (15, 4)


def test_clip_weights_match_a_real_model():
    from decaf_ray.tasks.clip import instantiate  # a real model, not the meta-device copy

    cfg = _config({"kind": "clip", "dataset": "digits", "model_config": TINY_CLIP})
    real = sum(p.numel() for p in instantiate(TINY_CLIP).parameters())
    t = sizing.size_trial(cfg)
    assert t.device == "cpu" and {p.name: p.bytes for p in t.parts}["weights"] == real * 4
    assert "cuda context" not in {p.name for p in t.parts}  # a host without a GPU


TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}


def test_causal_lm_estimate_equals_hand_computed_numbers():
    task = {"kind": "causal_lm", "model_config": TINY_LM, "micro_batch": 4, "max_length": 32}
    cfg = _config(task, agents_per_host=2, gpus_per_host=1)
    t = sizing.size_trial(cfg)
    parts = {p.name: p.bytes for p in t.parts}
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v, o; gate, up, down; 2 RMSNorms
    params = 1000 * 64 + 2 * layer + 64 + 1000 * 64  # embeddings, layers, norm, lm_head
    assert parts["weights"] == params * 2  # bfloat16 on CUDA for precision auto
    factors = 2 * 2 * (64 + 64) * 2  # q_proj and v_proj of 2 layers, rank 2
    assert parts["adapters"] == 2 * (factors + factors * 3) * 4
    assert parts["activations"] == 2 * (4 * 32) * 64 * 56  # layers x tokens x hidden x 56 B
    assert t.hosts == 2 and t.host == (1.0, 1.0)
    eager = sizing.size_trial(load_config(cfg.to_dict(), ["task.attn_implementation=eager"]))
    extra = {p.name: p.bytes for p in eager.parts}["activations"] - parts["activations"]
    assert extra == 2 * 4 * 4 * 32**2 * 5  # layers x sequences x heads x length^2 x 5 B
    ckpt = sizing.size_trial(load_config(cfg.to_dict(), ["task.gradient_checkpointing=true"]))
    assert {p.name: p.bytes for p in ckpt.parts}["activations"] == 2 * 128 * 64 * 4 + 128 * 64 * 56
    cpu = sizing.size_trial(load_config(cfg.to_dict(), ["runtime.gpus_per_host=0"]))
    assert {p.name: p.bytes for p in cpu.parts}["weights"] == params * 4  # float32 on the CPU


def test_centralized_sizes_its_ray_train_workers():
    task = {"kind": "causal_lm", "model_config": TINY_LM, "micro_batch": 8, "max_length": 32}
    cfg = _config(task, train_workers=2, gpus_per_host=1, cpus_per_host=4)
    t = sizing.size_trial(load_config(cfg.to_dict(), ["algorithm=centralized"]))
    assert (t.placement, t.hosts, t.agents_per_host, t.training_agents) == ("train_workers", 2, 1, 1)
    assert t.bundles == [(0.01, 0.0), (4.0, 1.0), (4.0, 1.0)]
    acts = {p.name: p.bytes for p in t.parts}["activations"]
    assert acts == 2 * (4 * 32) * 64 * 56  # each worker takes half the batch of 8


def test_folding_algorithms_add_the_base_copy_s_and_the_delta():
    """fedex and flora keep W0 beside W0 + S on the device, S in host RAM, and a round's
    delta: (d k) x (4 + 4 + 4) B for float32 weights; every other part is FedAvg's."""
    syn = {"kind": "synthetic", "d": 4, "k": 8}
    base = {p.name: p.bytes for p in sizing.size_trial(load_config(
        _config(syn).to_dict(), ["algorithm=fedavg"])).parts}
    for name in ("fedex", "flora"):
        got = {p.name: p.bytes for p in sizing.size_trial(load_config(
            _config(syn).to_dict(), [f"algorithm={name}"])).parts}
        assert got.pop("folded base") == 4 * 8 * 12 and got == base


# ---------------------------------------------------------------------------- on a cluster


def test_fractional_gpus_pack_inside_one_gpu_and_hosts_inside_one_node():
    syn = {"kind": "synthetic", "d": 4, "k": 8}
    one = sizing.size_trial(_config(syn, agents_per_host=4, gpus_per_host=0.3))
    got = packing.fit(one, packing.parse_cluster("1x1xT4-16GB"))
    assert (got.trials, got.bound) == (3, "GPUs")  # 3 x 0.3 in one GPU, not 3.33
    three = sizing.size_trial(_config(syn, agents_per_host=2, gpus_per_host=1, cpus_per_host=1))
    assert three.hosts == 2
    assert packing.fit(three, packing.parse_cluster("2x1xT4-16GB")).trials == 1  # spread over nodes
    assert packing.fit(three, packing.parse_cluster("2x3xT4-16GB")).trials == 3
    cpu_bound = packing.fit(three, packing.parse_cluster("1x8xT4-16GB-5CPU"))
    assert (cpu_bound.trials, cpu_bound.bound) == (2, "CPUs")  # 2 x (0.01 + 2) <= 5 CPUs
    clip = {"kind": "clip", "dataset": "digits", "model_config": TINY_CLIP}
    own = sizing.size_trial(_config(clip, kind="inprocess", threads=2, gpus_per_host=0.5))
    assert (own.bundles, own.device) == ([(2.0, 0.5)], "cuda")  # the trial's process is its host
    assert packing.fit(own, packing.parse_cluster("1x1xT4-16GB")).trials == 2


def test_a_trial_whose_host_cannot_fit_reports_it():
    syn = {"kind": "synthetic", "d": 4, "k": 8}
    big = packing.fit(sizing.size_trial(_config(syn, cpus_per_host=100)), A100)
    assert big.trials == 0 and big.problems[0].startswith(
        "DOES NOT FIT: a host bundle of 100 CPUs, 0 GPU is larger than every node (64 CPUs, 8 GPUs)")
    eight = packing.fit(sizing.size_trial(_config(syn, agents_per_host=4, gpus_per_host=8)),
                       packing.parse_cluster("4x4xL4-24GB"))
    assert eight.trials == 0 and "8 GPU is larger than every node (32 CPUs, 4 GPUs)" in eight.problems[0]
    code, out, _ = cli("describe", ROOT / "sweeps" / "table3.yaml", "--cluster", "2x8xA100-80GB",
                       "--set", "runtime.gpus_per_host=0.25")
    assert code == 0
    assert ("DOES NOT FIT: a host needs ~44.2 GB but its GPU share is 20.0 GB (0.25 x 80 GB); "
            "raise gpus_per_host or lower batch_agents / micro batch") in out.splitlines()
    assert "trials at once: 0" in out.splitlines()
