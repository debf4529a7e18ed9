"""Clusters: ``ray job submit`` to a ``ray start --head`` cluster, and hosts spread over two nodes.

Each cluster lives in its own processes and is stopped by its own process group, so the test
session's Ray is untouched (``ray stop`` would stop every Ray on the machine).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import analysis

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = {
    "algorithm": "decaf", "agents": 4, "topology": "ring", "rounds": 6, "local_steps": 2,
    "eval_every": 3, "seed": 2,
    "task": {"kind": "synthetic", "d": 4, "k": 8, "samples": 200, "test_samples": 100},
    "data": {"partition": "classes_per_agent", "batch_size": 8},
    "lora": {"rank": 2, "alpha": 2.0}, "optim": {"name": "sgd", "lr": 0.3},
    "runtime": {"kind": "ray", "agents_per_host": 2, "threads": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def head_cluster():
    """A one-node cluster from ``ray start --head --block``, with the dashboard (job server)."""
    port, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    # The node's agents get free ports too: their defaults (e.g. 52365) may be held by the test
    # session's own Ray, and a job server without its agent refuses every submission.
    agents = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port")]
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         *agents, f"--temp-dir={temp}", "--disable-usage-stats"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                               env=_env(), capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("ray start --head did not bring up its job server in 90 s")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_decaf_ray_on_the_cluster(head_cluster, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "job-out"
    res = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head_cluster, "--working-dir", str(ROOT),
         "--", "decaf-ray", "run", str(config), "--out", str(out), "--quiet"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["hosts"] == 2
    # the job joined the cluster (RAY_ADDRESS) rather than starting an embedded Ray
    assert "Started a local Ray instance" not in res.stdout + res.stderr


def test_ray_job_submit_runs_a_sweep_on_the_cluster(head_cluster, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    base = {**CONFIG, "runtime": {"kind": "inprocess", "threads": 1}}
    sweep.write_text(yaml.safe_dump({"name": "job-sweep", "base": base,
                                     "grid": {"algorithm": ["decaf", "dlora"]}}))
    res = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head_cluster, "--working-dir", str(ROOT),
         "--", "decaf-ray", "sweep", str(sweep), "--storage", str(tmp_path / "sweeps")],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sweep job-sweep: 2 trials, 0 failed" in res.stdout
    df = analysis.load(tmp_path / "sweeps" / "job-sweep")
    assert set(df["algorithm"]) == {"decaf", "dlora"} and set(df["status"]) == {"completed"}


TWO_NODES = textwrap.dedent("""
    import json, ray
    from ray.cluster_utils import Cluster
    from decaf_ray.experiment_config import load_config
    from decaf_ray.experiment import run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    data = json.loads(%r)
    got = run(load_config(data), progress=False)
    data["runtime"]["kind"] = "inprocess"
    ref = run(load_config(data), progress=False)
    same = [r["value"] for r in got.rows] == [r["value"] for r in ref.rows]
    print(json.dumps({"nodes": got.summary["host_nodes"], "same": same}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_hosts_spread_over_two_nodes_give_the_same_numbers(tmp_path):
    res = subprocess.run([sys.executable, "-c", TWO_NODES % json.dumps(CONFIG)], env=_env(),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts == {"nodes": 2, "same": True}
