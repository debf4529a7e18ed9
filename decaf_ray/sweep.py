"""Sweeps with Ray Tune: one trial = one experiment, run by the very ``experiment.run`` a single
run uses.

A sweep file is a base experiment config plus a ``grid`` of dotted keys to vary:

    name: rank-study
    base: {...an experiment config...}      # or a path to one, relative to this file
    grid:
      lora.rank: [1, 2, 4, 8]               # a list: every value (grid search)
      seed: [0, 1, 2]
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}   # or a random space: uniform, loguniform,
                                                 # randint, choice
      agents,local_steps: [[10, 13], [20, 7]]    # keys joined by commas vary together
    num_samples: 1                          # draws of the random spaces per grid point
    metric: test_accuracy
    mode: max
    checkpoint_every: 10                    # rounds between trial checkpoints

Each trial writes a normal run directory (config.json, metrics.csv, summary.json, adapters) on
its own node and uploads it to its Tune trial folder in the sweep's storage (a folder or a
``s3://``/``gs://``/``file://`` URI; see ``sweep_storage``), so ``analysis.load`` reads a sweep like
a run whichever nodes ran it. Each trial reserves its hosts through a placement group, so
concurrent trials never oversubscribe the cluster; before anything starts, ``run_sweep`` stages
the data once (``staging``) and refuses a trial that no node set of the live cluster could place.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from decaf_ray.config import (ConfigError, apply_override, first_difference, from_dict,
                              read_yaml, require_name)
from decaf_ray.experiment_config import ExperimentConfig, load_config
from decaf_ray.runtime import checkpoint
from decaf_ray.sweep_resources import check_fits, trial_config, trial_resources

RECORD = "decaf_ray_sweep.json"
"""The sweep as started, beside Tune's files in its storage folder."""
SPACES = ("uniform", "loguniform", "randint", "choice")


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep file (see the module docstring)."""

    name: str
    base: dict[str, Any]
    grid: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = "test_accuracy"
    mode: Literal["max", "min"] = "max"
    checkpoint_every: int = 10
    max_concurrent: int | None = None

    def __post_init__(self):
        require_name(self.name, "name")
        if self.num_samples < 1:
            raise ConfigError("num_samples", "must be >= 1")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every", "must be >= 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError("max_concurrent", "must be >= 1 or null")
        for key, value in self.grid.items():
            if isinstance(value, list):
                if not value:
                    raise ConfigError(f"grid.{key}", "an empty list gives no trial")
            elif not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SPACES):
                raise ConfigError(f"grid.{key}", f"give a list of values or one of "
                                  f"{{{', '.join(SPACES)}: [...]}}")

    def points(self) -> list[dict[str, Any]]:
        """Every grid point (lists only), as {dotted key: value}."""
        lists = {k: v for k, v in self.grid.items() if isinstance(v, list)}
        return [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]

    def representative_params(self) -> list[dict[str, Any]]:
        """One parameter set per grid point and value of each ``choice`` space, the other random
        spaces at their low end: what validation, staging and the fit check look at."""
        choices = {k: v["choice"] for k, v in self.grid.items()
                   if isinstance(v, dict) and "choice" in v}
        lows = _sample_lows({k: v for k, v in self.grid.items() if k not in choices})
        return [{**point, **lows, **dict(zip(choices, combo))}
                for point in self.points() for combo in itertools.product(*choices.values())]

    def representatives(self) -> list[ExperimentConfig]:
        """``config_for`` of every ``representative_params``."""
        return [self.config_for(p) for p in self.representative_params()]

    def config_for(self, params: dict[str, Any]) -> ExperimentConfig:
        """The experiment config of one trial: the base with ``params`` set."""
        data = self.base
        for key, value in params.items():
            keys = key.split(",")
            values = value if len(keys) > 1 else [value]
            if len(values) != len(keys):
                raise ConfigError(f"grid.{key}", f"each value must list {len(keys)} items")
            for k, v in zip(keys, values):
                data = apply_override(data, f"{k}={_yaml_scalar(v)}")
        return load_config(data)


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def is_sweep_file(path: str | Path) -> bool:
    """Whether the YAML at ``path`` is a sweep file (it has a ``grid`` or a ``base``)."""
    data = read_yaml(path)
    return isinstance(data, dict) and ("grid" in data or "base" in data)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep file; every grid point must give a valid experiment config."""
    path = Path(path)
    data = read_yaml(path)
    base = data.get("base")
    if isinstance(base, str):
        base = read_yaml(path.parent / base)
    if not isinstance(base, dict):
        raise ConfigError("base", "must be an experiment config mapping or a path to one")
    for item in overrides or []:
        base = apply_override(base, item)
    sweep = from_dict(SweepConfig, {**data, "base": base, "name": data.get("name", path.stem)})
    for params in sweep.representative_params():
        try:
            sweep.config_for(params)
        except ConfigError as e:
            raise ConfigError(f"grid {params}: {e.field}", e.message) from None
    return sweep


