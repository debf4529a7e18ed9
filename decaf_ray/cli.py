"""``decaf-ray``: run, describe and plot experiments. Thin: build, run, save.

Bad input exits with status 2 and one line on stderr naming the field; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import yaml

from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig, load_config
from decaf_ray.cli_run import warnings_for, cmd_run
from decaf_ray.plan import RunFailed


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"decaf-ray: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"decaf-ray: error: run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("decaf-ray: interrupted", file=sys.stderr)
        return 130
    except (ImportError, FileNotFoundError) as e:  # a missing package or data file
        print(f"decaf-ray: error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}",
              file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decaf-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sets = dict(action="append", default=[], metavar="KEY=VALUE",
                help="override a config key, e.g. --set lora.rank=8 (repeatable)")

    run = sub.add_parser("run", help="run one experiment and save its results")
    run.add_argument("config", nargs="?")
    run.add_argument("--set", dest="overrides", **sets)
    run.add_argument("--out", help="results directory (default runs/<name>-<time>)")
    run.add_argument("--resume", metavar="DIR", default=None,
                     help="continue an interrupted or killed run in its directory")
    run.add_argument("--force", action="store_true",
                     help="with --resume: continue with a CONFIG/--set that differ from the run's")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    desc = sub.add_parser("describe", help="print the resolved config, graph and data facts")
    desc.add_argument("config")
    desc.add_argument("--set", dest="overrides", **sets)
    desc.add_argument("--cluster", default=None, metavar="SPEC",
                      help="size trials for NODESxGPUSxTYPE-MEMGB[-CPUSCPU], e.g. 2x8xA100-80GB "
                           "(8 CPUs per GPU unless said); default: the live cluster at "
                           "RAY_ADDRESS, else the file's '# cluster:' line")
    desc.set_defaults(func=cmd_describe)

    sweep = sub.add_parser("sweep", help="run a sweep file with Ray Tune (one trial per config)")
    sweep.add_argument("sweep")
    sweep.add_argument("--set", dest="overrides", **sets)
    sweep.add_argument("--storage", default="runs/sweeps",
                       help="folder or URI (s3://, gs://, file://) where sweeps are written")
    sweep.add_argument("--max-concurrent", type=int, default=None)
    sweep.add_argument("--resume", action="store_true",
                       help="finish an interrupted sweep (finished trials are not redone)")
    sweep.add_argument("--force", action="store_true",
                       help="with --resume: finish it with a sweep file or --set that changed")
    sweep.set_defaults(func=cmd_sweep)

    data = sub.add_parser("data", help="download or check, once, every dataset a config or "
                                       "sweep needs (decaf-ray sweep does it first)")
    data.add_argument("config")
    data.add_argument("--set", dest="overrides", **sets)
    data.set_defaults(func=cmd_data)

    pre = sub.add_parser("pretrain", help="train a stand-in CLIP foundation model (all weights)")
    pre.add_argument("config")
    pre.add_argument("--set", dest="overrides", **sets)
    pre.add_argument("--out", help="checkpoint directory (default: the decaf-ray cache)")
    pre.set_defaults(func=cmd_pretrain)

    export = sub.add_parser("export", help="write an agent's adapter (or the network "
                                           "average) as a PEFT adapter directory")
    export.add_argument("run", help="a run directory (config.json + adapters.safetensors)")
    export.add_argument("--agent", default="mean",
                        help="an agent's index, or 'mean' (default): the network average "
                             "v-bar, A and B each averaged over the agents, where a run's "
                             "grad_norm is measured")
    export.add_argument("--out", required=True, help="the adapter directory to write")
    export.set_defaults(func=cmd_export)

    plot = sub.add_parser("plot", help="figures and tables from saved runs (a run or a folder)")
    plot.add_argument("results")
    plot.add_argument("--figure", default=None,
                      help="fig2, fig3, table2, table3, table5, table6, table7, theory, bytes, "
                           "labels, rate, tsvd, gap, network, robustness, refactor, "
                           "refactor_table; default: --metric against round for every run")
    plot.add_argument("--metric", default="test_accuracy")
    plot.add_argument("--out", required=True,
                      help="file to write: .png/.pdf/.svg for figures, .md/.tex for tables")
    plot.set_defaults(func=cmd_plot)
    return p


def cmd_describe(args) -> int:
    from decaf_ray import partition, sizing, topology
    from decaf_ray.plan import prepare
    from decaf_ray.factors import param_count

    if _is_sweep(args.config):
        return _describe_sweep(args)
    from decaf_ray.pretrain import resolve_checkpoint

    cfg = resolve_checkpoint(load_config(args.config, args.overrides))
    plan = prepare(cfg)
    cluster = _cluster(args)  # a bad --cluster fails before anything is printed
    print("# resolved config")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    print("\n# graph")
    for k, v in topology.graph_facts(plan.graph, plan.pi).items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    if not plan.schedule.static:  # what the network section makes of the graph, per round
        window = max(1, (plan.agents - 1).bit_length())  # ceil(log2 N): one-peer's period
        print(f"\n# network over {cfg.rounds} rounds (union connectivity over every {window})")
        for k, v in plan.schedule.describe(cfg.rounds, window).items():
            print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    print("\n# label histogram (rows: agents, columns: labels)")
    labels = np.asarray(plan.task.train_labels)
    hist = partition.label_histogram(labels, plan.shards, plan.task.num_classes)
    for i, row in enumerate(hist):
        print(f"agent {i:>3}: {' '.join(f'{c:>4}' for c in row)}  (n={row.sum()})")
    shapes, rank = plan.task.lora_shapes(), cfg.lora.rank
    degrees = [plan.degree(i) for i in range(plan.agents)]
    sent = [plan.algorithm.floats_sent_per_round(shapes, rank, d) for d in degrees]
    print(f"\nadapted_modules: {len(shapes)}")
    print(f"floats_per_message: {plan.algorithm.floats_per_message(shapes, rank)}")
    print(f"floats_sent_per_round_per_agent: min {min(sent)}, mean {np.mean(sent):.6g}, max {max(sent)}")
    print(f"floats_sent_per_round (network, a server's broadcast included): "
          f"{plan.algorithm.network_floats_per_round(shapes, rank, degrees)}")
    print(f"trainable_params: {param_count(shapes, rank, plan.algorithm.train_A)}")
    for line in warnings_for(cfg):
        print(f"warning: {line}")
    try:
        lines = _resource_lines(sizing.size_trial(cfg, plan.task), cluster)
    except (ConfigError, ImportError, OSError) as e:  # the run is valid; only sizing failed
        lines = [f"not estimated ({str(e).splitlines()[0]})"]
    print(f"\n# resources{_on(cluster)}")
    print("\n".join(lines))
    return 0


def _cluster(args):
    """The cluster ``describe`` sizes for: --cluster, else the live cluster at RAY_ADDRESS,
    else the ``# cluster:`` line of the file, else None (per-trial figures only)."""
    import os

    from decaf_ray import packing

    if args.cluster is not None:
        return packing.parse_cluster(args.cluster)
    if os.environ.get("RAY_ADDRESS"):
        return packing.live_cluster()
    stated = packing.stated_cluster(args.config)
    if stated is None:
        return None
    cluster = packing.parse_cluster(stated)
    return dataclasses.replace(cluster, label=f"{cluster.label} (the file's '# cluster:' line)")


