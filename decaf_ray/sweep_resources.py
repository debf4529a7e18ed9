"""What a sweep's trials ask of the cluster, and whether the cluster can ever give it.

A trial reserves one placement group (``trial_resources``): a sliver for its own process (the
run's driver) and one bundle per host. A null ``runtime.cpus_per_host`` is resolved once, in the
sweep's driver, to the cluster's share, as a single run does (``host_share``), and the trial runs
with that value, so its hosts fit the bundles it reserved. ``check_fits`` refuses, before
anything is placed, a trial that no state of the live cluster could hold (Ray would leave it
pending forever).
"""

from __future__ import annotations

from typing import Any

from decaf_ray.experiment_config import ExperimentConfig, load_config

DRIVER_CPUS = 0.01
"""What a trial's own process (the run's driver) reserves: it only follows the run."""


def trial_config(sweep, params: dict[str, Any],
                 cluster_cpus: float | None = None) -> ExperimentConfig:
    """The config a trial of ``sweep`` (a ``SweepConfig``) runs: ``config_for(params)`` with a null ``runtime.cpus_per_host``
    resolved to the cluster's share (``host_share``) and, for CLIP, ``task.download: false``
    (``run_sweep`` staged the data; trials never download). The trial's bundles
    (``trial_resources``) and its hosts both read this config, so they always agree."""
    cfg = sweep.config_for(params)
    sets = []
    if cfg.runtime.kind == "ray" and cfg.runtime.cpus_per_host is None:
        sets.append(f"runtime.cpus_per_host={host_share(cfg, cluster_cpus)!r}")
    if cfg.task.kind == "clip" and cfg.task.download:
        sets.append("task.download=false")
    return load_config(cfg.to_dict(), sets) if sets else cfg


def host_share(cfg: ExperimentConfig, cluster_cpus: float | None) -> float:
    """CPUs per host (or Ray Train worker) when ``cpus_per_host`` is null: as a single run
    (``ray_runtime._cpus_per_host``), the cluster's CPUs shared evenly, at most 1, after the
    trial driver's sliver; 1 when the cluster is not known."""
    if cluster_cpus is None:
        return 1.0
    from decaf_ray.placement import cpu_share

    # never 0 (not a valid cpus_per_host): on a cluster without CPUs, check_fits says so
    return max(cpu_share(cluster_cpus, _hosts(cfg), reserved=DRIVER_CPUS), DRIVER_CPUS)


def _hosts(cfg: ExperimentConfig) -> int:
    from decaf_ray.placement import host_count

    if _centralized(cfg):
        return cfg.runtime.train_workers
    return host_count(cfg.agents, cfg.runtime.agents_per_host)


def trial_resources(cfg: ExperimentConfig):
    """The placement group one trial reserves: a sliver for its driver, then one bundle per
    host (CPUs and GPUs); one bundle for an in-process trial (``threads`` CPUs and
    ``gpus_per_host`` GPUs: a trial uses only the GPUs it reserved); only the sliver for
    Centralized on Ray, whose Ray Train workers reserve their own."""
    from ray import tune

    if cfg.runtime.kind == "inprocess":  # the trial's process is the one host
        own = {"CPU": float(cfg.runtime.threads or 1)}
        if cfg.runtime.gpus_per_host:
            own["GPU"] = cfg.runtime.gpus_per_host
        return tune.PlacementGroupFactory([own])
    if _centralized(cfg):  # Ray Train places its own workers; the trial is only their driver
        return tune.PlacementGroupFactory([{"CPU": DRIVER_CPUS}])
    return tune.PlacementGroupFactory([{"CPU": DRIVER_CPUS}] + [_host(cfg)] * _hosts(cfg))


def _host(cfg: ExperimentConfig) -> dict[str, float]:
    """One host's (or Ray Train worker's) bundle."""
    rt = cfg.runtime
    host = {"CPU": rt.cpus_per_host if rt.cpus_per_host is not None else 1.0}
    if rt.gpus_per_host:
        host["GPU"] = rt.gpus_per_host
    return host


def _centralized(cfg: ExperimentConfig) -> bool:
    from decaf_ray.algorithms import ALGORITHMS

    return ALGORITHMS[cfg.algorithm].centralized


def check_fits(sweep, nodes: list[dict[str, float]],
               cluster_cpus: float | None = None) -> None:
    """Raise ``ConfigError`` when some trial of ``sweep`` could never be placed on ``nodes``
    (``placement.nodes()``): its bundles (``trial_resources``, or a Centralized trial's Ray Train
    workers) against the nodes, naming the config field and the numbers. Fewer trials at once
    (``--max-concurrent``) are always possible, so only one trial at a time is checked."""
    from decaf_ray import placement

    seen = set()
    for params in sweep.representative_params():
        cfg = trial_config(sweep, params, cluster_cpus)
        rt = cfg.runtime
        if rt.kind == "inprocess":
            bundles = trial_resources(cfg).bundles
            field = {"CPU": "runtime.threads", "GPU": "runtime.gpus_per_host"}
            what = f"an in-process trial of {placement.fmt(bundles[0])}"
        else:
            host = _host(cfg)
            bundles = [{"CPU": DRIVER_CPUS}] + [host] * _hosts(cfg)
            field = {"CPU": "runtime.cpus_per_host", "GPU": "runtime.gpus_per_host"}
            kind = "Ray Train workers" if _centralized(cfg) else "hosts"
            what = f"a trial of {_hosts(cfg)} {kind} x {placement.fmt(host)}"
        key = (tuple(tuple(sorted(b.items())) for b in bundles), what)
        if key in seen:
            continue
        seen.add(key)
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        placement.check(bundles, nodes, field, what + (f" ({shown})" if shown else ""))
