"""Sweeps with Ray Tune: one trial = one experiment, run by the very ``experiment.run`` a single
run uses.

A sweep file is a base experiment config plus a ``grid`` of dotted keys to vary:

    name: fig3a-cpu
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

Each trial writes a normal run directory (config.json, metrics.csv, summary.json, adapters) in
its Tune trial folder, so ``analysis.load`` reads a sweep like a run. Each trial reserves its
hosts through a placement group, so concurrent trials never oversubscribe the cluster.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from decaf_ray.config import (ConfigError, ExperimentConfig, apply_override, from_dict,
                              load_config, read_yaml)

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
    for point in sweep.points():
        try:
            sweep.config_for({**point, **_sample_lows(sweep.grid)})
        except ConfigError as e:
            raise ConfigError(f"grid {point}: {e.field}", e.message) from None
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


def trial_resources(cfg: ExperimentConfig):
    """The placement group one trial reserves: a sliver for its driver, then one bundle per
    host (CPUs and GPUs); one bundle for an in-process trial; only the sliver for Centralized on
    Ray, whose Ray Train workers reserve their own."""
    from ray import tune

    if cfg.runtime.kind == "inprocess":
        return tune.PlacementGroupFactory([{"CPU": float(cfg.runtime.threads or 1)}])
    if _centralized(cfg):  # Ray Train places its own workers; the trial is only their driver
        return tune.PlacementGroupFactory([{"CPU": 0.01}])
    hosts = -(-cfg.agents // cfg.runtime.agents_per_host)
    host = {"CPU": _host_cpus(cfg)}
    if cfg.runtime.gpus_per_host:
        host["GPU"] = cfg.runtime.gpus_per_host
    return tune.PlacementGroupFactory([{"CPU": 0.01}] + [host] * hosts)


def _centralized(cfg: ExperimentConfig) -> bool:
    from decaf_ray.algorithms import ALGORITHMS

    return ALGORITHMS[cfg.algorithm].centralized


def _host_cpus(cfg: ExperimentConfig) -> float:
    return cfg.runtime.cpus_per_host if cfg.runtime.cpus_per_host is not None else 1.0


# ------------------------------------------------------------------ the trial


def trial(params: dict[str, Any], sweep: SweepConfig) -> None:
    """One Tune trial: ``experiment.run`` on the trial's config, streaming network metrics to
    Tune, checkpointing every ``sweep.checkpoint_every`` rounds, resuming from the last one."""
    from ray import tune

    from decaf_ray.experiment import run
    from decaf_ray.results import RunWriter

    cfg = sweep.config_for(params)
    if cfg.runtime.kind == "ray":  # hosts must fit the bundles this trial reserved
        cfg = load_config(cfg.to_dict(), [f"runtime.cpus_per_host={_host_cpus(cfg)}"])
    out = Path(tune.get_context().get_trial_dir())
    resume = _load_state(tune.get_checkpoint())
    writer = RunWriter(out).open(cfg, rows=resume.rows if resume else None, overwrite=True)
    every, latest = sweep.checkpoint_every, {}

    def on_rows(rows):
        writer.rows(rows)
        latest.update(_network(rows))
        rnd = rows[0]["round"]
        if rnd % every and rnd < cfg.rounds:  # checkpoint rounds report with the checkpoint,
            tune.report(dict(latest))         # the last round with the summary below

    def on_checkpoint(state):
        with tempfile.TemporaryDirectory() as d:
            torch.save(_plain(state), os.path.join(d, "state.pt"))
            tune.report({**latest, "round": state.round},
                        checkpoint=tune.Checkpoint.from_directory(d))

    try:
        result = run(cfg, progress=False, resume=resume, checkpoint_every=every,
                     on_rows=on_rows, on_checkpoint=on_checkpoint)
    except BaseException as e:
        writer.fail(e)
        raise
    writer.close(result)
    tune.report({**result.summary["final"], "round": result.summary["rounds_completed"],
                 "status": result.status})


def _network(rows: list[dict]) -> dict[str, Any]:
    out = {r["metric"]: r["value"] for r in rows if r["agent"] == -1}
    out["round"] = rows[0]["round"]
    return out


def _plain(state) -> dict:
    """A RunState as tensors, lists, dicts and numbers only: loadable with weights_only=True."""
    import numpy as np

    def conv(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x.copy())
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return {"round": state.round, "step": state.step, "rows": state.rows,
            "agents": conv(state.agents)}


def _load_state(checkpoint):
    """The RunState in a trial checkpoint (safe load: no code runs), or None."""
    if checkpoint is None:
        return None
    from decaf_ray.runtime.loop import RunState

    with checkpoint.as_directory() as d:
        data = torch.load(os.path.join(d, "state.pt"), weights_only=True)
    agents = {int(i): _revive(st) for i, st in data["agents"].items()}
    return RunState(data["round"], data["step"], data["rows"], agents)


def _revive(state: dict) -> dict:
    """Undo ``_plain`` where types matter: factor pairs are tuples, sampler arrays numpy."""
    tup = lambda tree: {n: (a, b) for n, (a, b) in tree.items()}
    out = dict(state)
    out["factors"] = tup(state["factors"])
    opt = {}
    for k, v in state["opt_state"].items():
        opt[k] = tup(v) if isinstance(v, dict) else v
    out["opt_state"] = opt
    sampler = dict(state["sampler"])
    sampler["order"] = sampler["order"].numpy()
    out["sampler"] = sampler
    return out


# ------------------------------------------------------------------ the sweep


def run_sweep(sweep: SweepConfig, storage: str | Path, *, resume: bool = False,
              max_concurrent: int | None = None):
    """Run (or ``resume``) a sweep under ``storage/<name>``; returns Tune's ResultGrid."""
    from ray import tune

    from decaf_ray.runtime.ray_runtime import connect

    connect()
    storage = Path(storage).resolve()
    trainable = tune.with_resources(tune.with_parameters(trial, sweep=sweep),
                                    lambda params: trial_resources(sweep.config_for(params)))
    path = storage / sweep.name
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError("--resume", f"no sweep to resume at {path}")
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        if path.exists() and any(path.iterdir()):
            raise ConfigError("--storage", f"{path} already holds a sweep; use --resume to "
                              "finish it or choose another --storage / name")
        tuner = tune.Tuner(
            trainable, param_space=param_space(sweep),
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples,
                                        max_concurrent_trials=max_concurrent or sweep.max_concurrent),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage),
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=1))
    return tuner.fit()
