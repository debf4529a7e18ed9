"""Ray runtime against the in-process runtime: time per round and peak memory.

    python bench/bench_ray.py overhead            # near-zero-cost task, 10 / 40 / 100 agents
    python bench/bench_ray.py compute --rounds 30 # tiny CLIP, 10 agents, agents_per_host 5
    python bench/bench_ray.py memory              # peak memory against agents, per host 1 and 10
    python bench/bench_ray.py case --runtime ray --agents 40 --per-host 10 --task synthetic
    python bench/bench_ray.py floor --config sweeps/clip-tiny-digits.yaml --per-host 5

Every case runs in a fresh subprocess (its own embedded Ray) and reports its time per round, from
the end of the round-0 evaluation (hosts built) to the end of the run, over the rounds, and the
peak proportional set size (PSS: shared library pages split between processes, so torch is not
counted once per actor) of the whole process tree: driver, Ray's daemons and every actor.
``compute`` takes the difference of two such runs so that the final evaluation cancels;
``floor`` reports the median of rounds 2..R-1 of the local steps alone.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

SYNTHETIC = {"kind": "synthetic", "d": 4, "k": 8, "true_rank": 1, "samples": 4000,
             "test_samples": 50}
TINY_CLIP = None  # filled from sweeps/clip-tiny-digits.yaml when the compute case runs


def config(task: str, agents: int, runtime: str, per_host: int, rounds: int,
           threads: int | None = None) -> dict:
    if task == "clip":
        import yaml

        base = yaml.safe_load((ROOT / "sweeps" / "clip-tiny-digits.yaml").read_text())
        base.update(agents=agents, rounds=rounds, eval_every=rounds, grad_norm=False)
        base["runtime"] = {"kind": runtime, "agents_per_host": per_host, "threads": threads}
        return base
    return {
        "algorithm": "decaf", "agents": agents, "topology": "ring", "rounds": rounds,
        "local_steps": 1, "eval_every": rounds, "grad_norm": False, "seed": 0,
        "task": SYNTHETIC, "data": {"partition": "iid", "batch_size": 4},
        "lora": {"rank": 1, "alpha": 1.0}, "optim": {"name": "momentum", "lr": 0.01},
        "runtime": {"kind": runtime, "agents_per_host": per_host, "threads": 1},
    }


class PeakPSS:
    """Samples the PSS of this process and all its descendants every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_case(args) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from decaf_ray.experiment_config import load_config
    from decaf_ray.experiment import run

    cfg = load_config(config(args.task, args.agents, args.runtime, args.per_host, args.rounds,
                             args.threads))
    stamps = []
    with PeakPSS() as mem:
        start = time.perf_counter()
        result = run(cfg, progress=False, on_rows=lambda rows: stamps.append(time.perf_counter()))
        total = time.perf_counter() - start
    # rows arrive at round 0 and at the end; per-round time = (end - round 0) / rounds
    per_round = (stamps[-1] - stamps[0]) / cfg.rounds
    return {"runtime": args.runtime, "task": args.task, "agents": args.agents,
            "per_host": args.per_host, "rounds": cfg.rounds, "per_round_ms": per_round * 1e3,
            "total_s": total, "peak_pss_mb": mem.peak / 2 ** 20, "status": result.status}


def case(runtime: str, task: str, agents: int, per_host: int, rounds: int,
         threads: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "case", "--runtime", runtime, "--task", task,
           "--agents", str(agents), "--per-host", str(per_host), "--rounds", str(rounds)]
    cmd += ["--threads", str(threads)] if threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"case failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def overhead(repeats: int) -> None:
    print("coordination overhead, synthetic d=4 k=8 rank 1 (near-zero compute), 1 step/round, "
          f"median of {repeats} runs")
    print(f"{'agents':>6} {'per host':>8} {'inproc ms':>10} {'ray ms':>8} {'overhead ms':>11}")
    for agents, per_host in [(10, 1), (10, 5), (40, 10), (100, 10), (100, 25)]:
        ip = statistics.median(case("inprocess", "synthetic", agents, per_host, 60)["per_round_ms"]
                               for _ in range(repeats))
        ry = statistics.median(case("ray", "synthetic", agents, per_host, 60)["per_round_ms"]
                               for _ in range(repeats))
        print(f"{agents:>6} {per_host:>8} {ip:10.2f} {ry:8.2f} {ry - ip:11.2f}")