def _sample_lows(grid: dict[str, Any]) -> dict[str, Any]:
    """One representative value of each random space, to validate the keys it sets."""
    out = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            kind, args = next(iter(value.items()))
            out[key] = args[0]
    return out


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's search space: lists become ``grid_search``, spaces their Tune sampler."""
    from ray import tune

    space = {}
    for key, value in sweep.grid.items():
        if isinstance(value, list):
            space[key] = tune.grid_search(value)
        else:
            kind, args = next(iter(value.items()))
            space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return space


UPLOAD_EVERY_S = 10.0
"""Least seconds between uploads of a trial's metrics as it runs (checkpoints and the end always
upload)."""


# ------------------------------------------------------------------ the trial


def trial(params: dict[str, Any], sweep: SweepConfig, cluster_cpus: float | None = None,
          shipped=None) -> None:
    """One Tune trial: ``experiment.run`` on the trial's config, streaming network metrics to
    Tune, checkpointing every ``sweep.checkpoint_every`` rounds, resuming from the last one.

    The run directory is written on this node and uploaded to the trial's folder in the sweep's
    storage as it goes, at each checkpoint and at the end (also when the run fails)."""
    from decaf_ray.devices import hide_unassigned_gpus

    hide_unassigned_gpus()  # the trial reserved no GPU (its hosts did): it must not take one
    # Tune starts a trial in its trial folder; relative paths in the config (task.train_file,
    # task.eval_dir, ...) mean what they mean to `decaf-ray run`: the job's working directory.
    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    from ray import tune

    from decaf_ray.experiment import run
    from decaf_ray.results import RunWriter
    from decaf_ray.sweep_storage import TrialUpload

    from decaf_ray.experiment_config import load_config
    from decaf_ray.runtime.weights import receive

    cfg = trial_config(sweep, params, cluster_cpus)
    if shipped is not None:  # the driver's checkpoint bytes, as a file on this node
        cfg = load_config(receive(cfg.to_dict(), shipped))
    upload = TrialUpload.for_current_trial()
    resume = _load_state(tune.get_checkpoint())
    upload.remove("summary.json")  # an earlier attempt's; this one is running
    writer = RunWriter(upload.local).open(cfg, rows=resume.rows if resume else None,
                                          overwrite=True)
    upload.sync()
    every, latest = sweep.checkpoint_every, {}

    def on_rows(rows):
        writer.rows(rows)
        upload.sync(every_s=UPLOAD_EVERY_S)
        latest.update(_network(rows))
        rnd = rows[0]["round"]
        if rnd % every and rnd < cfg.rounds:  # checkpoint rounds report with the checkpoint,
            tune.report(dict(latest))         # the last round with the summary below

    def on_checkpoint(state):
        upload.sync()
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save(state, os.path.join(d, checkpoint.FILE))
            tune.report({**latest, "round": state.round},
                        checkpoint=tune.Checkpoint.from_directory(d))

    try:
        result = run(cfg, progress=False, resume=resume, checkpoint_every=every,
                     on_rows=on_rows, on_checkpoint=on_checkpoint)
    except Exception as e:
        writer.fail(e)
        _sync_after_failure(upload)
        raise
    except BaseException:  # interrupted (Ctrl-C, cancelled): not a failure, --resume goes on
        writer.stop()
        _sync_after_failure(upload)
        raise
    writer.close(result)
    upload.sync()  # before the last report: when Tune sees the trial end, its files are there
    tune.report({**result.summary["final"], "round": result.summary["rounds_completed"],
                 "status": result.status})


def _sync_after_failure(upload) -> None:
    """Upload what a stopped trial wrote; an upload error must not hide why the trial stopped."""
    try:
        upload.sync()
    except Exception as e:
        print(f"decaf-ray: could not upload {upload.local} to {upload.fs_path}: {e}",
              file=sys.stderr)


def _network(rows: list[dict]) -> dict[str, Any]:
    out = {r["metric"]: r["value"] for r in rows if r["agent"] == -1}
    out["round"] = rows[0]["round"]
    return out


def _load_state(found):
    """The RunState in a Tune trial checkpoint (safe load: no code runs), or None."""
    if found is None:
        return None
    with found.as_directory() as d:
        return checkpoint.load(os.path.join(d, checkpoint.FILE))


# ------------------------------------------------------------------ the sweep


