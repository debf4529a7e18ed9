"""Data staged once: every dataset a run or sweep needs, downloaded or checked before any trial
starts, so that trials (which run with ``task.download: false``) never download and never race.

    stage(cfg_or_sweep)     # an ExperimentConfig or a SweepConfig; returns one line per dataset

What staging does per task kind (each distinct dataset once, however many trials share it):

    clip       flowers102, food101, fashion_mnist: ``image_data.load`` with download allowed,
               under a file lock in the data root (two sweeps staging the same root take turns);
               digits: bundled with scikit-learn, nothing to do; imagefolder, ucf101: the folder
               must exist and hold images.
    causal_lm  ``text_data.load_splits``: local jsonl files are read and checked; hub datasets are
               fetched through ``datasets`` into its cache.
    instruct   ``instruct_data.load_records`` and the benchmark files, the same way.
    synthetic  nothing.

Offline, a download fails fast with one line naming ``task.root`` and what to put there. Trials on
other nodes read the same ``task.root``: on a multi-node cluster it must be a shared folder (or
staged on every node).
"""

from __future__ import annotations

import socket
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig
from decaf_ray.plan import RunFailed

DOWNLOADED = ("flowers102", "food101", "fashion_mnist")
"""CLIP datasets torchvision downloads (the others are bundled or local folders)."""
LOCK_NAME = ".decaf-ray-staging.lock"


class StagingTimeout(RunFailed):
    """Another process held a data root's staging lock for longer than we would wait."""


def stage(target: Any, *, lock_timeout_s: float = 3600.0, socket_timeout_s: float = 60.0,
          log: Callable[[str], None] | None = None) -> list[str]:
    """Download or check every dataset ``target`` (an ExperimentConfig, a SweepConfig or a list
    of configs) needs.

    Args:
        lock_timeout_s: how long to wait for another process staging the same data root.
        socket_timeout_s: a network read or connect that stalls this long fails the download
            (so an offline machine whose connections hang still ends with one line).
        log: where progress lines go (default: stderr).

    Returns:
        one line per distinct dataset, saying what is ready where.

    Raises:
        ConfigError: a dataset that is missing and cannot be fetched (field ``task.root``, or the
            causal LM's ``task.train_file`` / ``task.hub_dataset``).
    """
    log = log or (lambda line: print(f"decaf-ray: {line}", file=sys.stderr))
    done: dict[tuple, str] = {}
    for cfg in _configs(target):
        key = dataset_key(cfg)
        if key is None or key in done:
            continue
        done[key] = _stage_one(cfg, lock_timeout_s, socket_timeout_s, log)
    return list(done.values())


def _configs(target: Any) -> list[ExperimentConfig]:
    if isinstance(target, ExperimentConfig):
        return [target]
    if hasattr(target, "representatives"):  # a SweepConfig (not imported: sweep imports us)
        return target.representatives()
    return list(target)


def dataset_key(cfg: ExperimentConfig) -> tuple | None:
    """What identifies the data ``cfg`` reads (trials with equal keys share one staging), or
    None when there is nothing to stage."""
    task = cfg.task
    if task.kind == "clip":
        if task.split_file is not None:
            return ("clip-split", task.split_file, str(_root(task)))
        if task.dataset == "digits":
            return None
        return ("clip", task.dataset, str(_root(task)))
    if task.kind == "causal_lm":
        if task.train_file is not None:
            return ("text", task.dataset, task.train_file, task.test_file)
        return ("hub", task.dataset, task.hub_dataset)
    if task.kind == "instruct":
        return ("instruct", task.train_file or task.hub_dataset, task.test_file, task.eval_dir)
    return None


def _root(task) -> Path:
    from decaf_ray.tasks import image_data

    return Path(task.root if task.root is not None else image_data.DEFAULT_ROOT).expanduser()


