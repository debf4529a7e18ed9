"""Benchmark DeCAF's consensus step: factored TSVD (decaf_mix) against the paper's dense SVD.

    python bench/bench_consensus.py [--repeats N] [--dense-repeats N] [--threads T]

Shapes: one LoRA module of LLaMA2-7B (d = k = 4096, r = 4) and of CLIP ViT-B/16 (d = k = 768,
r = 2), each mixed over 10 neighbours, float32 on CPU; then the 72 CLIP modules of one agent (q, k, v
of the 12 + 12 blocks of both encoders) mixed in one batched call against a Python loop.
Times are medians after one warm-up; the dense 4096 SVD takes seconds per run, so it gets
``--dense-repeats`` runs and its warm-up is a small SVD (LAPACK's lazy set-up, not the big one).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decaf_ray.consensus import decaf_mix, decaf_mix_dense

NEIGHBOURS = 10
CLIP_MODULES = 72


def make(m: int, d: int, k: int, r: int, batch: tuple[int, ...] = (), seed: int = 0):
    """Independent random agents (the hardest case: M has mr singular values of similar size)."""
    g = torch.Generator().manual_seed(seed)
    As = torch.randn(m, *batch, r, k, generator=g) / (3 * k) ** 0.5
    Bs = torch.randn(m, *batch, d, r, generator=g) * 0.01
    return As, Bs, torch.full((m,), 1.0 / m)


def median_time(fn, repeats: int, warmup=None):
    """(median wall time of fn() over ``repeats`` >= 1 runs after one warm-up call, last result)."""
    (warmup or fn)()
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_err(A, B, A_ref, B_ref) -> float:
    """||B A - B_ref A_ref||_F / ||B_ref A_ref||_F, in float64."""
    ref = B_ref.double() @ A_ref.double()
    return ((B.double() @ A.double() - ref).norm() / ref.norm()).item()


def bench_single(name: str, d: int, r: int, repeats: int, dense_repeats: int) -> None:
    As, Bs, w = make(NEIGHBOURS, d, d, r)
    small = make(2, 64, 64, 2)
    t_fact, (A, B) = median_time(lambda: decaf_mix(As, Bs, w), repeats)
    t_dense, (Ad, Bd) = median_time(lambda: decaf_mix_dense(As, Bs, w), dense_repeats,
                                    warmup=lambda: decaf_mix_dense(*small))
    A64, B64 = decaf_mix(As.double(), Bs.double(), w.double())
    print(f"{name:<10} d=k={d:<5} r={r} m={NEIGHBOURS}  factored {t_fact * 1e3:9.2f} ms  "
          f"dense {t_dense * 1e3:10.1f} ms  speed-up {t_dense / t_fact:8.0f}x")
    print(f"{'':<10} rel. error of BA: factored vs dense {rel_err(A, B, Ad, Bd):.2e}  "
          f"(vs float64: factored {rel_err(A, B, A64, B64):.2e}, "
          f"dense {rel_err(Ad, Bd, A64, B64):.2e})")


def bench_batched(repeats: int) -> None:
    d, r = 768, 2
    As, Bs, w = make(NEIGHBOURS, d, d, r, batch=(CLIP_MODULES,), seed=1)

    def loop():
        return [decaf_mix(As[:, i], Bs[:, i], w) for i in range(CLIP_MODULES)]

    t_batch, (A, B) = median_time(lambda: decaf_mix(As, Bs, w), repeats)
    t_loop, looped = median_time(loop, repeats)
    t_dense, _ = median_time(lambda: decaf_mix_dense(As[:, 0], Bs[:, 0], w), repeats)
    err = max(rel_err(A[i], B[i], a, b) for i, (a, b) in enumerate(looped))
    print(f"CLIP x{CLIP_MODULES} modules (d=k={d}, r={r}, m={NEIGHBOURS}): batched "
          f"{t_batch * 1e3:.1f} ms, loop {t_loop * 1e3:.1f} ms ({t_loop / t_batch:.1f}x), "
          f"dense loop ~{t_dense * CLIP_MODULES * 1e3:.0f} ms (72 x one module); "
          f"max rel. diff batched vs loop {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="timed runs per fast case (median)")
    p.add_argument("--dense-repeats", type=int, default=3, help="timed runs of the dense 4096 SVD")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, float32 CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs ({args.dense_repeats} for the dense 4096 SVD)")
    t0 = time.perf_counter()
    bench_single("CLIP", 768, 2, args.repeats, args.repeats)
    bench_single("LLaMA2-7B", 4096, 4, args.repeats, args.dense_repeats)
    bench_batched(args.repeats)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
