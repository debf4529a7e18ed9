"""``decaf-ray run``: one experiment into one run directory, from its start, through an
interruption, to its resumption.

Ctrl-C or SIGTERM ends the run at the next round boundary: ``summary.json`` says
``interrupted``, ``checkpoint/state.pt`` holds that round, and ``decaf-ray run --resume DIR``
continues it with the numbers an uninterrupted run gives. A second signal stops at once; so
does a killed process: either resumes from the last periodic checkpoint
(``runtime.checkpoint_every`` rounds).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

from decaf_ray.config import ConfigError, first_difference
from decaf_ray.experiment_config import ExperimentConfig, load_config, self_contained


def cmd_run(args) -> int:
    from decaf_ray.algorithms import ALGORITHMS
    from decaf_ray.plan import prepare
    from decaf_ray.pretrain import resolve_checkpoint
    from decaf_ray.results import RunWriter, load_checkpoint

    cfg, out = _config_and_out(args)
    if cfg.runtime.kind == "ray" and not ALGORITHMS[cfg.algorithm].centralized:
        from decaf_ray.runtime.ray_runtime import check_resources

        check_resources(cfg)  # hosts no node could hold: one line now, not a hang later
    # a stand-in checkpoint is made here, once (trained on a cache miss); hosts only read it
    cfg = resolve_checkpoint(cfg)
    plan = prepare(cfg)  # every config error surfaces here, before anything is written
    from decaf_ray.judge import check

    check(cfg)  # a judge without its key, or unreachable: now, not after training
    for line in warnings_for(cfg):
        print(f"decaf-ray: warning: {line}", file=sys.stderr)
    state = load_checkpoint(out) if args.resume else None
    writer = RunWriter(out).open(cfg, rows=state.rows if state else None,
                                 overwrite=bool(args.resume))
    try:
        with _stop_on_signals(cfg) as stop:
            result = _run(cfg, plan, writer, state, stop, progress=not args.quiet)
    except BaseException as e:
        writer.fail(e)
        raise
    writer.close(result)
    print(_status_line(result, out))
    return 130 if result.status == "interrupted" else 0  # 128 + SIGINT, as a shell reports it


def _run(cfg: ExperimentConfig, plan, writer, state, stop, progress: bool):
    from decaf_ray.experiment import run

    return run(cfg, plan=plan if cfg.runtime.kind == "inprocess" else None, on_rows=writer.rows,
               progress=progress, resume=state, checkpoint_every=cfg.runtime.checkpoint_every,
               on_checkpoint=writer.checkpoint, stop=stop)


def _config_and_out(args) -> tuple[ExperimentConfig, Path]:
    """The config and the run directory: a new one, or ``--resume DIR``'s own (a CONFIG or
    ``--set`` given with ``--resume`` must agree with it unless ``--force``)."""
    if not args.resume:
        if args.config is None:
            raise ConfigError("config", "give a config file, or --resume DIR")
        cfg = _load(args.config, args.overrides)
        if args.out is not None and not args.out.strip():
            raise ConfigError("--out", "is empty; give a directory (or leave --out out)")
        from decaf_ray.results import check_out_dir

        name = cfg.name or cfg.algorithm
        out = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_out_dir(out)
        return cfg, out
    out = Path(args.resume)
    if args.out is not None and Path(args.out) != out:
        raise ConfigError("--out", "a resumed run stays in its own directory; drop --out")
    if not (out / "config.json").is_file():
        raise ConfigError("--resume", f"{out} is not a run directory (no config.json)")
    saved = load_config(json.loads((out / "config.json").read_text()))
    status = _status(out)
    if status == "completed" or status == "diverged":
        raise ConfigError("--resume", f"{out} has already ended ({status}); nothing to resume")
    cfg = saved
    if args.config is not None or args.overrides:
        cfg = self_contained(load_config(args.config or saved.to_dict(), args.overrides))
        if cfg != saved and not args.force:
            raise ConfigError("--resume", f"the config differs from the one {out} was run with "
                              f"({first_difference(saved.to_dict(), cfg.to_dict())}); resume "
                              "without CONFIG/--set, or add --force to continue with it")
    return cfg, out


def _load(path: str, overrides: list[str] | None) -> ExperimentConfig:
    """The experiment config at ``path``; a sweep file's base config (its grid left out, as
    ``--set`` picks a point of it), said so in one line."""
    from decaf_ray.sweep import is_sweep_file, load_sweep

    if not is_sweep_file(path):
        return load_config(path, overrides)
    cfg = load_sweep(path, overrides).config_for({})
    print(f"decaf-ray: {path} is a sweep file: running its base config (algorithm "
          f"{cfg.algorithm}); `decaf-ray sweep {path}` runs its whole grid", file=sys.stderr)
    return cfg


def _status(out: Path) -> str | None:
    try:
        return json.loads((out / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None  # still running when it was killed: no summary yet


class _stop_on_signals:
    """Within it, the first SIGINT or SIGTERM asks the run to stop at the next round boundary;
    a second one (or the first, for a run that cannot stop between rounds) interrupts at once.
    The previous handlers come back on exit."""

    def __init__(self, cfg: ExperimentConfig):
        from decaf_ray.experiment import stoppable

        self.event = threading.Event() if stoppable(cfg) else None
        self.saved: dict[int, object] = {}

    def __enter__(self) -> threading.Event | None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handle)
        return self.event

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.event is None or self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print(f"\ndecaf-ray: {signal.Signals(signum).name}: stopping after this round "
              "(again to stop now)", file=sys.stderr)


def _status_line(result, out: Path) -> str:
    s = result.summary
    final = s["final"]
    shown = ", ".join(f"{k} {final[k]:.4g}" for k in ("test_accuracy", "test_loss") if k in final)
    rounds = f"{s['rounds_completed']} rounds"
    if result.status == "diverged":
        at = s["diverged_at"]
        what = f", {at['metric']}" if at.get("metric") else ""
        note = (f" at round {at['round']} (step {at['step']}, agent {at['agent']}{what}); "
                f"results are of round {s['rounds_completed']}, the last finite evaluation")
    elif result.status == "interrupted":
        note = f" after round {s['rounds_completed']}; continue with decaf-ray run --resume {out}"
    else:
        note = ""
    return (f"{result.status}{note}: {result.config.algorithm}, {rounds} in "
            f"{s['wall_time_s']:.1f}s; {shown}\nresults: {out}")


def warnings_for(cfg: ExperimentConfig) -> list[str]:
    """Configurations that run but are known not to learn."""
    if cfg.algorithm == "decaf" and cfg.local_steps == 1 and cfg.optim.name == "sgd":
        return ["decaf with local_steps 1 and plain SGD from B = 0 keeps B A = 0 forever: each "
                "step leaves one of A, B zero, so every TSVD of the mixed product is zero "
                "(Algorithm 1's order). Use local_steps >= 2 or momentum/adam."]
    return []