def _stage_one(cfg: ExperimentConfig, lock_timeout_s: float, socket_timeout_s: float,
               log: Callable[[str], None]) -> str:
    task = cfg.task
    if task.kind == "clip":
        root = _root(task)
        if task.dataset not in DOWNLOADED:  # a local folder: check it, nothing to fetch
            return _load_images(task, root)
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / LOCK_NAME, f"{task.dataset} in {root}", lock_timeout_s, log), \
                _socket_timeout(socket_timeout_s):
            return _load_images(replace(task, download=True), root)
    lock_dir = Path("~/.cache/decaf_ray").expanduser()
    lock_dir.mkdir(parents=True, exist_ok=True)
    name = getattr(task, "dataset", task.kind)
    with _locked(lock_dir / f"{LOCK_NAME}.{name}", f"{name} text data",
                 lock_timeout_s, log), _socket_timeout(socket_timeout_s):
        return _load_text(cfg)


def _load_images(task, root: Path) -> str:
    from decaf_ray.tasks import image_data

    try:
        data = image_data.load(task)
    except FileNotFoundError as e:  # a missing folder, or a dataset not there and not fetched
        raise ConfigError("task.root", f"{task.dataset}: {_one_line(e)}; put the data in "
                          f"{root}") from None
    except OSError as e:  # a download without network (urllib's URLError is an OSError)
        raise _download_failed(task, root, getattr(e, "reason", e)) from None
    except RuntimeError as e:  # torchvision wraps failed mirror downloads (Fashion-MNIST)
        raise _download_failed(task, root, e) from None
    except ValueError as e:  # a split file that does not match the data
        field = "task.split_file" if task.split_file else "task.root"
        raise ConfigError(field, f"{task.dataset}: {_one_line(e)}") from None
    return (f"{task.dataset}: ready in {root} ({len(data.train)} train, {len(data.test)} test "
            f"images, {len(data.class_names)} classes)")


def _download_failed(task, root: Path, why: Any) -> ConfigError:
    return ConfigError("task.root", f"could not download {task.dataset} into {root} "
                       f"({_one_line(why)}); put the data there (torchvision's layout) or stage "
                       "it on a machine with internet access")


def _load_text(cfg: ExperimentConfig) -> str:
    from decaf_ray.tasks import instruct_data, text_data

    task = cfg.task
    seed = task.data_seed if task.data_seed is not None else cfg.seed
    name = getattr(task, "dataset", task.kind)
    try:
        if task.kind == "instruct":
            train, test = instruct_data.load_records(task, seed)
            if task.benchmarks:
                instruct_data.load_benchmarks(task, seed)
        else:
            train, test = text_data.load_splits(task, seed)
    except ConfigError as e:
        raise e.under("task") from None
    except ImportError as e:  # no ``datasets`` library for a hub dataset
        raise ConfigError("task.train_file", _one_line(e)) from None
    except Exception as e:  # hub or network failures, whatever library raised them
        raise ConfigError("task.hub_dataset", f"could not fetch {name} from "
                          f"{task.hub_dataset} ({_one_line(e)}); give task.train_file "
                          "(and test_file) as local jsonl files") from None
    source = task.train_file or task.hub_dataset
    return f"{name}: ready from {source} ({len(train)} train, {len(test)} test rows)"


@contextmanager
def _locked(path: Path, what: str, timeout_s: float, log: Callable[[str], None]):
    """Hold the file lock ``path``; say what we wait for if another process holds it."""
    from filelock import FileLock, Timeout  # a dependency of torch

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting up to {timeout_s:g} s for {path}: another process is staging {what}")
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise StagingTimeout(f"{path} still locked after {timeout_s:g} s (another process "
                                 f"staging {what}); remove the lock file if that process "
                                 "is gone") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _socket_timeout(seconds: float):
    # urllib (torchvision's downloads) opens sockets without a timeout: an offline machine
    # whose connects hang would wait forever. The default applies to sockets opened meanwhile.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(e: Any) -> str:
    return " ".join(str(e).split()) or type(e).__name__
