"""The GPU cluster path on fake-GPU Ray nodes: Ray assigns GPU ids and sets CUDA_VISIBLE_DEVICES on
this CPU machine (torch sees no GPU), so placement, packing, hiding and fail-fast are checked for real.

The cluster runs in a subprocess (a two-node ``ray.cluster_utils.Cluster``), which shuts it down
itself; the test session's own Ray is untouched.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from test_ray_cluster import _env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = {
    "algorithm": "decaf", "agents": 4, "topology": "ring", "rounds": 2, "local_steps": 2,
    "eval_every": 2, "seed": 2, "grad_norm": False,
    "task": {"kind": "synthetic", "d": 4, "k": 8, "samples": 120, "test_samples": 40},
    "data": {"partition": "iid", "batch_size": 8},
    "lora": {"rank": 2, "alpha": 2.0}, "optim": {"name": "sgd", "lr": 0.3},
    "runtime": {"kind": "ray", "agents_per_host": 1, "threads": 1, "cpus_per_host": 0.5},
}

SCRIPT = textwrap.dedent("""
    import json, time, ray
    from ray.cluster_utils import Cluster
    from decaf_ray.config import ConfigError
    from decaf_ray.experiment_config import load_config
    from decaf_ray.experiment import run
    from decaf_ray.placement import PlacementTimeout

    # head: CPUs only (the driver's node); worker: the "GPU node", 2 fake GPUs
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    cluster.add_node(num_cpus=3, num_gpus=2)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    base = json.loads(%r)
    out = {}

    def cfg(**runtime):
        return load_config({**base, "runtime": {**base["runtime"], **runtime}})

    def placed(res):
        return res.summary["placement"]

    # four hosts of half a GPU: two per GPU, each sees exactly its own GPU
    res = run(cfg(gpus_per_host=0.5), progress=False)
    out["half"] = {"status": res.status, "placement": placed(res), "hosts": res.summary["hosts"]}
    # hosts that reserve no GPU see none, wherever they land; nor does the coordinator
    res = run(cfg(gpus_per_host=0), progress=False)
    out["zero"] = placed(res)
    # one whole GPU per host: 2 hosts of 2 agents
    res = run(cfg(gpus_per_host=1, agents_per_host=2), progress=False)
    out["whole"] = placed(res)

    # a host killed while another is busy in a long call: one restart, into the dead host's
    # bundle (its GPU), and the numbers of the uninterrupted in-process run
    import threading
    done = threading.Event()

    def on_rows(rows):
        if rows[0]["round"] >= 2 and not done.is_set():
            done.set()
            ray.get_actor("gpu-busy/host1").busy.remote(4.0)
            ray.kill(ray.get_actor("gpu-busy/host0"))

    long = {**base, "rounds": 4, "eval_every": 1}
    got = run(load_config({**long, "runtime": {**base["runtime"], "gpus_per_host": 1,
                                                "agents_per_host": 2}}),
              progress=False, on_rows=on_rows, run_id="gpu-busy")
    ref = run(load_config({**long, "runtime": {"kind": "inprocess", "threads": 1}}),
              progress=False)
    out["recovered"] = {"killed": done.is_set(), "restarts": got.summary["host_restarts"],
                        "same": [r["value"] for r in got.rows] == [r["value"] for r in ref.rows],
                        "gpus": sorted(h["gpu_ids"] for h in placed(got)["hosts"])}

    # impossible requests end at once with one line naming the field
    for key, runtime in [("too_big", {"gpus_per_host": 3, "agents_per_host": 4}),
                         ("too_many", {"gpus_per_host": 1})]:
        start = time.perf_counter()
        try:
            run(cfg(**runtime), progress=False)
            out[key] = "ran"
        except ConfigError as e:
            out[key] = {"field": e.field, "message": str(e),
                        "seconds": time.perf_counter() - start}

    # possible, but the GPUs are taken: ends after the timeout, naming what is pending
    hold = ray.util.placement_group([{"GPU": 2}])
    ray.get(hold.ready())
    start = time.perf_counter()
    try:
        run(cfg(gpus_per_host=1, agents_per_host=2, placement_timeout_s=3), progress=False)
        out["busy"] = "ran"
    except PlacementTimeout as e:
        out["busy"] = {"message": str(e), "seconds": time.perf_counter() - start}
    ray.util.remove_placement_group(hold)
    print(json.dumps(out))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    res = subprocess.run([sys.executable, "-c", SCRIPT % json.dumps(CONFIG)], env=_env(),
                         capture_output=True, text=True, timeout=400,
                         cwd=tmp_path_factory.mktemp("gpu"))
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fractional_gpus_pack_two_hosts_per_gpu_each_seeing_its_own(facts):
    half = facts["half"]
    assert half["status"] == "completed" and half["hosts"] == 4
    hosts = half["placement"]["hosts"]
    ids = sorted(h["gpu_ids"][0] for h in hosts)
    assert all(len(h["gpu_ids"]) == 1 for h in hosts)
    assert ids == ["0", "0", "1", "1"]  # 0.5 + 0.5 on each of the two GPUs
    for h in hosts:
        assert h["cuda_visible"] == h["gpu_ids"][0]  # Ray restricted what it sees
        assert h["device"] == "cpu"  # torch sees no real GPU on this machine
    assert len({h["node"] for h in hosts}) == 1  # only the worker node has GPUs


