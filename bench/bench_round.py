"""Time one training round of DeCAF against DLoRA on the synthetic task (in-process runtime).

    python bench/bench_round.py [--rounds 60] [--agents 10] [--dims 10x32 256x256 1024x1024]

A round is ``local_steps`` gradient steps and one communication (mix) per agent. DeCAF's mix is
the factored TSVD; DLoRA's is two averages. Prints the median time per round of each and the
ratio; the target is DeCAF at most 1.1x DLoRA. No evaluation runs inside the timed rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decaf_ray.experiment_config import load_config
from decaf_ray.plan import prepare
from decaf_ray.runtime.inprocess import InProcessHosts


def time_rounds(algorithm: str, d: int, k: int, agents: int, rounds: int, topology: str,
                split: str = "conserved") -> float:
    cfg = load_config({
        "algorithm": algorithm, "agents": agents, "topology": topology, "rounds": rounds,
        "local_steps": 2, "seed": 0,
        "task": {"kind": "synthetic", "d": d, "k": k, "true_rank": 2, "samples": 40 * d,
                 "test_samples": 10},
        "data": {"partition": "iid", "batch_size": 32},
        "lora": {"rank": 4, "alpha": 4.0}, "optim": {"name": "sgd", "lr": 0.05},
        "consensus": {"split": split},
    })
    hosts = InProcessHosts(prepare(cfg))
    times, t = [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        t += 1
        hosts.local_steps(t, 1)
        t += 1
        hosts.communicate(t, diagnose=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--topology", default="ring")
    p.add_argument("--dims", nargs="+", default=["10x32", "256x256", "1024x1024"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"synthetic task, {args.agents} agents, {args.topology}, rank 4, 2 local steps, "
          f"torch threads {torch.get_num_threads()}; median of {args.rounds - 2} rounds")
    print(f"{'d x k':>11} {'dlora ms':>9} {'decaf ms':>9} {'ratio':>6}   (decaf: the paper's "
          f"balanced split; conserved, the default, in brackets)")
    for dims in args.dims:
        d, k = map(int, dims.split("x"))
        dl = time_rounds("dlora", d, k, args.agents, args.rounds, args.topology)
        dc = time_rounds("decaf", d, k, args.agents, args.rounds, args.topology, "balanced")
        da = time_rounds("decaf", d, k, args.agents, args.rounds, args.topology, "conserved")
        print(f"{dims:>11} {dl * 1e3:9.2f} {dc * 1e3:9.2f} {dc / dl:6.2f}   "
              f"[{da * 1e3:.2f} ms, {da / dl:.2f}]")


if __name__ == "__main__":
    main()
