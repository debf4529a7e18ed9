"""The Ray runtime against the in-process reference: same numbers, crash recovery, placement."""

import os
import signal
import threading

import pytest

from decaf_ray.experiment_config import load_config
from decaf_ray.experiment import run

pytestmark = pytest.mark.ray

BASE = {
    "agents": 6, "topology": "ring", "rounds": 12, "local_steps": 2, "eval_every": 3, "seed": 5,
    "task": {"kind": "synthetic", "d": 6, "k": 16, "samples": 600, "test_samples": 200},
    "data": {"partition": "classes_per_agent", "batch_size": 16},
    "lora": {"rank": 2, "alpha": 2.0, "dropout": 0.1},
    "optim": {"name": "adam", "lr": 0.05},
}


def _cfg(kind, **over):
    runtime = {"kind": kind, "threads": 1, **over.pop("runtime", {})}
    return load_config({**BASE, **over, "runtime": runtime})


def _values(result):
    return [(r["round"], r["step"], r["agent"], r["metric"], r["value"]) for r in result.rows]


@pytest.mark.parametrize("algorithm, per_host, over", [
    ("decaf", 3, {}), ("dlora", 2, {}), ("fedavg_fa", 6, {}),
    # one factor travels (FedSA: A), or one a round (alternating: B, then A; 2 steps a round)
    ("fedsa", 3, {"rounds": 4}), ("alternating", 3, {"rounds": 4}),
    # a star: hub and leaves have different neighbour counts, so DeCAF's batched mixes are
    # grouped differently on each host than in-process; the aligned split mixes per agent
    ("decaf", 4, {"topology": "star", "consensus": {"split": "aligned", "state": "rotate"}}),
    # HetLoRA with ranks from the star's neighbourhoods (hub 5, leaves 2): each host builds
    # its agents at their own ranks from the plan's
    ("hetlora", 4, {"topology": "star", "rounds": 4, "lora": {
        "rank": 2, "alpha": 2.0, "dropout": 0.1, "rank_rule": "neighbourhood"}}),
    # FLoRA folds into the base: every host folds the same delta into its own task; per-agent
    # ranks (its stack takes any), each agent cut from one fresh A (FedEx-LoRA: below)
    ("flora", 4, {"rounds": 4, "lora": {"rank": 2, "alpha": 2.0, "dropout": 0.1,
                                        "ranks": [2, 1, 3, 2, 1, 2]}}),
])
def test_ray_gives_the_inprocess_numbers_exactly(ray_session, algorithm, per_host, over):
    ref = run(_cfg("inprocess", algorithm=algorithm, **over), progress=False)
    got = run(_cfg("ray", algorithm=algorithm, runtime={"agents_per_host": per_host}, **over),
              progress=False)
    assert got.status == ref.status == "completed"
    assert _values(got) == _values(ref)
    for i in ref.factors:
        for n, (a, b) in ref.factors[i].items():
            assert got.factors[i][n][0].equal(a) and got.factors[i][n][1].equal(b)
    if algorithm == "flora":  # the base delta S the run keeps, the same from every host
        assert ref.base_delta and ref.base_delta.keys() == got.base_delta.keys()
        assert all(got.base_delta[n].equal(d) for n, d in ref.base_delta.items())
    else:
        assert got.base_delta is ref.base_delta is None
    assert got.summary["hosts"] == -(-6 // per_host)


def test_batched_agents_on_ray_give_the_inprocess_numbers_exactly(ray_session):
    """runtime.batch_agents on the tiny CLIP: hosts of 2 agents run each step as one pass; the
    in-process runtime cuts the same batches (here [0, 1] and [2])."""
    from test_clip import experiment

    spec = experiment("decaf")
    spec["runtime"] = {"threads": 1, "agents_per_host": 2, "batch_agents": 2}
    ref = run(load_config({**spec, "runtime": {**spec["runtime"], "kind": "inprocess"}}),
              progress=False)
    got = run(load_config({**spec, "runtime": {**spec["runtime"], "kind": "ray"}}),
              progress=False)
    assert got.status == ref.status == "completed"
    assert _values(got) == _values(ref)
    assert got.summary["hosts"] == 2


def test_rows_stream_to_the_driver_during_the_run(ray_session):
    seen = []
    res = run(_cfg("ray", runtime={"agents_per_host": 3}), progress=False,
              on_rows=lambda rows: seen.append(rows[0]["round"]))
    assert seen == [0, 3, 6, 9, 12]
    assert res.summary["rounds_completed"] == 12


def _kill_at(round_, run_id, how):
    """An on_rows callback that kills host 0 of ``run_id`` once round ``round_`` is reported."""
    import ray

    done = threading.Event()

    def on_rows(rows):
        if rows[0]["round"] >= round_ and not done.is_set():
            done.set()
            host = ray.get_actor(f"{run_id}/host0")
            if how == "ray.kill":
                ray.kill(host)
            else:  # the process exits under the host
                os.kill(ray.get(host.where.remote())["pid"], signal.SIGKILL)

    return on_rows, done


@pytest.mark.parametrize("how", ["ray.kill", "process exit"])
def test_a_killed_host_is_restarted_and_the_run_ends_as_if_uninterrupted(ray_session, how):
    cfg = _cfg("ray", algorithm="decaf", runtime={"agents_per_host": 3})
    ref = run(_cfg("inprocess", algorithm="decaf"), progress=False)
    run_id = f"crash-{how.replace(' ', '-').replace('.', '-')}"
    on_rows, done = _kill_at(6, run_id, how)
    got = run(cfg, progress=False, on_rows=on_rows, run_id=run_id)
    assert done.is_set()
    assert got.summary["host_restarts"] == 1
    assert _values(got) == _values(ref)


def test_a_killed_host_of_a_run_that_folds_comes_back_on_the_same_base(ray_session):
    """FedEx-LoRA on Ray gives the in-process numbers, through a host's death: the replacement
    builds its task at W0, and restoring every host to the round-4 snapshot (which carries the
    base delta) and replaying rounds 5-6 puts every base back where it was."""
    _killed_at_round_gives_the_inprocess_numbers({"algorithm": "fedex", "rounds": 8}, 6, 4,
                                                 "crash-fold")


def _killed_at_round_gives_the_inprocess_numbers(over, kill, every, run_id):
    """Host 0 of a Ray run of ``over`` killed after round ``kill``, snapshots every ``every``
    rounds: one restart, the in-process rows; returns (in-process, Ray) results."""
    ref = run(_cfg("inprocess", **over), progress=False)
    on_rows, done = _kill_at(kill, run_id, "ray.kill")
    got = run(_cfg("ray", runtime={"agents_per_host": 3, "checkpoint_every": every}, **over),
              progress=False, on_rows=on_rows, run_id=run_id)
    assert done.is_set() and got.summary["host_restarts"] == 1
    assert _values(got) == _values(ref)
    return ref, got


NETWORK = {"schedule": "one_peer_exponential", "link_failure": 0.3, "participation": 0.7,
           "stragglers": {"fraction": 0.34, "speed": 0.5},
           "compress": {"kind": "int8", "error_feedback": True}}


def test_ray_routes_each_rounds_network_as_in_process_through_a_hosts_death(ray_session):
    """A changing graph with failed links, absent agents, stragglers and int8 messages with
    error feedback: Ray's hosts give the in-process numbers, bytes and trace, also when host 0
    dies after round 4 and every host is restored to round 3 (residuals included) and replays
    round 4."""
    over = {"algorithm": "decaf", "rounds": 6, "eval_every": 2, "network": NETWORK}
    ref, got = _killed_at_round_gives_the_inprocess_numbers(over, 4, 3, "crash-net")
    assert got.summary["network"] == ref.summary["network"]
    assert min(r[1] for r in ref.summary["network"]["trace"]["rows"]) < 6  # someone was out


def test_fedavg_with_partial_participation_on_ray_gives_the_inprocess_numbers(ray_session):
    """Two hosts of 3 agents; with seed 7, round 2's active agents are 0 and 1 only, so host 1
    publishes nothing and still takes the server's average."""
    over = {"algorithm": "fedavg", "rounds": 4, "eval_every": 2, "seed": 7,
            "network": {"participation": 0.5}}
    ref = run(_cfg("inprocess", **over), progress=False)
    assert ref.summary["network"]["trace"]["rows"][1][1] == 2
    got = run(_cfg("ray", runtime={"agents_per_host": 3}, **over), progress=False)
    assert _values(got) == _values(ref)
    assert got.summary["network"] == ref.summary["network"]


def test_past_max_host_restarts_the_run_fails_clearly(ray_session):
    from decaf_ray.runtime.ray_runtime import HostFailure

    cfg = _cfg("ray", runtime={"agents_per_host": 3, "max_host_restarts": 0})
    on_rows, _ = _kill_at(3, "no-restarts", "ray.kill")
    with pytest.raises(HostFailure, match="max_host_restarts=0"):
        run(cfg, progress=False, on_rows=on_rows, run_id="no-restarts")


def test_divergence_on_ray_is_recorded(ray_session):
    res = run(_cfg("ray", algorithm="dlora", optim={"name": "sgd", "lr": 1e7},
                   runtime={"agents_per_host": 6}), progress=False)
    assert res.status == "diverged" and res.summary["diverged_at"]["step"] >= 1


def test_checkpoints_taken_on_ray_resume_in_process_and_vice_versa(ray_session):
    states = []
    ref = run(_cfg("inprocess", algorithm="dlora"), progress=False, checkpoint_every=6,
              on_checkpoint=states.append)
    got = run(_cfg("ray", algorithm="dlora", runtime={"agents_per_host": 3}), progress=False,
              resume=states[0])
    assert _values(got) == _values(ref)


def test_a_host_busy_in_a_long_call_while_another_is_killed_is_not_taken_for_dead(ray_session):
    """Liveness is Ray's word, asked on the host's own ping thread: host 1, busy for seconds
    when host 0 is killed, answers at once, keeps its place, and the run ends exactly as the
    uninterrupted one (one restart, not two)."""
    import ray

    cfg = _cfg("ray", algorithm="decaf", runtime={"agents_per_host": 3})
    ref = run(_cfg("inprocess", algorithm="decaf"), progress=False)
    run_id = "busy-and-killed"
    done = threading.Event()

    def on_rows(rows):
        if rows[0]["round"] >= 6 and not done.is_set():
            done.set()
            busy = ray.get_actor(f"{run_id}/host1")
            busy.busy.remote(6.0)  # queued ahead of the next round's calls, like a long step
            assert ray.get(busy.where.remote(), timeout=5)["agents"] == [3, 4, 5]  # answers now
            ray.kill(ray.get_actor(f"{run_id}/host0"))

    got = run(cfg, progress=False, on_rows=on_rows, run_id=run_id)
    assert done.is_set()
    assert got.summary["host_restarts"] == 1
    assert _values(got) == _values(ref)


def test_timings_split_load_training_mixing_and_evaluation(ray_session):
    res = run(_cfg("ray", algorithm="decaf", runtime={"agents_per_host": 3}), progress=False)
    s = res.summary
    assert s["load_time_s"] > 0 and s["train_time_s"] > 0 and s["eval_time_s"] > 0
    assert 0 < s["mix_time_s"] <= s["train_time_s"] + s["mix_time_s"]
    rows = s["round_times"]["rows"]
    assert [r[0] for r in rows] == list(range(1, 13))
    assert s["time_per_round_s"] == pytest.approx(sum(r[1] + r[2] for r in rows) / 12)
    assert s["time_per_round_s"] * 12 < s["wall_time_s"]  # evaluation and load left out


def test_a_checkpoint_file_is_shipped_to_hosts_by_bytes_and_digest(ray_session, tmp_path,
                                                                   monkeypatch):
    import hashlib

    import torch
    from safetensors.torch import save_file

    from decaf_ray.runtime import weights

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(6.0)}, str(path))
    spec = {**BASE, "task": {"kind": "clip", "dataset": "digits", "checkpoint": str(path),
                             "model_config": {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}}}
    cfg = load_config(spec)
    shipped = weights.ship(cfg)
    assert shipped.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path / "node"))
    got = weights.receive(cfg.to_dict(), shipped)
    local = tmp_path / "node" / f"{shipped.digest}.safetensors"
    assert got["task"]["checkpoint"] == str(local) and local.read_bytes() == path.read_bytes()
    local.unlink()
    bad = weights.Shipped(shipped.ref, "0" * 64, ".safetensors")
    with pytest.raises(RuntimeError, match="corrupted"):
        weights.receive(cfg.to_dict(), bad)
    assert weights.ship(load_config(BASE)) is None  # nothing to ship for the synthetic task
