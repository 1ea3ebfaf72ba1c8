#!/usr/bin/env python3
"""AQN noise on CUDA: the kernel (cuda/noise.cu) against the pure-torch reference it replaced.

Prints, for each case, the time per call of `gaussian_noise(..., device="cuda")` (one kernel)
and of `aqn._reference_gaussian` (~150 small torch kernels), their ratio, and the kernel's
output bandwidth next to a device copy of the same bytes. Both produce the same bits
(checked here too). Usage, on a GPU machine: python benchmarks/bench_noise.py
"""

from __future__ import annotations

import time

import torch

from aqn_rs import _cuda
from aqn_rs.aqn import _reference_gaussian, gaussian_noise

NAME = "model.layers.0.mlp.down_proj"


def per_call(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    if not (torch.cuda.is_available() and _cuda.available()):
        raise SystemExit("bench_noise: needs a CUDA device and aqn_rs built with its kernels")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| case | kernel ms | reference ms | reference / kernel | kernel GB/s written | copy moving as many bytes, ms |")
    print("|---|---|---|---|---|---|")
    cases = [
        ("57 RMSNorm gains of 1536 (Qwen2.5-1.5B rollout AQN, one step)", [(1536,)] * 57, torch.bfloat16),
        ("one 4096 gain", [(4096,)], torch.bfloat16),
        ("bf16 4096x14336 Linear weight", [(4096, 14336)], torch.bfloat16),
        ("f32 4096x14336 Linear weight", [(4096, 14336)], torch.float32),
    ]
    for what, shapes, dtype in cases:
        def kernel():
            return [gaussian_noise(s, 0, 7, f"{NAME}.{i}", 0.05, dtype=dtype, device="cuda") for i, s in enumerate(shapes)]

        def reference():
            return [_reference_gaussian(s, 0, 7, f"{NAME}.{i}", 0.05, 0, "cuda").to(dtype) for i, s in enumerate(shapes)]

        for a, b in zip(kernel(), reference()):
            assert torch.equal(a.view(torch.int8 if dtype != torch.float32 else torch.int32),
                               b.view(torch.int8 if dtype != torch.float32 else torch.int32)), what
        big = max(s[0] * (s[1] if len(s) > 1 else 1) for s in shapes) > 1 << 20
        tk = per_call(kernel, 20 if big else 200)
        tr = per_call(reference, 3 if big else 10)
        nbytes = sum(torch.Size(s).numel() for s in shapes) * torch.empty((), dtype=dtype).element_size()
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        tc = per_call(lambda: dst.copy_(src), 50)
        print(f"| {what} | {tk * 1e3:.3f} | {tr * 1e3:.2f} | {tr / tk:.0f}x | {nbytes / tk / 1e9:.1f} | {tc * 1e3:.3f} |")


if __name__ == "__main__":
    main()
