"""Sweeps: validation at the edge, Tune trials, failures recorded, Ctrl-C then --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import analysis
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import load_config
from decaf_ray.experiment import run
from decaf_ray.sweep import load_sweep, param_space

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "agents": 4, "topology": "ring", "rounds": 12, "local_steps": 2, "eval_every": 3,
    "task": {"kind": "synthetic", "d": 4, "k": 8, "samples": 200, "test_samples": 100},
    "data": {"partition": "classes_per_agent", "batch_size": 8},
    "lora": {"rank": 2, "alpha": 2.0}, "optim": {"name": "sgd", "lr": 0.3},
    "runtime": {"kind": "inprocess", "threads": 1},
}


def write(tmp_path, grid, **extra):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": BASE, "grid": grid, **extra}))
    return path


def test_grid_points_and_spaces(tmp_path):
    sweep = load_sweep(write(tmp_path, {"algorithm": ["decaf", "dlora"], "lora.rank": [1, 2],
                                        "optim.lr": {"loguniform": [1e-3, 1e-1]}}))
    assert len(sweep.points()) == 4
    assert sweep.config_for({"lora.rank": 1, "algorithm": "dlora"}).lora.rank == 1
    space = param_space(sweep)
    assert set(space) == {"algorithm", "lora.rank", "optim.lr"}


@pytest.mark.parametrize("grid, field", [
    ({"lora.rank": [1, 0]}, "lora.rank"),
    ({"algorithm": ["decaf", "nope"]}, "algorithm"),
    ({"lora.rnak": [1]}, "lora.rnak"),
    ({"seed": []}, "grid.seed"),
    ({"seed": {"gaussian": [0, 1]}}, "grid.seed"),
])
def test_every_grid_point_is_validated_before_anything_runs(tmp_path, grid, field):
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, grid))
    assert field in str(e.value)


def test_resume_compares_the_sweep_as_given_with_a_standin_resolved_or_not(tmp_path):
    """A stand-in named ``pretrain:<spec>`` is resolved to this machine's cache path when the
    sweep runs; the record keeps the sweep as given, and a record an older decaf-ray wrote with
    the path in it still matches, so ``--resume`` of a stand-in sweep needs no ``--force``."""
    import dataclasses

    from decaf_ray.sweep import RECORD, _plain, _same_as_recorded

    sweep = load_sweep(write(tmp_path, {"seed": [0, 1]}))

    def named(checkpoint):
        return dataclasses.replace(sweep, base={**sweep.base, "task": {
            **sweep.base["task"], "checkpoint": checkpoint}})

    given, resolved = named("pretrain:pretrain-fmnist"), named("/cache/x/model.safetensors")
    for recorded in (given, resolved):
        (tmp_path / RECORD).write_text(json.dumps(_plain(recorded)))
        _same_as_recorded(given, resolved, str(tmp_path), force=False)
    (tmp_path / RECORD).write_text(json.dumps(_plain(named("pretrain:other"))))
    with pytest.raises(ConfigError) as e:
        _same_as_recorded(given, resolved, str(tmp_path), force=False)
    assert "base.task.checkpoint: 'pretrain:other' -> 'pretrain:pretrain-fmnist'" in str(e.value)
    _same_as_recorded(given, resolved, str(tmp_path), force=True)
    # before Ray starts (nothing resolved yet): a difference outside the task's weights is
    # refused there; one in them waits for the resolved sweep, since an old record holds a path
    (tmp_path / RECORD).write_text(json.dumps(_plain(resolved)))
    _same_as_recorded(given, None, str(tmp_path), force=False)
    (tmp_path / RECORD).write_text(json.dumps(_plain(dataclasses.replace(
        given, base={**given.base, "rounds": 99}))))
    with pytest.raises(ConfigError) as e:
        _same_as_recorded(given, None, str(tmp_path), force=False)
    assert "base.rounds: 99 ->" in str(e.value)


def test_every_shipped_sweep_loads():
    files = sorted((ROOT / "sweeps").glob("*.yaml")) + sorted((ROOT / "sweeps").glob("*/*.yaml"))
    assert len(files) > 10
    for f in files:
        data = yaml.safe_load(f.read_text())
        if "grid" in data:
            load_sweep(f)
        elif "task" in data:
            load_config(f)


def _sweep_cli(*args, **kw):
    return subprocess.Popen([str(Path(sys.executable).parent / "decaf-ray"), "sweep", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_runtime_trials_and_centralized_through_ray_train(tmp_path):
    # Each trial's hosts live in its placement group; Centralized's Ray Train workers place
    # themselves. Both must finish on a 2-CPU machine, with the numbers of in-process runs.
    path = write(tmp_path, {"algorithm": ["centralized", "decaf"],
                            "runtime.kind,runtime.agents_per_host,runtime.cpus_per_host":
                                [["ray", 2, 0.5]]})
    proc = _sweep_cli(path, "--storage", tmp_path / "out", "--max-concurrent", "1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "2 trials, 0 failed" in out, out[-3000:]
    df = analysis.load(tmp_path / "out")
    for alg in ("centralized", "decaf"):
        ref = run(load_config({**BASE, "algorithm": alg}), progress=False)
        got = df[(df["algorithm"] == alg) & (df["agent"] == -1) & (df["metric"] == "test_loss")]
        want = [r["value"] for r in ref.rows if r["agent"] == -1 and r["metric"] == "test_loss"]
        assert got.sort_values("round")["value"].tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_failed_and_diverged_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    path = write(tmp_path, {"optim.lr": [0.3, 1e9], "agents": [4, 3]})  # agents 3: no partition
    proc = _sweep_cli(path, "--storage", tmp_path / "out")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "4 trials, 2 failed" in out
    df = analysis.load(tmp_path / "out" / "t")
    status = df.groupby(["optim.lr", "agents"])["status"].first().to_dict()
    assert status[(0.3, 4)] == "completed" and status[(1e9, 4)] == "diverged"
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "out" / "t").rglob("summary.json")]
    failed = [s for s in summaries if s["status"] == "failed"]
    assert len(failed) == 2 and all("classes" in s["error"] for s in failed)


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path):
    # trial 0 is short; trial 1 is long and is interrupted after its first checkpoint
    path = write(tmp_path, {"rounds": [6, 300]}, checkpoint_every=20, max_concurrent=1)
    store = tmp_path / "out"
    proc = _sweep_cli(path, "--storage", store, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        long_trial = [p for p in (store / "t").glob("trial_*rounds=300*")] if (store / "t").exists() else []
        if long_trial and list(long_trial[0].glob("checkpoint_*")):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the long trial never checkpointed")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "1 interrupted" in out and "--resume" in out, out[-3000:]
    short = next((store / "t").glob("trial_*rounds=6_*"))
    done_before = (short / "summary.json").stat().st_mtime
    assert not (long_trial[0] / "summary.json").exists()

    changed = _sweep_cli(path, "--storage", store, "--resume", "--set", "lora.rank=3")
    out, _ = changed.communicate(timeout=300)
    assert changed.returncode == 2 and "base.lora.rank: 2 -> 3" in out, out[-3000:]

    resumed = _sweep_cli(path, "--storage", store, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert (short / "summary.json").stat().st_mtime == done_before  # not redone
    # the long trial continued from its checkpoint and ends with the uninterrupted numbers
    records = [json.loads(line) for line in (long_trial[0] / "result.json").read_text().splitlines()]
    restarts = [r for r in records if r["iterations_since_restore"] == 1]
    assert len(restarts) == 2 and restarts[1]["round"] > 0
    ref = run(load_config({**BASE, "rounds": 300}), progress=False)
    got = analysis.load(long_trial[0])
    assert got["value"].tolist() == pytest.approx([r["value"] for r in ref.rows], rel=0, abs=0)


@pytest.mark.ray
@pytest.mark.slow
def test_trials_read_relative_data_paths_from_the_jobs_directory(tmp_path):
    """Tune starts a trial in its own folder; a config's relative data paths (here the instruct
    task's records and benchmark folder, relative to the project root) must still resolve, and
    the trial's run folder gets the benchmarks' generations."""
    data = "tests/data/instruct"
    base = {**BASE, "agents": 2, "rounds": 2, "local_steps": 1, "eval_every": 1,
            "task": {"kind": "instruct", "train_file": f"{data}/alpaca_en_demo.json",
                     "eval_dir": data, "benchmarks": ["advbench"], "bench_samples": 2,
                     "max_new_tokens": 4, "max_length": 64,
                     "model_config": {"hidden_size": 16, "intermediate_size": 32,
                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "num_key_value_heads": 1}},
            "data": {"partition": "iid", "batch_size": 2}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "rel", "base": base, "grid": {"seed": [0]}}))
    proc = _sweep_cli(path, "--storage", tmp_path / "out", cwd=ROOT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "1 trials, 0 failed" in out, out[-3000:]
    gens = list((tmp_path / "out" / "rel").rglob("generations.jsonl"))
    assert len(gens) == 1 and len(gens[0].read_text().splitlines()) == 2 * 2
