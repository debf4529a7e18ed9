"""Centralized on Ray runs as a Ray Train TorchTrainer with data-parallel workers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from decaf_ray.experiment_config import load_config
from decaf_ray.experiment import run

pytestmark = pytest.mark.ray

BASE = {
    "algorithm": "centralized", "agents": 4, "rounds": 6, "local_steps": 2, "eval_every": 3,
    "seed": 3,
    "task": {"kind": "synthetic", "d": 6, "k": 16, "samples": 600, "test_samples": 200},
    "data": {"partition": "iid", "batch_size": 16},
    "lora": {"rank": 2, "alpha": 2.0},
    "optim": {"name": "adam", "lr": 0.05},
}


def _cfg(**runtime):
    return load_config({**BASE, "runtime": {"threads": 1, **runtime}})


def _values(result):
    return [(r["round"], r["step"], r["agent"], r["metric"], r["value"]) for r in result.rows]


def test_one_train_worker_gives_the_inprocess_numbers_exactly(ray_session):
    ref = run(_cfg(kind="inprocess"), progress=False)
    streamed = []
    got = run(_cfg(kind="ray", train_workers=1), progress=False, on_rows=streamed.append)
    assert got.status == ref.status == "completed"
    assert got.summary["train_workers"] == 1
    assert got.summary["train_cuda_visible_devices"] == ""  # reserved no GPU: sees none
    assert _values(got) == _values(ref)
    assert len(streamed) == 3  # rounds 0, 3 and 6 arrived as they were evaluated
    for n, (a, b) in ref.factors[0].items():
        assert got.factors[0][n][0].equal(a) and got.factors[0][n][1].equal(b)


def test_two_data_parallel_workers_agree_to_rounding(ray_session):
    ref = run(_cfg(kind="inprocess"), progress=False)
    got = run(_cfg(kind="ray", train_workers=2, cpus_per_host=0.5), progress=False)
    assert got.status == "completed" and got.summary["train_workers"] == 2
    a, b = _values(got), _values(ref)
    assert [r[:4] for r in a] == [r[:4] for r in b]
    assert got.rows and all(abs(x[4] - y[4]) <= 1e-4 * max(1.0, abs(y[4])) for x, y in zip(a, b))
    for n, (A, B) in ref.factors[0].items():
        assert got.factors[0][n][0].allclose(A, atol=1e-5) and got.factors[0][n][1].allclose(B, atol=1e-5)


def test_more_workers_than_a_batch_holds_is_a_config_error():
    from decaf_ray.config import ConfigError
    from decaf_ray.plan import prepare

    with pytest.raises(ConfigError, match="runtime.train_workers"):
        prepare(load_config({**BASE, "data": {"partition": "iid", "batch_size": 2},
                             "runtime": {"kind": "ray", "train_workers": 3}}))


FAKE_GPUS = textwrap.dedent("""
    import json, ray
    from decaf_ray.experiment_config import load_config
    from decaf_ray.experiment import run

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    data = json.loads(%r)
    got = run(load_config(data), progress=False)
    data["runtime"] = {"kind": "inprocess", "threads": 1}
    ref = run(load_config(data), progress=False)
    print(json.dumps({"status": got.status, "visible": got.summary["train_cuda_visible_devices"],
                      "rows": len(got.rows) == len(ref.rows)}))
    ray.shutdown()
""")


def test_train_workers_use_the_gpus_ray_assigned(tmp_path):
    """On a fake-GPU Ray (a CPU machine with num_gpus=2, in its own process): two workers of
    0.5 GPU each pack onto GPU 0 and see only it; the run completes on the CPU (torch sees no
    GPU, so device auto is the CPU)."""
    cfg = {**BASE, "rounds": 2, "local_steps": 1, "eval_every": 2,
           "runtime": {"kind": "ray", "threads": 1, "train_workers": 2, "cpus_per_host": 0.5,
                       "gpus_per_host": 0.5}}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", FAKE_GPUS % json.dumps(cfg)], env=env,
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts == {"status": "completed", "visible": "0", "rows": True}
