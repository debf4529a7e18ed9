"""The one writer of run results, and their readers.

A run directory holds:

- ``config.json``: the resolved config, self-contained (a matrix or edge-list file read into
  it; reads back with ``load_config``);
- ``metrics.csv``: long-form rows ``round, step, agent, metric, value`` (agent -1: network-level),
  appended as the run goes, so a long run can be watched;
- ``summary.json``: status (completed / diverged / interrupted / failed), final network
  metrics, timing, floats sent, trainable parameters;
- ``adapters.safetensors``: every agent's final factors, keys ``agent{i}/{module}/A|B``
  (safetensors: reading it back executes no code);
- ``base_delta.safetensors``: for an algorithm that folds into the base weights (``fedex``,
  ``flora``), S, keys ``{module}`` ((d, k) float32): the run's frozen weights are W0 + S, its
  model W0 + S + s B A;
- ``generations.jsonl``: what the task generated at the final evaluation (the instruct task's
  benchmark answers, and the judge's verdicts where one judged them), one record a line;
- ``checkpoint/state.pt``: the latest ``RunState`` (every ``runtime.checkpoint_every`` rounds
  and where an interrupted run stopped), what ``decaf-ray run --resume DIR`` continues from.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig, load_config, self_contained
from decaf_ray.plan import Row, RunResult
from decaf_ray.factors import Factors
from decaf_ray.runtime import checkpoint
from decaf_ray.runtime.loop import RunState
from decaf_ray.versions import versions

COLUMNS = ("round", "step", "agent", "metric", "value")
BASE_DELTA = "base_delta.safetensors"
CHECKPOINT = Path("checkpoint") / checkpoint.FILE


def check_out_dir(out: Path) -> None:
    """Refuse, before anything is built or written, an output folder that is not empty or could
    not be made: its nearest existing ancestor must be a writable folder. (A run's ``--out``,
    an export's.)"""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError("--out", f"{out} exists and is not an empty directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError("--out", f"{out}: cannot write it ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("--out", f"{out}: cannot write it (no write permission in {parent})")


class RunWriter:
    """Streams one run into ``out``; ``open`` refuses a non-empty directory."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self._csv = None

    def open(self, cfg: ExperimentConfig, rows: list[Row] | None = None,
             overwrite: bool = False) -> "RunWriter":
        """Create the directory and write the config; ``rows`` (a resumed run's rows so far)
        start metrics.csv. ``overwrite`` writes into a non-empty directory (a Tune trial's, a
        resumed run's)."""
        if not overwrite:
            check_out_dir(self.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("--out", f"{self.out}: cannot make it ({e.strerror})") from None
        # self-contained: a matrix or edge-list file is read into it
        (self.out / "config.json").write_text(
            json.dumps(self_contained(cfg).to_dict(), indent=2) + "\n")
        self._file = open(self.out / "metrics.csv", "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._csv.writeheader()
        if rows:
            self.rows(rows)
        return self

    def rows(self, rows: list[Row]) -> None:
        self._csv.writerows(rows)
        self._file.flush()

    def checkpoint(self, state: RunState) -> None:
        """Keep ``state`` as the run's latest checkpoint (written whole or not at all)."""
        checkpoint.save(state, self.out / CHECKPOINT)

    def close(self, result: RunResult) -> None:
        self._file.close()
        summary = dict(result.summary)
        if result.status == "interrupted":
            summary["resume"] = f"decaf-ray run --resume {self.out}"
        else:  # ended: nothing to resume, and a large model's optimizer state is big
            shutil.rmtree(self.out / CHECKPOINT.parent, ignore_errors=True)
        _write_json(self.out / "summary.json", summary)
        save_adapters(self.out / "adapters.safetensors", result.factors)
        if result.base_delta is not None:
            save_file({n: d.detach().cpu().contiguous() for n, d in result.base_delta.items()},
                      str(self.out / BASE_DELTA))
            readable_like_the_rest(self.out / BASE_DELTA)
        if result.generations:
            with open(self.out / "generations.jsonl", "w") as f:
                f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in result.generations)

    def stop(self) -> None:
        """An interrupted run (to be resumed): the rows so far stay, no summary is written."""
        if self._csv is not None:
            self._file.close()
            self._csv = None

    def fail(self, error: BaseException) -> None:
        """Record why a run stopped without a result: the rows so far stay. An interruption
        (``KeyboardInterrupt``: a second Ctrl-C, or a run that cannot stop between rounds) is
        ``interrupted`` at the last checkpoint, anything else ``failed``."""
        self.stop()
        if isinstance(error, KeyboardInterrupt):
            saved = self.out / CHECKPOINT
            at = checkpoint.load(saved).round if saved.is_file() else 0
            summary = {"status": "interrupted", "rounds_completed": at,
                       "resume": f"decaf-ray run --resume {self.out}"}
        else:
            summary = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        _write_json(self.out / "summary.json", {**summary, "versions": versions()})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # NaN/inf are not JSON: a diverged metric is written as null.
    clean = json.loads(json.dumps(data, default=str), parse_constant=lambda _: None)
    path.write_text(json.dumps(_finite(clean), indent=2) + "\n")


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def save_adapters(path: str | Path, adapters: dict[int, Factors]) -> None:
    """Write every agent's factors as one safetensors file."""
    # clone: the FA variants share one frozen A between agents, and safetensors refuses
    # tensors that share memory
    tensors = {f"agent{i}/{name}/{part}": t.detach().cpu().clone()
               for i, f in adapters.items() for name, (a, b) in f.items()
               for part, t in (("A", a), ("B", b))}
    save_file(tensors, str(path))
    readable_like_the_rest(Path(path))


def readable_like_the_rest(path: Path) -> None:
    """safetensors creates its files 0600; give ``path`` the mode every other file of a run gets
    (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def load_adapters(path: str | Path) -> dict[int, Factors]:
    """Read ``save_adapters``' file back: agent -> {module: (A, B)}."""
    parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in load_file(str(path)).items():
        agent, rest = key.split("/", 1)
        name, part = rest.rsplit("/", 1)
        parts.setdefault(int(agent[5:]), {}).setdefault(name, {})[part] = t
    return {i: {n: (p["A"], p["B"]) for n, p in mods.items()} for i, mods in sorted(parts.items())}


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run directory was made with."""
    return load_config(json.loads((Path(run_dir) / "config.json").read_text()))


def load_checkpoint(run_dir: str | Path) -> RunState | None:
    """The latest checkpoint of a run directory, or None when it has none yet."""
    path = Path(run_dir) / CHECKPOINT
    return checkpoint.load(path) if path.is_file() else None