def _on(cluster) -> str:
    return "" if cluster is None else f" on {cluster.label}"


def _is_sweep(path: str) -> bool:
    from decaf_ray.sweep import is_sweep_file

    return is_sweep_file(path)


def _describe_sweep(args) -> int:
    """A sweep file: its grid points (each validated) and the keys sampled at random."""
    from decaf_ray.sweep import load_sweep

    sweep = load_sweep(args.config, args.overrides)
    points = sweep.points()
    cluster = _cluster(args)  # a bad --cluster fails before anything is printed
    spaces = [k for k, v in sweep.grid.items() if not isinstance(v, list)]
    print(f"# sweep {sweep.name}: {len(points)} grid points x {sweep.num_samples} samples"
          + (f"; sampled: {', '.join(spaces)}" if spaces else ""))
    for point in points:
        print("  " + ", ".join(f"{k}={v}" for k, v in point.items()))
    _describe_sweep_resources(sweep, points, cluster)
    return 0


def _describe_sweep_resources(sweep, points, cluster) -> None:
    """Per distinct trial shape: the grid values that give it, then its ``describe`` block."""
    from decaf_ray import sizing

    lows = {k: next(iter(v.values()))[0] for k, v in sweep.grid.items() if not isinstance(v, list)}
    shapes: dict = {}
    try:
        for point in points:
            shapes.setdefault(sizing.size_trial(sweep.config_for({**point, **lows})), []).append(point)
    except (ConfigError, ImportError, OSError) as e:  # the sweep is valid; only sizing failed
        print(f"\n# resources per trial: not estimated ({str(e).splitlines()[0]})")
        return
    cap = f"; max_concurrent {sweep.max_concurrent} caps trials at once" if sweep.max_concurrent else ""
    print(f"\n# resources per trial{_on(cluster)}: {len(shapes)} distinct shape(s){cap}")
    for trial, members in shapes.items():
        print(f"\n## {len(members) * sweep.num_samples} trial(s): {_members(members, sweep.grid)}")
        print("\n".join(_resource_lines(trial, cluster)))