def compute(repeats: int, rounds: int) -> None:
    """In-process with torch's default threads (both cores, intra-op) and with one thread,
    against Ray with 2 hosts x 5 agents, one thread each (both cores, one process each).

    A run evaluates every agent at its start and end, which on this task costs as much as tens
    of rounds, so a training round's time is the difference of two runs' times from their first
    evaluation to their end, one of ``rounds`` rounds and one of ``rounds // 3``, over the
    difference in rounds: evaluation and start-up cancel."""
    short = max(1, rounds // 3)
    print(f"compute-bound: tiny CLIP (sweeps/clip-tiny-digits.yaml), 10 agents, training round "
          f"time from runs of {rounds} and {short} rounds, median of {repeats}")

    def one(**kw) -> float:
        span = {r: case(task="clip", agents=10, per_host=5, rounds=r, **kw)["per_round_ms"] * r
                for r in (rounds, short)}
        return (span[rounds] - span[short]) / (rounds - short)

    med = lambda **kw: statistics.median(one(**kw) for _ in range(repeats))
    ip, ip1, ry = med(runtime="inprocess"), med(runtime="inprocess", threads=1), med(runtime="ray")
    print(f"in-process (default threads) {ip:.1f} ms/round, in-process (1 thread) {ip1:.1f}, "
          f"ray (2 hosts x 5 agents) {ry:.1f}: ray / in-process = {ry / ip:.2f} "
          f"(against 1 thread: {ry / ip1:.2f})")


def memory() -> None:
    print("peak PSS of the whole process tree (driver + Ray + actors)")
    print(f"{'task':>9} {'agents':>6} {'per host':>8} {'hosts':>5} {'peak MB':>8} {'MB/agent':>8}")
    for task, cases in [("synthetic", [(10, 1), (10, 10), (40, 10), (100, 10)]),
                        ("clip", [(10, 1), (10, 10), (40, 10), (100, 10)])]:
        for agents, per_host in cases:
            r = case("ray", task, agents, per_host, 3)
            hosts = -(-agents // per_host)
            print(f"{task:>9} {agents:>6} {per_host:>8} {hosts:>5} {r['peak_pss_mb']:8.0f} "
                  f"{r['peak_pss_mb'] / agents:8.1f}")


def _floor_host(config_path: str, overrides: list[str], ids: list[int], rounds: int,
                barrier, out) -> None:
    import torch
    from decaf_ray.agents import AgentGroup
    from decaf_ray.experiment_config import load_config
    from decaf_ray.plan import prepare
    from decaf_ray.optim import build_optimizer

    from decaf_ray.placement import host_threads

    cfg = load_config(config_path, overrides)
    torch.set_num_threads(host_threads(cfg.runtime))  # as an AgentHost of this config
    plan = prepare(cfg)
    group = AgentGroup.build(cfg, plan.task, plan.algorithm,
                             build_optimizer(cfg.optim, cfg.total_steps),
                             {i: plan.shards[i] for i in ids})
    times = []
    for r in range(rounds):
        barrier.wait(timeout=600)
        start = time.perf_counter()
        for k in range(cfg.local_steps):
            group.local_step(r * cfg.local_steps + k + 1)
        times.append(time.perf_counter() - start)
    out.put(times)


def floor(config_path: str, agents: int, per_host: int, rounds: int, overrides: list[str]) -> dict:
    """The compute floor of a round: only the local steps, with no runtime at all. As many plain
    processes as a Ray run has hosts, each stepping its agents' adapters (same task code, same
    threads), started together every round; a round takes as long as its slowest process.
    What a runtime adds on top of this is its overhead. Returns ``rounds_ms`` (each round) and
    ``per_round_ms``: their median over rounds 2..R-1, the window compare_flower.sh takes for
    both frameworks (round 1 is warm-up there, round R is where ours evaluates)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    overrides = [f"agents={agents}", f"runtime.agents_per_host={per_host}", *overrides]
    hosts = [list(range(a, min(a + per_host, agents))) for a in range(0, agents, per_host)]
    barrier, out = ctx.Barrier(len(hosts)), ctx.Queue()
    procs = [ctx.Process(target=_floor_host, args=(config_path, overrides, ids, rounds, barrier,
                                                   out)) for ids in hosts]
    for p in procs:
        p.start()
    try:
        per_host_times = [out.get(timeout=900) for _ in procs]
    except queue.Empty:
        codes = [p.exitcode for p in procs]
        for p in procs:
            p.kill()
        raise SystemExit(f"floor: a process failed or hung (exit codes {codes})") from None
    for p in procs:
        p.join()
    rounds_ms = [max(ts) * 1e3 for ts in zip(*per_host_times)]
    kept = rounds_ms[1:-1] if rounds > 2 else rounds_ms[1:]
    return {"framework": "none (local steps only)", "agents": agents, "per_host": per_host,
            "processes": len(hosts), "rounds": rounds, "rounds_ms": rounds_ms,
            "per_round_ms": statistics.median(kept)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["overhead", "compute", "memory", "case", "floor"])
    p.add_argument("--runtime", default="ray")
    p.add_argument("--task", default="synthetic")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--per-host", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (case only)")
    p.add_argument("--config", default=str(ROOT / "sweeps" / "clip-tiny-digits.yaml"),
                   help="experiment config (floor only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (floor only; repeatable)")
    args = p.parse_args()
    if args.what == "case":
        print(json.dumps(run_case(args)))
    elif args.what == "floor":
        print(json.dumps(floor(args.config, args.agents, args.per_host, args.rounds, args.set)))
    elif args.what == "overhead":
        overhead(args.repeats)
    elif args.what == "compute":
        compute(args.repeats, args.rounds)
    else:
        memory()


if __name__ == "__main__":
    main()
