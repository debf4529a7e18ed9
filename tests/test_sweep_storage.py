"""Sweep results that survive any node: trials on a worker node upload their run directories to
the sweep's storage (a ``file://`` URI here, not the trials' local folders); storage URIs, the
"already holds a sweep" refusal and ``--resume`` through pyarrow; sweeps that cannot fit fail fast.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import analysis
import test_sweep
from test_ray_cluster import _env
from decaf_ray.config import ConfigError
from decaf_ray.sweep import load_sweep
from decaf_ray.sweep_resources import check_fits, trial_config, trial_resources
from decaf_ray.sweep_storage import holds_anything, location, sweep_location

ROOT = Path(__file__).resolve().parents[1]
BASE = {**test_sweep.BASE, "rounds": 6}

# The head has no CPU, so every trial runs on the worker node; the driver (this script) is on
# the head. Storage is a file:// URI of a folder no trial writes to directly.
WORKER_NODE_SWEEP = textwrap.dedent("""
    import json, os, sys, ray
    from ray.cluster_utils import Cluster
    from decaf_ray.config import ConfigError
    from decaf_ray.sweep import load_sweep, run_sweep

    sweep_file, store = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2, num_gpus=1)  # a fake GPU: Ray assigns it, torch sees none
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        facts = {}
        try:  # one in-process trial asking 2 GPUs: the worker node has 1
            run_sweep(load_sweep(sweep_file, ["runtime.gpus_per_host=2"]), store)
        except ConfigError as e:
            facts["too_big"] = str(e)
        sweep = load_sweep(sweep_file)
        grid = run_sweep(sweep, store)
        facts.update(trials=len(grid), errors=[str(r.error) for r in grid if r.error],
                     paths=sorted(r.path for r in grid))
        try:
            run_sweep(sweep, store)
        except ConfigError as e:
            facts["again"] = str(e)
        stamps = {p: os.stat(os.path.join(p, "summary.json")).st_mtime_ns
                  for p in facts["paths"]}
        resumed = run_sweep(sweep, store, resume=True)
        facts["resumed_errors"] = [str(r.error) for r in resumed if r.error]
        facts["redone"] = [p for p in facts["paths"]
                           if os.stat(os.path.join(p, "summary.json")).st_mtime_ns != stamps[p]]
        print(json.dumps(facts))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.ray
@pytest.mark.slow
def test_trials_on_a_worker_node_put_their_run_directories_in_uri_storage(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    base = {**BASE, "runtime": {"kind": "inprocess", "threads": 1, "gpus_per_host": 0.5}}
    sweep_file.write_text(yaml.safe_dump({"name": "remote", "base": base,
                                          "grid": {"algorithm": ["decaf", "dlora"]}}))
    store = tmp_path / "store"
    uri = f"file://{store}"
    res = subprocess.run([sys.executable, "-c", WORKER_NODE_SWEEP, str(sweep_file), uri],
                         env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    # fail fast against the live cluster, before anything is written
    assert facts["too_big"].startswith("runtime.gpus_per_host: an in-process trial of 1 CPU, "
                                       "2 GPU"), facts["too_big"]
    assert "the largest of the cluster's 2 node(s) has 1" in facts["too_big"]
    # two trials of 0.5 GPU each share the worker's one GPU
    assert facts["trials"] == 2 and facts["errors"] == [], facts
    runs = sorted(p.parent for p in (store / "remote").glob("*/config.json"))
    assert [str(p) for p in runs] == facts["paths"]  # Tune's trial folders, in storage
    for run_dir in runs:
        for name in ("config.json", "metrics.csv", "summary.json", "adapters.safetensors"):
            assert (run_dir / name).is_file(), (run_dir, name)
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    df = analysis.load(store / "remote")
    assert set(df["algorithm"]) == {"decaf", "dlora"} and set(df["status"]) == {"completed"}
    assert df["round"].max() == 6
    # the same URI again: refused before anything runs; --resume: nothing redone
    assert facts["again"].startswith("--storage: ") and "already holds a sweep" in facts["again"]
    assert facts["resumed_errors"] == [] and facts["redone"] == []


def test_storage_locations_keep_uris_and_make_paths_absolute(tmp_path):
    assert location("s3://bucket/sweeps/") == "s3://bucket/sweeps"
    assert sweep_location("gs://b/x", "fig3") == "gs://b/x/fig3"
    assert location("runs/sweeps") == str(Path("runs/sweeps").resolve())
    assert not holds_anything(f"file://{tmp_path}/none")
    (tmp_path / "s").mkdir()
    assert not holds_anything(f"file://{tmp_path}/s")
    (tmp_path / "s" / "x").write_text("1")
    assert holds_anything(f"file://{tmp_path}/s") and holds_anything(str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="^--storage: nope://x: not a usable storage"):
        holds_anything("nope://x")


def _sweep(tmp_path, base, grid):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "fit", "base": base, "grid": grid}))
    return load_sweep(path)