def test_hosts_and_coordinator_that_reserved_no_gpu_see_none(facts):
    zero = facts["zero"]
    for h in zero["hosts"]:
        assert h["gpu_ids"] == [] and h["cuda_visible"] == "" and h["device"] == "cpu"
    assert zero["coordinator"]["cuda_visible"] == ""
    for p in (facts["half"], {"placement": facts["whole"]}):
        assert p["placement"]["coordinator"]["cuda_visible"] == ""


def test_whole_gpus_are_distinct(facts):
    hosts = facts["whole"]["hosts"]
    assert sorted(h["gpu_ids"] for h in hosts) == [["0"], ["1"]]
    assert {h["cuda_visible"] for h in hosts} == {"0", "1"}


def test_impossible_gpu_requests_fail_at_once_naming_the_field(facts):
    big, many = facts["too_big"], facts["too_many"]
    assert big != "ran" and many != "ran"
    assert big["field"] == many["field"] == "runtime.gpus_per_host"
    assert "one bundle asks 3 GPU but the largest" in big["message"] and "has 2" in big["message"]
    assert "4 bundles ask 4 GPU" in many["message"] and "cluster has 2" in many["message"]
    for f in (big, many):
        assert "\n" not in f["message"]
        assert f["seconds"] < 30  # generous: the point is that it returns at all


def test_a_possible_request_not_placed_in_time_names_what_is_pending(facts):
    busy = facts["busy"]
    assert busy != "ran"
    assert "not placed after 3 s" in busy["message"] and "pending 2 bundles of 0.5 CPU, 1 GPU" in busy["message"]
    assert "0 GPU" in busy["message"]  # what is free now
    assert "\n" not in busy["message"]


def test_cli_refuses_more_gpus_than_exist_with_one_line_and_writes_nothing(tmp_path):
    """The issue's own reproduction: the quickstart with a GPU per host on a machine without."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "runtime": {"kind": "ray",
                                                            "gpus_per_host": 1}}))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "decaf_ray.cli", "run", str(config), "--out",
                          str(out), "--quiet"], env=_env(), capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("decaf-ray: error")]
    assert len(lines) == 1 and "runtime.gpus_per_host" in lines[0]
    assert not out.exists()


def test_an_explicit_cuda_device_without_gpus_per_host_is_refused():
    from decaf_ray.config import ConfigError
    from decaf_ray.experiment_config import load_config
    from decaf_ray.plan import prepare

    cfg = load_config({**CONFIG, "task": {"kind": "clip", "dataset": "digits",
                                          "device": "cuda", "model_config": TINY_CLIP},
                       "runtime": {"kind": "ray"}})
    with pytest.raises(ConfigError, match="task.device"):
        prepare(cfg)


TINY_CLIP = {"embed_dim": 8,
             "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8,
                            "head_width": 8},
             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2,
                          "layers": 1}}


def test_a_host_killed_while_another_is_busy_recovers_exactly_on_its_gpu(facts):
    rec = facts["recovered"]
    assert rec["killed"] and rec["restarts"] == 1 and rec["same"]
    assert rec["gpus"] == [["0"], ["1"]]  # the replacement took the dead host's GPU


def test_placement_checks_each_bundle_whole_on_one_node():
    from decaf_ray.placement import problem

    mixed = [{"CPU": 32.0}, {"CPU": 8.0, "GPU": 8.0}]  # a CPU head, GPU workers
    assert problem([{"CPU": 16.0, "GPU": 1.0}], mixed)[1].startswith("one bundle asks 16 CPU")
    assert problem([{"CPU": 8.0, "GPU": 1.0}] + [{"CPU": 30.0}], mixed) is None
    assert problem([{"CPU": 1.0, "GPU": 9.0}], mixed)[0] == "GPU"


def test_a_config_error_raised_in_an_actor_reaches_the_driver_as_itself():
    import pickle

    from decaf_ray.config import ConfigError

    e = pickle.loads(pickle.dumps(ConfigError("task.root", "no such folder")))
    assert (e.field, e.message, str(e)) == ("task.root", "no such folder",
                                            "task.root: no such folder")


def test_a_null_cpus_per_host_share_never_rounds_above_the_cluster():
    from decaf_ray.experiment_config import load_config
    from decaf_ray.sweep_resources import DRIVER_CPUS, host_share

    for cpus in (2.0, 8.0, 16.0):
        for hosts in range(1, 21):
            cfg = load_config({"agents": hosts, "task": "synthetic"})
            share = host_share(cfg, cpus)
            # Ray counts in units of 1e-4, rounding to the nearest
            assert round(share * 1e4) * hosts + round(DRIVER_CPUS * 1e4) <= cpus * 1e4
