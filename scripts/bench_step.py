#!/usr/bin/env python3
"""Training-step time (forward + backward + optimizer step) of a random-init Llama-style
model: no quantization vs W4A16 MXFP4 / NVFP4 (aqn_rs.quantize_model) vs W4A16 + AQN on
RMSNorm weights, in one run, with the ratio to the unquantized step. The issue's goal: <= 3%
overhead for W4A16 on a ~1B-parameter model on an H100.

Usage (GPU): python scripts/bench_step.py [--layers 16 --hidden 2048 --inter 5632]
             [--batch 8 --seq 1024] [--steps 10]
CPU smoke run: python scripts/bench_step.py --device cpu --layers 2 --hidden 128 --inter 256
             --vocab 512 --batch 2 --seq 32 --steps 2 --dtype float32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

import aqn_rs


def build(args):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 4), max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = transformers.LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).train()
    return model


def variants(args):
    yield "none", None, None
    yield "w4a16-mxfp4", aqn_rs.Mxfp4Quantizer("floor"), None
    yield "w4a16-nvfp4", aqn_rs.Nvfp4Quantizer(), None
    yield "w4a16-nvfp4+aqn", aqn_rs.Nvfp4Quantizer(), "rmsnorm"


def time_steps(model, opt, batch, steps: int, device: str) -> list:
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    model = build(args)
    nparams = sum(p.numel() for p in model.parameters())
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{card}: Llama-style {nparams / 1e9:.2f}B params, {args.dtype}, batch {args.batch}x{args.seq}, "
          f"aqn_rs {aqn_rs.__version__} (CUDA kernels: {aqn_rs.build_info()['cuda_available']})")
    g = torch.Generator(device="cpu").manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    rows = []
    base = None
    for name, quantizer, noise_on in variants(args):
        handles = []
        if quantizer is not None:
            handles.append(aqn_rs.quantize_model(model, quantizer))
        if noise_on is not None:
            sched = aqn_rs.SigmaScheduler(0.05, 5e-4, 10, 100)
            noise = aqn_rs.AqnNoise(sched, layer_types=(noise_on,), apply_to="actor", seed=0)
            handles.append(aqn_rs.hooks.attach_noise(model, noise))
            noise.set_step(50)
        times = time_steps(model, opt, batch, args.steps, args.device)
        for h in reversed(handles):
            h.remove()
        ms = statistics.median(times)
        base = base or ms
        rows.append({"variant": name, "ms": ms, "ratio": ms / base, "min_ms": min(times)})
        print(f"{name:<18}{ms:>10.2f} ms/step{ms / base:>9.3f}x  (min {min(times):.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "params": nparams, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
