"""Interruption is a state and runs resume: a run stopped at a round boundary (SIGINT, SIGTERM,
or ``stop`` on either runtime) or killed (SIGKILL) continues with ``run --resume`` to the numbers
of an uninterrupted run, byte for byte in metrics.csv. A diverged run tells one story."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from decaf_ray.experiment import run
from decaf_ray.experiment_config import load_config
from decaf_ray.results import load_adapters
from test_cli import TINY, cli

EXE = Path(sys.executable).parent / "decaf-ray"
SLOW = {**TINY, "rounds": 300, "eval_every": 1,
        "runtime": {"kind": "inprocess", "threads": 1, "checkpoint_every": 5}}


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A run of some seconds, and its uninterrupted metrics.csv."""
    d = tmp_path_factory.mktemp("slow")
    path = d / "slow.yaml"
    path.write_text(yaml.safe_dump(SLOW))
    res = cli("run", path, "--out", d / "whole", "--quiet")
    assert res.returncode == 0, res.stderr
    return path, (d / "whole" / "metrics.csv").read_bytes()


def _start_and_signal(config: Path, out: Path, sig: int, after_round: int = 20):
    """Start ``decaf-ray run`` in a subprocess, send ``sig`` once metrics.csv shows
    ``after_round``, and return the finished process."""
    proc = subprocess.Popen([str(EXE), "run", str(config), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        rows = (out / "metrics.csv").read_text().splitlines() if (out / "metrics.csv").is_file() else []
        if len(rows) > 1 and int(rows[-1].split(",")[0]) >= after_round:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be signalled: {proc.stderr.read()}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_round_and_resume_gives_the_uninterrupted_numbers(slow, tmp_path, sig):
    config, whole = slow
    out = tmp_path / "run"
    code, stdout, stderr = _start_and_signal(config, out, sig)
    assert code == 130 and stdout.startswith("interrupted after round"), (stdout, stderr)
    assert "stopping after this round" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 20 <= summary["rounds_completed"] < 300
    assert summary["resume"] == f"decaf-ray run --resume {out}"
    assert (out / "checkpoint" / "state.pt").is_file()
    res = cli("run", "--resume", out, "--quiet")
    assert res.returncode == 0 and res.stdout.startswith("completed"), res.stderr
    assert (out / "metrics.csv").read_bytes() == whole
    assert not (out / "checkpoint").exists()  # an ended run keeps no optimizer state


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(slow, tmp_path):
    config, whole = slow
    out = tmp_path / "run"
    code, _, _ = _start_and_signal(config, out, signal.SIGKILL)
    assert code == -signal.SIGKILL and not (out / "summary.json").exists()
    res = cli("run", "--resume", out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert (out / "metrics.csv").read_bytes() == whole


def test_resume_refuses_what_it_cannot_continue(slow, tmp_path):
    config, _ = slow
    out = tmp_path / "run"
    _start_and_signal(config, out, signal.SIGINT)
    before = (out / "metrics.csv").read_bytes()
    res = cli("run", "--resume", out, "--set", "lora.rank=3")
    assert res.returncode == 2 and "lora.rank: 2 -> 3" in res.stderr and "--force" in res.stderr
    res = cli("run", "--resume", out, "--out", tmp_path / "elsewhere")
    assert res.returncode == 2 and res.stderr.startswith("decaf-ray: error: --out:")
    res = cli("run", "--resume", tmp_path / "nothing")
    assert res.returncode == 2 and "not a run directory" in res.stderr
    assert (out / "metrics.csv").read_bytes() == before  # refused: nothing written
    assert cli("run", "--resume", out, "--quiet").returncode == 0
    res = cli("run", "--resume", out)
    assert res.returncode == 2 and "already ended (completed)" in res.stderr


@pytest.mark.parametrize("kind", ["inprocess", "ray"])
def test_stop_ends_at_a_round_boundary_on_either_runtime(kind, request):
    """``run(stop=...)`` (what the signal handler sets): the hosts' coordinator stops at the
    next round, hands back that round's state, and resuming from it gives the whole run."""
    if kind == "ray":
        request.getfixturevalue("ray_session")
    cfg = load_config({**TINY, "rounds": 8, "eval_every": 1,
                       "runtime": {"kind": kind, "threads": 1, "agents_per_host": 2}})
    whole = run(cfg, progress=False)
    stop, states = threading.Event(), []

    def on_rows(rows):
        if rows[0]["round"] == 3:
            stop.set()

    part = run(cfg, progress=False, stop=stop, on_rows=on_rows, on_checkpoint=states.append,
               checkpoint_every=100)
    assert part.status == "interrupted" and part.summary["rounds_completed"] in (3, 4)
    assert states[-1].round == part.summary["rounds_completed"]
    rest = run(cfg, progress=False, resume=states[-1])
    assert rest.rows == whole.rows


def test_a_diverged_run_describes_its_last_finite_round_everywhere(tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "rounds": 6, "eval_every": 1}))
    res = cli("run", path, "--out", out, "--quiet", "--set", "optim.lr=1e6",
              "--set", "algorithm=dlora")
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    at, last = summary["diverged_at"], summary["rounds_completed"]
    assert summary["status"] == "diverged" and at["results_of_round"] == last < at["round"]
    assert res.stdout.startswith(f"diverged at round {at['round']} (step {at['step']}")
    assert "{" not in res.stdout.splitlines()[0]  # a sentence, not a Python dict
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    final = {m: float(v) for r, _, a, m, v in rows if int(r) == last and a == "-1"}
    assert summary["final"] == pytest.approx(final)
    # the adapters saved are those the final metrics were measured at: all finite
    adapters = load_adapters(out / "adapters.safetensors")
    assert all(torch.isfinite(t).all() for f in adapters.values() for ab in f.values() for t in ab)
    # divergence is declared at the first non-finite number: no later round was evaluated
    assert max(int(r) for r, *_ in rows) == at["round"]


def test_adapters_file_has_the_mode_of_the_other_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert cli("run", path, "--out", tmp_path / "r", "--quiet").returncode == 0
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in (tmp_path / "r").iterdir()}
    assert modes["adapters.safetensors"] == modes["summary.json"], modes


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_a_run_that_folds_into_its_base_resumes_from_its_checkpoint_file_exactly(name, tmp_path):
    """The base delta S is part of the state: written once in the file (every agent's entry
    holds the same tensor), read back, and the resumed run gives the uninterrupted numbers;
    without it (the base back at W0) they differ."""
    from decaf_ray.runtime import checkpoint

    cfg = load_config({**TINY, "algorithm": name, "rounds": 6, "eval_every": 1})
    states = []
    whole = run(cfg, progress=False, checkpoint_every=3, on_checkpoint=states.append)
    checkpoint.save(states[0], tmp_path / "state.pt")
    state = checkpoint.load(tmp_path / "state.pt")
    deltas = [a["base_delta"]["linear"] for a in state.agents.values()]
    assert len({d.untyped_storage().data_ptr() for d in deltas}) == 1  # stored once
    assert deltas[0].equal(states[0].agents[0]["base_delta"]["linear"])
    assert run(cfg, progress=False, resume=state).rows == whole.rows
    for a in state.agents.values():
        del a["base_delta"]
    assert run(cfg, progress=False, resume=state).rows != whole.rows
