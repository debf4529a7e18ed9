"""The real CLI in a subprocess, on tiny configs."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from decaf_ray.cli import main
from decaf_ray.results import load_adapters, load_run_config

TINY = {
    "algorithm": "decaf", "agents": 4, "topology": "ring", "rounds": 6, "local_steps": 2,
    "eval_every": 3, "seed": 1,
    "task": {"kind": "synthetic", "d": 4, "k": 8, "samples": 200, "test_samples": 100},
    "data": {"partition": "classes_per_agent", "batch_size": 8},
    "lora": {"rank": 2, "alpha": 2.0},
    "optim": {"name": "sgd", "lr": 0.3},
    "runtime": {"kind": "inprocess", "threads": 1},
}


def cli(*args):
    """``decaf-ray ARGS`` in this process (a subprocess would re-import torch each time)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_console_script_runs_in_a_subprocess(config, tmp_path):
    exe = Path(sys.executable).parent / "decaf-ray"
    res = subprocess.run([str(exe), "run", str(config), "--out", str(tmp_path / "r"), "--quiet",
                          "--set", "agents=0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr == "decaf-ray: error: agents: must be >= 1 (got 0)\n"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_run_writes_config_metrics_summary_and_adapters(config, tmp_path):
    out = tmp_path / "run"
    res = cli("run", config, "--out", out, "--quiet", "--set", "lora.rank=1")
    assert res.returncode == 0, res.stderr
    assert f"results: {out}" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 6
    df = pd.read_csv(out / "metrics.csv")
    assert list(df.columns) == ["round", "step", "agent", "metric", "value"]
    assert sorted(df["round"].unique()) == [0, 3, 6]
    cfg = load_run_config(out)
    assert cfg.lora.rank == 1 and cfg.algorithm == "decaf"
    adapters = load_adapters(out / "adapters.safetensors")
    assert sorted(adapters) == [0, 1, 2, 3]
    a, b = adapters[0]["linear"]
    assert a.shape == (1, 8) and b.shape == (4, 1)


@pytest.mark.parametrize("algorithm", ["fedex", "flora"])
def test_a_folding_run_keeps_its_base_delta_and_the_model_it_makes(config, tmp_path, algorithm):
    """A server algorithm that folds into the base weights writes S: W0 + S and an agent's
    adapter, rebuilt from the run's files alone, score what the run reported for that agent."""
    from safetensors.torch import load_file

    from decaf_ray.plan import prepare

    out = tmp_path / algorithm
    res = cli("run", config, "--out", out, "--quiet", "--set", f"algorithm={algorithm}")
    assert res.returncode == 0, res.stderr
    base = load_file(str(out / "base_delta.safetensors"))
    assert list(base) == ["linear"] and base["linear"].shape == (4, 8)
    assert base["linear"].abs().max() > 0
    task = prepare(load_run_config(out)).task
    task.load()
    task.set_base_delta(base)
    got = task.evaluate(load_adapters(out / "adapters.safetensors")[2])
    df = pd.read_csv(out / "metrics.csv")
    last = df[(df["agent"] == 2) & (df["round"] == 6)].set_index("metric")["value"]
    assert got["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert got["test_accuracy"] == pytest.approx(last["test_accuracy"])
    # an algorithm that never folds writes no base delta
    assert cli("run", config, "--out", tmp_path / "d", "--quiet").returncode == 0
    assert not (tmp_path / "d" / "base_delta.safetensors").exists()


@pytest.mark.parametrize("override, field", [
    ("lora.rank=0", "lora.rank"),
    ("agents=0", "agents"),
    ("algorithm=nope", "algorithm"),
    ("topology.name=moebius", "topology"),
    ("lora.rnak=3", "lora.rnak"),
    ("mixing=uniform", "topology"),  # placeholder replaced below
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(config, tmp_path, override, field):
    if override == "mixing=uniform":  # uniform weights on a star are not doubly stochastic
        args = ["--set", "topology.name=star", "--set", "mixing=uniform"]
        field = "mixing"
    else:
        args = ["--set", override]
    out = tmp_path / "never"
    res = cli("run", config, "--out", out, *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"decaf-ray: error: {field}")
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_impossible_partition_and_bad_matrix_file(config, tmp_path):
    res = cli("run", config, "--set", "agents=2", "--out", tmp_path / "x")
    assert res.returncode == 2 and res.stderr.startswith("decaf-ray: error: data:")
    matrix = tmp_path / "pi.csv"
    matrix.write_text("0.5,0.5,0,0\n0.5,0.5,0,0\n0,0,0.5,0.5\n0,0,0.6,0.5\n")
    res = cli("run", config, "--set", "mixing.scheme=matrix", "--set", f"mixing.matrix={matrix}",
              "--out", tmp_path / "x")
    assert res.returncode == 2 and res.stderr.startswith("decaf-ray: error: mixing:")
    assert not (tmp_path / "x").exists()
    res = cli("run", tmp_path / "missing.yaml")
    assert res.returncode == 2 and "no such config file" in res.stderr


def test_out_directory_is_never_overwritten(config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("run", config, "--out", out, "--quiet")
    assert res.returncode == 2 and "--out" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_divergence_exits_0_and_is_recorded(config, tmp_path):
    out = tmp_path / "run"
    res = cli("run", config, "--out", out, "--quiet", "--set", "optim.lr=1e9",
              "--set", "algorithm=dlora")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("diverged")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at"]["step"] >= 1


def test_describe_prints_graph_histogram_and_trainable_params(config):
    res = cli("describe", config)
    assert res.returncode == 0, res.stderr
    assert "spectral_gap: 0.666667" in res.stdout  # ring of 4, weights 1/3: eigenvalues 1, 1/3, 1/3, -1/3
    assert re.search(r"^agent +0: +\d+ +\d+ +\d+ +\d+  \(n=\d+\)$", res.stdout, re.M)
    assert "trainable_params: 24" in res.stdout  # (d + k) r = (4 + 8) * 2
    assert "floats_sent_per_round_per_agent: min 48, mean 48, max 48" in res.stdout
    res = cli("describe", config, "--set", "algorithm=dlora_fa")
    assert "trainable_params: 8" in res.stdout


def test_plot_reads_saved_runs(config, tmp_path):
    for alg in ["decaf", "local"]:
        assert cli("run", config, "--out", tmp_path / "runs" / alg, "--quiet",
                   "--set", f"algorithm={alg}").returncode == 0
    res = cli("plot", tmp_path / "runs", "--out", tmp_path / "acc.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_shipped_quickstart_describes(tmp_path):
    root = Path(__file__).resolve().parents[1]
    res = cli("describe", root / "sweeps" / "quickstart.yaml")
    assert res.returncode == 0 and "trainable_params: 84" in res.stdout


def test_describe_lists_a_sweeps_trials(tmp_path):
    root = Path(__file__).resolve().parents[1]
    res = cli("describe", root / "sweeps" / "table3.yaml")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "# sweep table3: 16 grid points x 1 samples"
    assert "  task.dataset=boolq, algorithm=decaf" in res.stdout.splitlines()


def test_a_missing_data_file_is_one_line_and_exit_2(config, tmp_path):
    root = Path(__file__).resolve().parents[1]
    res = cli("describe", root / "sweeps" / "table3-cpu.yaml", "--set",
              f"task.train_file={tmp_path / 'nowhere.jsonl'}")
    # the sweep validates configs without loading data; running a trial's config reads the file
    assert res.returncode == 0
    cfg = yaml.safe_load((root / "sweeps" / "table3-cpu.yaml").read_text())["base"]
    cfg["task"]["train_file"] = str(tmp_path / "nowhere.jsonl")
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(cfg))
    res = cli("run", tmp_path / "lm.yaml", "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "nowhere.jsonl" in res.stderr and not (tmp_path / "out").exists()


def test_describe_config_ends_with_its_resources_on_a_cluster(config):
    res = cli("describe", config, "--cluster", "1x4xL4-24GB")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.index("trainable_params: 24") < out.index(
        "# resources on 1 node(s) x 4 L4 GPUs of 24 GB, 32 CPUs each")
    tail = out.split("# resources on")[1].splitlines()[1:]
    assert tail[:6] == ["model: synthetic 4 x 8", "trainable params per agent: 24",
                        "hosts: 1 (the trial's own process (runtime.kind inprocess)); 4 agent(s) "
                        "per host, 1 per forward pass", "per host: 1 CPUs, 0 GPU",
                        "per trial: 1 CPUs, 0 GPUs", "base-model copies: 1"]
    assert "  weights: 128 B = 4 x 8 x 4 B (float32, CPU)" in tail  # synthetic W0 (d, k)
    assert "trials at once: 32 (bound by CPUs)" in tail
    assert tail[-1] == "steps: 12 per agent (6 rounds x 2 local steps), 48 agent-steps (4 agent(s))"
    res = cli("describe", config)  # no cluster: the per-trial figures only
    assert "# resources\n" in res.stdout and "trials at once" not in res.stdout
    res = cli("describe", config, "--cluster", "4xA100")
    assert res.returncode == 2 and res.stdout == "" and "--cluster" in res.stderr


@pytest.mark.ray
def test_describe_uses_the_live_cluster_at_ray_address(config, ray_session, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # Ray is already up here: describe joins it
    res = cli("describe", config, "--set", "runtime.kind=ray", "--set", "runtime.agents_per_host=2",
              "--set", "runtime.cpus_per_host=0.5")
    assert res.returncode == 0, res.stderr
    assert "# resources on the live Ray cluster (1 node(s), 2 CPUs, 0 GPUs)" in res.stdout
    # a trial asks 0.01 + 2 hosts x 0.5 CPU: one at a time on 2 CPUs
    assert "per trial: 1.01 CPUs, 0 GPUs (incl. the driver's 0.01 CPU)" in res.stdout
    assert "trials at once: 1 (bound by CPUs)" in res.stdout


def test_run_on_a_sweep_file_runs_its_base_and_says_so(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": TINY, "grid": {"algorithm": ["dlora"]}}))
    res = cli("run", sweep, "--out", tmp_path / "r", "--quiet", "--set", "rounds=3")
    assert res.returncode == 0, res.stderr
    assert "is a sweep file: running its base config (algorithm decaf)" in res.stderr
    saved = load_run_config(tmp_path / "r")
    assert saved.algorithm == "decaf" and saved.rounds == 3


def test_describe_table5_shows_the_papers_model_rank_and_trainable_params():
    root = Path(__file__).resolve().parents[1]
    res = cli("describe", root / "sweeps" / "table5.yaml")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.splitlines()[0] == "# sweep table5: 7 grid points x 1 samples"
    assert "model: meta-llama/Llama-2-7b-hf, LoRA on q_proj, v_proj" in out
    assert "trainable params per agent: 8,388,608" in out  # the paper's Table 6, rank 16
    assert "  algorithm=decaf" in out.splitlines()


def test_plot_help_names_every_figure_and_table():
    """The help is written out (importing analysis would make every command pay for
    matplotlib); this keeps it true to ``analysis.NAMES``."""
    import analysis

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["plot", "--help"])
    text = " ".join(out.getvalue().split())
    listed = set(re.findall(r"[a-z0-9_]+", text.split("--figure FIGURE")[-1].split("default:")[0]))
    assert set(analysis.NAMES) <= listed, set(analysis.NAMES) - listed