TWO_CPUS = [{"CPU": 2.0, "GPU": 0.0, "memory": 8e9}]


def test_a_null_cpus_per_host_takes_the_clusters_share_and_the_quickstart_fits(tmp_path):
    base = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    sweep = _sweep(tmp_path, base, {"algorithm": ["decaf", "dlora", "centralized"]})
    check_fits(sweep, TWO_CPUS, 2.0)  # 0.01 + 2 hosts x 0.995 CPU: fits 2 CPUs exactly
    cfg = trial_config(sweep, {"algorithm": "decaf"}, 2.0)
    assert cfg.runtime.cpus_per_host == pytest.approx(0.995)
    bundles = trial_resources(cfg).bundles
    assert bundles == [{"CPU": 0.01}, {"CPU": 0.995}, {"CPU": 0.995}]
    assert sum(b["CPU"] for b in bundles) <= 2.0
    # a big cluster: at most 1 CPU per host, as a single run
    assert trial_config(sweep, {"algorithm": "decaf"}, 64.0).runtime.cpus_per_host == 1.0


def test_fractional_gpu_hosts_fit_one_gpu_and_in_process_trials_reserve_their_gpus(tmp_path):
    base = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    gpu_node = [{"CPU": 8.0, "GPU": 1.0, "memory": 8e9}]
    sweep = _sweep(tmp_path, base, {"runtime.gpus_per_host": [0.5]})
    check_fits(sweep, gpu_node, 8.0)
    bundles = trial_resources(trial_config(sweep, {"runtime.gpus_per_host": 0.5}, 8.0)).bundles
    assert bundles == [{"CPU": 0.01}] + [{"CPU": 1.0, "GPU": 0.5}] * 2
    inproc = _sweep(tmp_path, {**BASE, "runtime": {"kind": "inprocess", "gpus_per_host": 1}},
                    {"seed": [0]})
    assert trial_resources(inproc.config_for({"seed": 0})).bundles == [{"CPU": 1.0, "GPU": 1.0}]


@pytest.mark.parametrize("grid, field, numbers", [
    ({"runtime.gpus_per_host": [0.0, 1.0]}, "runtime.gpus_per_host", "asks 1 GPU"),
    ({"runtime.cpus_per_host": [4.0]}, "runtime.cpus_per_host", "asks 4 CPU"),
    ({"runtime.cpus_per_host": [1.5]}, "runtime.cpus_per_host", "ask 3.01 CPU in all"),
])
def test_a_trial_that_can_never_be_placed_is_a_config_error(tmp_path, grid, field, numbers):
    base = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    with pytest.raises(ConfigError) as e:
        check_fits(_sweep(tmp_path, base, grid), TWO_CPUS, 2.0)
    assert e.value.field == field and numbers in str(e.value) and "\n" not in str(e.value)


def test_an_in_process_trial_with_too_many_threads_names_runtime_threads(tmp_path):
    base = {**BASE, "runtime": {"kind": "inprocess", "threads": 3}}
    with pytest.raises(ConfigError, match="^runtime.threads: an in-process trial of 3 CPU"):
        check_fits(_sweep(tmp_path, base, {"seed": [0]}), TWO_CPUS, 2.0)


def test_clip_trials_never_download(tmp_path):
    base = yaml.safe_load((ROOT / "sweeps" / "clip-tiny-digits.yaml").read_text())
    sweep = _sweep(tmp_path, base, {"seed": [0]})
    assert sweep.config_for({"seed": 0}).task.download is True
    assert trial_config(sweep, {"seed": 0}, 2.0).task.download is False
