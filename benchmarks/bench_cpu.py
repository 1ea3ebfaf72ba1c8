#!/usr/bin/env python3
"""CPU fake-quant throughput: the Rust core against the pure-torch reference, same machine,
same run. Prints a table of median times and the speedup (goal: >= 10x on 2 cores for a
4096x4096 f32 tensor).

Usage: python benchmarks/bench_cpu.py [--rows 4096] [--cols 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import aqn_rs
from aqn_rs import reference as ref


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, args.cols, generator=g)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        x = base.to(dtype)
        for mode in ("floor", "rceil"):
            q = aqn_rs.Mxfp4Quantizer(mode)
            cases.append((f"mxfp4 {mode}", dtype, lambda q=q, x=x: q.fake_quant(x),
                          lambda x=x, m=mode: ref.mxfp4_fake_quant(x, m)))
        n = aqn_rs.Nvfp4Quantizer()
        cases.append(("nvfp4", dtype, lambda x=x: n.fake_quant(x), lambda x=x: ref.nvfp4_fake_quant(x)))

    cpu = platform.processor() or platform.machine()
    print(f"CPU: {cpu}, {os.cpu_count()} cores, aqn_rs threads {aqn_rs.build_info()['cpu_threads']}, "
          f"torch threads {torch.get_num_threads()}, shape {args.rows}x{args.cols}")
    print(f"{'op':<14}{'dtype':<10}{'aqn_rs ms':>11}{'ref ms':>10}{'speedup':>9}{'aqn_rs GB/s':>13}")
    for name, dtype, ours, theirs in cases:
        t_ours = median_ms(ours, args.repeat)
        t_ref = median_ms(theirs, max(1, args.repeat // 2))
        nbytes = 2 * base.numel() * torch.empty(0, dtype=dtype).element_size()
        print(f"{name:<14}{str(dtype).replace('torch.', ''):<10}{t_ours:>11.2f}{t_ref:>10.1f}"
              f"{t_ref / t_ours:>8.1f}x{nbytes / t_ours / 1e6:>13.2f}")


if __name__ == "__main__":
    main()