def _members(members: list[dict], grid: dict) -> str:
    """The grid values a group of points takes, per key (``any`` where it takes them all)."""
    parts = []
    for key in members[0]:
        seen = [v for i, v in enumerate(p[key] for p in members)
                if v not in [p[key] for p in members][:i]]
        shown = "any" if len(seen) == len(grid[key]) > 1 else " | ".join(map(str, seen))
        parts.append(f"{key}: {shown}")
    return "; ".join(parts) or "the base config"


def _resource_lines(trial, cluster) -> list[str]:
    """The ``describe`` block of one trial shape, and its fit on ``cluster`` if given."""
    from decaf_ray import packing, sizing

    def gb(x: float) -> str:
        return (f"{x / sizing.GB:.2f} GB" if x >= 0.01 * sizing.GB else
                f"{x / 1e6:.2f} MB" if x >= 1e4 else f"{x:,.0f} B")

    cpus, gpus = trial.host
    what = {"hosts": "AgentHost actors", "train_workers": "Ray Train workers (Centralized)",
            "inprocess": "the trial's own process (runtime.kind inprocess)"}[trial.placement]
    lines = [f"model: {trial.model}",
             f"trainable params per agent: {trial.trainable:,}",
             f"hosts: {trial.hosts} ({what}); {trial.agents_per_host} agent(s) per host, "
             f"{trial.batch_agents} per forward pass",
             f"per host: {cpus:g} CPUs, {gpus:g} GPU",
             f"per trial: {trial.cpus:g} CPUs, {trial.gpus:g} GPUs"
             + (f" (incl. the driver's {trial.driver_cpus:g} CPU)" if trial.driver_cpus else ""),
             f"base-model copies: {trial.hosts}",
             f"memory per host ({'GPU' if trial.device == 'cuda' else 'CPU RAM'}, estimate): "
             f"{gb(trial.memory)}"]
    lines += [f"  {p.name}: {gb(p.bytes)} = {p.formula}" for p in trial.parts]
    if cluster is not None:
        fit = packing.fit(trial, cluster)
        if fit.share is not None and not fit.problems:
            lines.append(f"memory fits: {gb(trial.memory)} <= {gb(fit.share)} "
                         f"({min(gpus, 1.0):g} of a {cluster.gpu_memory / sizing.GB:g} GB GPU)")
        elif trial.device == "cuda" and cluster.gpu_memory is None:
            lines.append("memory fit: not checked (Ray does not know a live cluster's GPU "
                         "memory; pass --cluster)")
        lines += list(fit.problems)
        lines.append(f"trials at once: {fit.trials}" + (f" (bound by {fit.bound})" if fit.trials else ""))
    lines.append(f"steps: {trial.steps_per_agent:,} per agent ({trial.rounds} rounds x "
                 f"{trial.local_steps} local steps), {trial.steps_per_agent * trial.training_agents:,}"
                 f" agent-steps ({trial.training_agents} agent(s))")
    return lines


def cmd_sweep(args) -> int:
    from decaf_ray.sweep import load_sweep, run_sweep

    from decaf_ray.sweep_storage import sweep_location

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("--max-concurrent", f"must be >= 1 (got {args.max_concurrent})")
    sweep = load_sweep(args.sweep, args.overrides)
    grid = run_sweep(sweep, args.storage, resume=args.resume, max_concurrent=args.max_concurrent,
                     force=args.force)
    failed = [r for r in grid if r.error is not None]
    # a trial's last report carries its status only when its run ended (sweep.trial)
    unfinished = [r for r in grid if r.error is None and "status" not in (r.metrics or {})]
    where = sweep_location(args.storage, sweep.name)
    print(f"sweep {sweep.name}: {len(grid)} trials, {len(failed)} failed, "
          f"{len(unfinished)} interrupted; results: {where}")
    for r in failed:
        print(f"  failed: {r.path}: {str(r.error).splitlines()[0]}", file=sys.stderr)
    if unfinished:
        print(f"decaf-ray: sweep interrupted; finish it with: decaf-ray sweep {args.sweep} "
              f"--storage {args.storage} --resume", file=sys.stderr)
        return 130
    return 0


def cmd_data(args) -> int:
    from decaf_ray.staging import stage
    from decaf_ray.sweep import load_sweep

    target = (load_sweep(args.config, args.overrides) if _is_sweep(args.config)
              else load_config(args.config, args.overrides))
    for line in stage(target) or ["nothing to stage (bundled or synthetic data)"]:
        print(line)
    return 0


def cmd_pretrain(args) -> int:
    from decaf_ray.pretrain import cli_pretrain

    return cli_pretrain(args.config, args.overrides, args.out)


def cmd_export(args) -> int:
    from decaf_ray.export import cmd_export as export

    return export(args)


def cmd_plot(args) -> int:
    import analysis

    try:
        if args.figure:
            path = analysis.figure(args.figure, args.results, args.out)
        else:
            path = analysis.plot_runs(args.results, args.metric, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError("plot", str(e).splitlines()[0]) from None
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
