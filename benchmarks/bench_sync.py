#!/usr/bin/env python3
"""Whole-model fake quant of a weight-sync stream: what the verl plugin adds to each sync.

verl streams the actor's full weights to vLLM as `(name, tensor)` pairs; the plugin's
`quant_sync` fake-quantizes the selected Linear weights on the way (NVFP4: one global amax
per fused q/k/v and gate/up group, as vLLM fuses them) and sums the quantization error for
the run's `quant/*` metrics. This script builds the stream of a model shape (default
Qwen2.5-1.5B: 28 layers, hidden 1536, MLP 8960, 12 heads, 2 KV heads of 128) as bf16 CUDA
tensors and times, in one process, median of --reps:

- `bytes`: one clone of a buffer the size of the quantized weights (the HBM byte time of a
  read + write of them, the floor any fake quant has);
- `clone`: a clone per quantized tensor (the byte time plus one launch per tensor);
- `fake_quant`: `Quantizer.fake_quant` per tensor (NVFP4: its own amax per tensor);
- `fake_quant+groups`: NVFP4 with the fused groups' shared amax, as the plugin computes it
  (`Nvfp4Quantizer.amax_many`: one call per group); `(torch amax)`: the same with the amax
  from torch's `abs().amax()` per member, a stack and a max, as the plugin did before;
- `quant_sync`: the plugin's whole function on the stream (casts, groups, error sums, the
  final host read of the statistics);
- `error sums (foreach)` / `(sq_err_many)`: the statistics alone on (w, q(w)) pairs made
  beforehand: torch's multi-tensor subtraction and norms in the plugin's batches (its CPU
  path) and the one-read kernel the plugin uses on CUDA.

With --profile, a torch-profiler table of one `quant_sync` pass (host time per op, kernel
launches) follows. Usage (GPU): python benchmarks/bench_sync.py [--format nvfp4] [--reps 20]
[--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import aqn_rs
from aqn_rs.export import fused_weight_groups
from aqn_rs.integrations import verl as plugin
from aqn_rs.integrations.verl import sync as plugin_sync

SHAPES = {  # name: (layers, hidden, intermediate, heads, kv_heads, head_dim)
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 128),
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 64),
    "smollm2-135m": (30, 576, 1536, 9, 3, 64),
}


def stream(shape: str, device: str, dtype: torch.dtype):
    """[(hf_name, tensor)] in the order verl sends a Qwen2/Llama model, and the Linear names."""
    layers, h, inter, heads, kv, hd = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(device=device, dtype=dtype)

    out, linears = [], []
    for i in range(layers):
        p = f"model.layers.{i}"
        for n, s in (("self_attn.q_proj", (heads * hd, h)), ("self_attn.k_proj", (kv * hd, h)),
                     ("self_attn.v_proj", (kv * hd, h)), ("self_attn.o_proj", (h, heads * hd)),
                     ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)), ("mlp.down_proj", (h, inter))):
            out.append((f"{p}.{n}.weight", w(*s)))
            linears.append(f"{p}.{n}")
        out.append((f"{p}.input_layernorm.weight", torch.ones(h, device=device, dtype=dtype)))
        out.append((f"{p}.post_attention_layernorm.weight", torch.ones(h, device=device, dtype=dtype)))
    out.append(("model.norm.weight", torch.ones(h, device=device, dtype=dtype)))
    return out, linears


def timed(fn, reps: int, device: str) -> list:
    times = []
    for i in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="a torch-profiler table of one quant_sync pass")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    named, linears = stream(args.shape, args.device, torch.bfloat16)
    q = aqn_rs.Nvfp4Quantizer() if args.format == "nvfp4" else aqn_rs.Mxfp4Quantizer("floor")
    groups = {}
    if args.format == "nvfp4":
        for grp in fused_weight_groups(linears):
            for m in grp:
                groups[m] = tuple(grp)
    weights = [t for n, t in named if n[: -len(".weight")] in set(linears)]
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    big = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=args.device)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{card}: {args.shape} stream, {len(named)} tensors, {len(weights)} quantized "
          f"({nbytes / 1e9:.2f} GB bf16), {args.format}, {len(set(groups.values()))} fused groups, "
          f"median of {args.reps}", flush=True)

    by_name = dict(named)  # once, outside the timed pass

    def group_fq(torch_amax=False):
        done = set()
        for n, t in named:
            m = n[: -len(".weight")]
            if m not in groups:
                continue
            grp = groups[m]
            if grp in done:
                continue
            done.add(grp)
            ws = [by_name[x + ".weight"] for x in grp]
            if torch_amax or args.device != "cuda":  # what the plugin did before amax_many
                amax = torch.stack([x.abs().amax().float() for x in ws]).amax()
            else:
                amax = q.amax_many(ws)
            for x in ws:
                q.fake_quant(x, amax=amax)

    stats = {}
    variants = {
        "bytes": lambda: big.clone(),
        "clone": lambda: [t.clone() for t in weights],
        "fake_quant": lambda: [q.fake_quant(t) for t in weights],
        "quant_sync": lambda: list(plugin.quant_sync(named, q, linears, groups, torch.bfloat16,
                                                     on_done=stats.update)),
    }
    # The error statistics alone, on (w, q(w)) pairs made once: torch's multi-tensor kernels in
    # batches of the plugin's size (a subtraction and two norms: five passes over the bytes)
    # and the one-read kernel (`_cuda.sq_err_many`, CUDA only).
    qs = [q.fake_quant(t) for t in weights]
    batch = plugin_sync._STATS_BATCH_BYTES  # the module that reads it owns it

    def stats_foreach():
        i = 0
        while i < len(weights):
            j, b = i, 0
            while j < len(weights) and b < batch:
                b += weights[j].numel() * weights[j].element_size()
                j += 1
            torch._foreach_norm(torch._foreach_sub(weights[i:j], qs[i:j]), 2, dtype=torch.float32)
            torch._foreach_norm(weights[i:j], 2, dtype=torch.float32)
            i = j

    variants["error sums (foreach)"] = stats_foreach
    if args.device == "cuda":
        from aqn_rs import _cuda  # noqa: PLC0415

        if hasattr(_cuda, "sq_err_many"):
            variants["error sums (sq_err_many)"] = lambda: _cuda.sq_err_many(weights, qs)
    if args.format == "nvfp4":
        variants["fake_quant+groups"] = group_fq
        variants["fake_quant+groups (torch amax)"] = lambda: group_fq(torch_amax=True)
    res = {}
    for name, fn in variants.items():
        ts = timed(fn, args.reps, args.device)
        res[name] = {"ms": statistics.median(ts), "min_ms": min(ts)}
    base = res["bytes"]["ms"]
    for name, r in res.items():
        print(f"{name:<32}{r['ms']:>9.2f} ms  {r['ms'] / base:>7.2f}x bytes  (min {r['min_ms']:.2f})")
    print(f"quant_sync's own fake_quant_s (last pass): {1e3 * stats.get('fake_quant_s', float('nan')):.2f} ms, "
          f"{int(stats.get('tensors', 0))} tensors")
    out = {"card": card, "args": vars(args), "gb": nbytes / 1e9, "results": res}
    if args.profile and args.device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            variants["quant_sync"]()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"profile of one quant_sync pass: {kernels} CUDA kernel/memcpy events "
              f"({kernels / max(1, len(weights)):.1f} per quantized tensor)")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        out["kernels_per_pass"] = kernels
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