def run_sweep(sweep: SweepConfig, storage: str | Path, *, resume: bool = False,
              max_concurrent: int | None = None, stage_data: bool = True, force: bool = False):
    """Run (or ``resume``) a sweep under ``<storage>/<name>``; returns Tune's ResultGrid.

    ``storage``: a local or shared folder, or a pyarrow filesystem URI (``s3://bucket/x``,
    ``gs://...``, ``file:///...``). Before any trial starts: a new sweep refuses storage that
    already holds one, every trial's resources are checked against the live cluster
    (``check_fits``), and the data are staged once (``staging.stage``; ``stage_data=False``
    skips it).

    The sweep as given (base, grid, overrides applied) is kept beside Tune's files as
    ``decaf_ray_sweep.json``; ``resume`` refuses a sweep that differs from it unless ``force``,
    so unfinished trials never run under another config than the finished ones.

    Raises:
        ConfigError: storage that holds a sweep (or none to ``resume``), a bad URI, a trial that
            can never be placed, data that are missing and cannot be fetched, a changed sweep
            on ``resume``.
    """
    from ray import tune

    from decaf_ray import placement, sweep_storage

    root = sweep_storage.location(storage)
    path = sweep_storage.sweep_location(storage, sweep.name)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError("--resume", f"no sweep to resume at {path}")
        _same_as_recorded(sweep, None, path, force)  # before Ray starts, where it can tell
    elif sweep_storage.holds_anything(path):
        raise ConfigError("--storage", f"{path} already holds a sweep; use --resume to "
                          "finish it or choose another --storage / name")
    placement.connect()
    nodes = placement.nodes()
    cluster_cpus = sum(n["CPU"] for n in nodes)
    check_fits(sweep, nodes, cluster_cpus)
    from decaf_ray.judge import check as check_judge

    for cfg in sweep.representatives():  # a judge without its key or server: now, not after
        check_judge(cfg)                  # hours of training
    given = sweep
    sweep, shipped = _resolve_weights(sweep)
    if resume:
        _same_as_recorded(given, sweep, path, force)
    if stage_data:
        from decaf_ray.staging import stage

        stage(sweep)
    if not resume:  # as given: a ``pretrain:`` stand-in's cache path is this machine's
        sweep_storage.write_text(f"{path}/{RECORD}", json.dumps(_plain(given), indent=2))
    trainable = tune.with_resources(
        tune.with_parameters(trial, sweep=sweep, cluster_cpus=cluster_cpus, shipped=shipped),
        lambda params: trial_resources(trial_config(sweep, params, cluster_cpus)))
    if resume:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(sweep),
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples,
                                        max_concurrent_trials=max_concurrent or sweep.max_concurrent),
            run_config=tune.RunConfig(name=sweep.name, storage_path=root,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      # resuming reads a trial's last checkpoint only; keeping
                                      # all grew a stand-in trial by 3 MB per checkpoint
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      verbose=1))
    return tuner.fit()


def _plain(sweep: SweepConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(sweep), default=str))


def _same_as_recorded(given: SweepConfig, resolved: SweepConfig | None, path: str,
                      force: bool) -> None:
    """Refuse to resume ``given`` when it differs from the one recorded at ``path``. The record
    holds the sweep as given; one written by an older decaf-ray holds it with its ``pretrain:``
    stand-in resolved to a cache path (``resolved``, ``_resolve_weights``), and matches too.
    Before the stand-in is resolved (``resolved`` None) a record whose task weights differ
    from ``given``'s is left to the check after it."""
    from decaf_ray import sweep_storage

    text = sweep_storage.read_text(f"{path}/{RECORD}")
    if text is None or force:
        return  # a sweep recorded before this file existed, or the user's explicit choice
    recorded, plain = json.loads(text), _plain(given)
    if recorded != plain and resolved is None:
        weights = lambda d: [d["base"].get("task", {}).get(k) for k in ("checkpoint",
                                                                        "model_config")]
        if weights(recorded) != weights(plain):
            return
    if recorded != plain and (resolved is None or recorded != _plain(resolved)):
        diff = first_difference(recorded, plain)
        raise ConfigError("--resume", f"the sweep differs from the one being resumed ({diff}); "
                          "resume with the same file and --set, or add --force to finish it "
                          "with these")


def _resolve_weights(sweep: SweepConfig):
    """The sweep with a ``pretrain:`` stand-in resolved once, here in the driver (trained on a
    cache miss), and its checkpoint file shipped through the object store to every trial
    (``runtime.weights``), so that no trial trains and all load the same bytes. A grid that
    varies the checkpoint is resolved point by point into the driver's cache instead (trials on
    this node read it; other nodes need a shared cache folder)."""
    from decaf_ray.pretrain import resolve_checkpoint
    from decaf_ray.runtime import weights

    if any("task.checkpoint" in key.split(",") or "task.model_config" in key.split(",")
           for key in sweep.grid):
        for params in sweep.representative_params():  # every grid point and choice
            resolve_checkpoint(sweep.config_for(params))
        return sweep, None
    first = sweep.config_for({**(sweep.points() or [{}])[0], **_sample_lows(sweep.grid)})
    resolved = resolve_checkpoint(first)
    if resolved is first:
        return sweep, weights.ship(first)
    task = {**sweep.base["task"], "checkpoint": resolved.task.checkpoint,
            "model_config": resolved.task.model_config}
    return dataclasses.replace(sweep, base={**sweep.base, "task": task}), weights.ship(resolved)
