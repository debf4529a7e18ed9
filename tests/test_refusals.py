"""What cannot be run is refused before anything is allocated or written: one line naming the
field or file, exit 2, no folder made. Names are names: nothing lands outside --out, runs/ or
--storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_cli import TINY, cli

EXE = Path(sys.executable).parent / "decaf-ray"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def refused(res, field: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith(f"decaf-ray: error: {field}"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".hidden", "-x", "x" * 129])
def test_a_run_name_is_one_safe_folder_name(config, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(cli("run", config, "--set", f"name={name}"), "name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_a_sweep_name_is_one_safe_folder_name(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "../../escape", "base": TINY,
                                     "grid": {"seed": [0, 1]}}))
    refused(cli("sweep", sweep, "--storage", tmp_path / "store"), "name")
    assert not (tmp_path / "store").exists()


def test_seed_out_of_range_names_seed(config):
    refused(cli("run", config, "--set", "seed=-1"), "seed")


def test_yaml_duplicate_keys_and_errors_give_the_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("agents: 4\nrounds: 3\nagents: 5\n")
    refused(cli("run", dup), f"{dup}:3: not valid YAML (key 'agents' appears twice")
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents: 4\n task: [\n")
    refused(cli("run", bad), f"{bad}:2: not valid YAML")


def test_sizes_are_refused_before_allocating(config, tmp_path):
    out = tmp_path / "r"
    res = cli("run", config, "--out", out, "--set", "lora.rank=10000")
    refused(res, "lora.rank")
    assert "min(d, k) = 4" in res.stderr  # the synthetic task's (d, k) = (4, 8)
    # a million agents on the ring: the sparse plan would fit, the 200 examples do not
    refused(cli("run", config, "--out", out, "--set", "agents=1000000"), "data")
    # on the complete graph the plan itself (10^12 weights) is refused, naming agents
    refused(cli("run", config, "--out", out, "--set", "agents=1000000",
                "--set", "topology=complete"), "agents")
    assert not out.exists()


def test_out_must_be_a_writable_folder(config, tmp_path):
    refused(cli("run", config, "--out", ""), "--out")
    (tmp_path / "file").write_text("x")
    refused(cli("run", config, "--out", tmp_path / "file" / "sub"), "--out")
    refused(cli("sweep", config, "--max-concurrent", "0"), "--max-concurrent")


def test_an_unreachable_ray_address_fails_in_seconds_naming_it(config, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    res = subprocess.run([str(EXE), "run", str(config), "--set", "runtime.kind=ray",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 2 and "RAY_ADDRESS: 127.0.0.1:1: no Ray cluster answers" in res.stderr
    assert not (tmp_path / "r").exists()


def test_a_run_records_the_versions_it_ran_with(config, tmp_path):
    assert cli("run", config, "--out", tmp_path / "r", "--quiet").returncode == 0
    versions = json.loads((tmp_path / "r" / "summary.json").read_text())["versions"]
    assert {"python", "decaf-ray", "torch", "ray", "peft", "transformers"} <= set(versions)


def test_config_json_is_self_contained_and_reruns_from_anywhere(tmp_path, monkeypatch):
    """A matrix file and an edge-list file named by relative paths are read into config.json,
    which then re-runs from another folder to the same numbers."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "m.csv").write_text("0.5,0.25,0,0.25\n0.25,0.5,0.25,0\n0,0.25,0.5,0.25\n"
                                "0.25,0,0.25,0.5\n")
    (here / "e.txt").write_text("0 1\n1 2\n2 3\n3 0\n")
    (here / "c.yaml").write_text(yaml.safe_dump({**TINY, "topology": {"name": "edges",
                                                                     "path": "e.txt"},
                                                 "mixing": {"scheme": "matrix",
                                                            "matrix": "m.csv"}}))
    monkeypatch.chdir(here)
    assert cli("run", "c.yaml", "--out", tmp_path / "a", "--quiet").returncode == 0
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["mixing"]["matrix"][0] == [0.5, 0.25, 0.0, 0.25]
    assert saved["topology"] == {"name": "edges", "edges": [[0, 1], [1, 2], [2, 3], [3, 0]]}
    monkeypatch.chdir(tmp_path)
    res = cli("run", tmp_path / "a" / "config.json", "--out", tmp_path / "b", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == (tmp_path / "b" / "metrics.csv").read_bytes()
