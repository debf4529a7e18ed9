"""Benchmark message compression (decaf_ray.compress): encode and decode time and bytes per kind.

    python bench/bench_compress.py [--repeats N] [--threads T]

Payloads: one agent's message on the CLIP ViT-B/16 stand-in (72 modules, d = k = 768, r = 4:
q, k, v of the 12 + 12 blocks) and on LLaMA-2-7B (q and v of 32 blocks, d = k = 4096, r = 4),
A and B both travelling, float32 on CPU. Times are medians after one warm-up; bytes are
``nbytes`` of the real message. With ``--feedback`` the error-feedback path is timed too.
"""

from __future__ import annotations

import argparse

import torch
from bench_consensus import median_time  # a sibling script: run as python bench/bench_compress.py

from decaf_ray.compress import decode, encode, encode_with_feedback, nbytes

PAYLOADS = {"clip-b16": (72, 768, 768, 4), "llama2-7b": (64, 4096, 4096, 4)}
CODECS = [("float32", None), ("float16", None), ("bfloat16", None), ("int8", None),
          ("topk", 0.1), ("topk", 0.01)]


def make(modules: int, d: int, k: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": (torch.randn(r, k, generator=g) / (3 * k) ** 0.5,
                      torch.randn(d, r, generator=g) * 0.01) for i in range(modules)}


def rel_err(payload, decoded) -> float:
    """||x - decode(encode(x))|| / ||x|| over every factor."""
    num = sum((x - y).square().sum() for n in payload for x, y in zip(payload[n], decoded[n]))
    den = sum(x.square().sum() for pair in payload.values() for x in pair)
    return (num / den).sqrt().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--feedback", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, shape in PAYLOADS.items():
        p = make(*shape)
        full = nbytes(encode(p))
        print(f"{name}: {shape[0]} modules, d=k={shape[1]}, r={shape[3]}, "
              f"float32 message {full / 2**20:.2f} MiB")
        for kind, ratio in CODECS:
            t_enc, m = median_time(lambda: encode(p, kind, ratio), args.repeats)
            t_dec, out = median_time(lambda: decode(m), args.repeats)
            label = kind if ratio is None else f"{kind}({ratio})"
            line = (f"  {label:<12} {nbytes(m) / 2**20:8.3f} MiB ({nbytes(m) / full:6.3f} x)  "
                    f"encode {t_enc * 1e3:8.2f} ms  decode {t_dec * 1e3:8.2f} ms  "
                    f"rel. error {rel_err(p, out):.1e}")
            if args.feedback and kind != "float32":
                t_ef, _ = median_time(lambda: encode_with_feedback(p, None, kind, ratio),
                                      args.repeats)
                line += f"  with feedback {t_ef * 1e3:8.2f} ms"
            print(line)


if __name__ == "__main__":
    main()
