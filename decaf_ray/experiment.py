"""``run(cfg) -> RunResult``: the one entry point that the CLI, the tests and sweeps call.

It resolves a stand-in checkpoint once, picks the runtime the config names (in-process, Ray
hosts, or Ray Train for Centralized) and returns what it ran; the plan and result types live in
``decaf_ray.plan``, below every runtime.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from decaf_ray.algorithms import ALGORITHMS
from decaf_ray.experiment_config import ExperimentConfig
from decaf_ray.plan import Plan, Row, RunResult, prepare


def run(cfg: ExperimentConfig, *, on_rows: Callable[[list[Row]], None] | None = None,
        progress: bool = True, plan: Plan | None = None, run_id: str | None = None,
        resume: Any = None, checkpoint_every: int | None = None,
        on_checkpoint: Callable[[Any], None] | None = None,
        stop: threading.Event | None = None) -> RunResult:
    """Run one experiment on the runtime its config names (``runtime.kind``).

    Args:
        cfg: a validated config.
        on_rows: called with each batch of metric rows as they are produced (streaming).
        progress: show a progress bar over rounds.
        plan: a plan already made by ``prepare``, in-process only (saves rebuilding the task);
            Ray hosts build their own tasks, so giving one with ``runtime.kind: ray`` is an error.
        run_id: names the run's Ray actors (``<run_id>/host<k>``); random if not given.
        resume: a ``runtime.loop.RunState`` to continue from (exactly where it was taken).
        checkpoint_every, on_checkpoint: hand a ``RunState`` to ``on_checkpoint`` every so many
            rounds (a sweep trial's checkpoints, a run directory's ``checkpoint/``).
        stop: once set, the run ends at the next round boundary with status ``interrupted``
            and a last ``RunState`` (to ``on_checkpoint``) to resume from. Centralized on Ray
            (Ray Train) cannot stop between rounds: see ``stoppable``.

    An instruct run's MT-Bench/Vicuna answers are judged here, on the driver, once the
    runtime returns (``decaf_ray.judge``); their score rows go to ``on_rows`` too.
    """
    result = _run(cfg, on_rows=on_rows, progress=progress, plan=plan, run_id=run_id,
                  resume=resume, checkpoint_every=checkpoint_every,
                  on_checkpoint=on_checkpoint, stop=stop)
    from decaf_ray import judge

    if judge.judged(cfg) and result.status == "completed":
        result = judge.judge_result(cfg, result, on_rows)
    return result


def _run(cfg: ExperimentConfig, *, on_rows, progress, plan, run_id, resume, checkpoint_every,
         on_checkpoint, stop) -> RunResult:
    kwargs = dict(on_rows=on_rows, progress=progress, on_checkpoint=on_checkpoint)
    if plan is None:  # a stand-in checkpoint is resolved (trained on a miss) here, once
        from decaf_ray.pretrain import resolve_checkpoint

        cfg = resolve_checkpoint(cfg)
    if cfg.runtime.kind == "ray":
        if plan is not None:
            raise ValueError("run(plan=...) is in-process only: Ray hosts build their own tasks")
        if ALGORITHMS[cfg.algorithm].centralized:  # a data-parallel fine-tune: Ray Train's job
            from decaf_ray.runtime.train import run_on_train

            return run_on_train(cfg, run_id=run_id, resume=resume,
                                checkpoint_every=checkpoint_every, **kwargs)
        from decaf_ray.runtime.ray_runtime import run_on_ray

        return run_on_ray(cfg, run_id=run_id, resume=resume, checkpoint_every=checkpoint_every,
                          stop=stop, **kwargs)
    from decaf_ray.runtime.inprocess import InProcessHosts
    from decaf_ray.runtime.loop import follow, stream

    plan = plan or prepare(cfg)
    hosts = InProcessHosts(plan)
    try:
        items = stream(plan, hosts, resume=resume, checkpoint_every=checkpoint_every,
                       stop=stop.is_set if stop is not None else None)
        return follow(items, cfg.rounds, cfg.algorithm, initial=resume.round if resume else 0,
                      **kwargs)
    finally:
        hosts.close()


def stoppable(cfg: ExperimentConfig) -> bool:
    """Whether ``run(cfg, stop=...)`` can end at a round boundary: in-process and on Ray hosts.
    Ray Train's workers step in lockstep and are not asked; such a run stops by interruption
    and resumes from its last periodic checkpoint."""
    return not (cfg.runtime.kind == "ray" and ALGORITHMS[cfg.algorithm].centralized)
