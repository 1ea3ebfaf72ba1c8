#!/usr/bin/env python3
"""Training-step time (forward + backward + optimizer step) of a random-init Llama-style
model: no quantization vs W4A16 MXFP4 / NVFP4 (aqn_rs.quantize_model) vs W4A16 NVFP4 + AQN on
RMSNorm weights vs verl 0.9.1's own W4A16 NVFP4 `QATLinear`, on one model and batch, with the
overhead over the unquantized step. The target: <= 3% overhead for W4A16 on a
~1B-parameter model on an H100.

Each round measures, for each micro-batch count (`--micro`: the batch split into N
micro-batches, gradients accumulated, one optimizer step per step), the unquantized step
("none", in --dtype), every quantized variant, then the unquantized step again; a variant's
overhead is its median ms/step over the mean of the two unquantized medians of its round.
The summary is the median over rounds.

`--micro-size N` fixes the micro-batch instead (N sequences each, the batch of a step with M
micro-batches is M x N), as verl's `ppo_micro_batch_size_per_gpu` does. With a fixed batch
split four ways, each micro-batch is small enough that the host (Python, launches) sets the
step's pace: the step time then follows the host's speed, which drifts by 10-20% between
identical variants on a shared machine, and an overhead of a few tenths of a percent cannot
be read from it (the host-time column shows when that is the case).

verl's peer: verl's `apply_qat` (every Linear but lm_head, mode w4a16, group 16) and
`enable_qat_fuse`, as its FSDP engine applies them, and `invalidate_all_scales` after every
optimizer step, as that engine does. From an installed verl if it imports, else from verl's
files read out of its wheel (AQN_RS_VERL_WHEEL, .ci-wheels/ or /tmp/verlwhl; `pip download
--no-deps verl==0.9.1 -d .ci-wheels`) into .peers/verl_qat/ (carry .ci-wheels or .peers to
the GPU machine). Its fake quant is a Triton kernel: on CPU the column says why it is skipped.

Usage (GPU): python benchmarks/bench_step.py [--layers 16 --hidden 2048 --inter 5632]
             [--batch 8 | --micro-size 8] [--seq 1024] [--steps 10] [--micro 1 4] [--rounds 3]
             [--json out.json]
CPU smoke run: python benchmarks/bench_step.py --device cpu --layers 2 --hidden 128 --inter 256
             --vocab 512 --batch 4 --seq 32 --steps 2 --dtype float32
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pathlib
import statistics
import sys
import time
import zipfile

import torch

import aqn_rs

REPO = pathlib.Path(__file__).resolve().parents[1]
VERL_DIR = REPO / ".peers" / "verl_qat"  # .peers/ as in benchmarks/bench_kernels.py
# verl's files that apply_qat / QATLinear / invalidate_all_scales need; the package
# __init__s are left empty (verl's import ray, vLLM patches, ...).
VERL_FILES = ("verl/base_config.py", "verl/utils/qat/core.py", "verl/utils/qat/linear.py")
VERL_NAME = "verl-qatlinear-nvfp4"
AQN_VARIANTS = [  # name, quantizer, AQN noise on, prefill (quantize_model's)
    ("w4a16-mxfp4", lambda: aqn_rs.Mxfp4Quantizer("floor"), None, True),
    ("w4a16-nvfp4", aqn_rs.Nvfp4Quantizer, None, True),
    ("w4a16-nvfp4+aqn", aqn_rs.Nvfp4Quantizer, "rmsnorm", True),
    # each weight fake-quantized at its own forward, as before the prefill: its A/B
    ("w4a16-nvfp4-noprefill", aqn_rs.Nvfp4Quantizer, None, False),
]
ORDER = ["none-before"] + [v[0] for v in AQN_VARIANTS] + [VERL_NAME, "none-after"]
# `--many-batch-mb N`: w4a16-nvfp4 (prefill on) with the multi-tensor NVFP4 launches capped at
# N MiB of weights each (`cuda_set_tuning(many_batch_bytes=)`): the amax pass and the fake
# quant of a launch then run back to back over bytes that can still be in L2, at the cost of
# more launches. One column per N, inserted before verl's. `--l2-keep-mb K` adds, per N, a
# twin column `...-keep{K}MiB` with the amax pass also asking L2 to keep K MiB for the fake
# quant after it (`cuda_set_tuning(l2_keep_bytes=)`; aqn::L2Hint in cuda/fp4_common.cuh).
L2B_PREFIX = "w4a16-nvfp4-batch"


def l2b_name(mb: float, keep_mb: float | None = None) -> str:
    return f"{L2B_PREFIX}{mb:g}MiB" + ("" if keep_mb is None else f"-keep{keep_mb:g}MiB")


def l2b_names(args) -> list:
    names = []
    for mb in args.many_batch_mb:
        names.append(l2b_name(mb))
        if args.l2_keep_mb is not None:
            names.append(l2b_name(mb, args.l2_keep_mb))
    return names


def l2b_parse(name: str) -> tuple:
    """(batch MiB, keep MiB or 0) of a column named by l2b_name."""
    batch, _, keep = name[len(L2B_PREFIX):].partition("-keep")
    return float(batch[:-len("MiB")]), float(keep[:-len("MiB")]) if keep else 0.0


def order_for(args) -> list:
    extra = l2b_names(args)
    return ORDER[:-2] + extra + ORDER[-2:]


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


def load_verl():
    """verl.utils.qat.core (apply_qat, enable_qat_fuse, invalidate_all_scales): installed, or
    extracted verbatim from verl's wheel. Raises with the reason when neither works."""
    try:
        from verl.utils.qat import core  # noqa: PLC0415

        return core
    except Exception as e:  # noqa: BLE001
        installed_err = f"{type(e).__name__}: {e}"
        for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
            del sys.modules[name]
    if not all((VERL_DIR / f).is_file() for f in VERL_FILES):
        cands = [os.environ.get("AQN_RS_VERL_WHEEL", ""), str(REPO / ".ci-wheels"), "/tmp/verlwhl"]
        wheels = [w for c in filter(None, cands) for w in
                  ([pathlib.Path(c)] if c.endswith(".whl") else sorted(pathlib.Path(c).glob("verl-0.9.1-*.whl")))]
        if not wheels:
            raise RuntimeError(f"verl not importable ({installed_err}) and no verl 0.9.1 wheel in {cands}")
        with zipfile.ZipFile(wheels[0]) as z:
            for f in VERL_FILES:
                (VERL_DIR / f).parent.mkdir(parents=True, exist_ok=True)
                (VERL_DIR / f).write_bytes(z.read(f))
        for d in ("verl", "verl/utils", "verl/utils/qat"):
            (VERL_DIR / d / "__init__.py").write_text(f"# empty: the {wheels[0].name} files needed, no more\n")
    sys.path.insert(0, str(VERL_DIR))
    from verl.utils.qat import core  # noqa: PLC0415

    return core


def attach_verl(model):
    """verl's own W4A16 QAT on `model`, as its FSDP engine applies it
    (verl/workers/engine/fsdp/transformer_impl.py `_apply_qat`): apply_qat with the QATConfig
    defaults (ignore lm_head, embed_tokens, MoE gates) in mode w4a16, then enable_qat_fuse.
    QATLinear.from_linear copies the weights; the copies are replaced by the original
    Parameters so the optimizer steps them. Returns (after optimizer step, undo)."""
    core = load_verl()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    core.apply_qat(model, {"enable": True, "mode": "w4a16", "group_size": 16})
    core.enable_qat_fuse(model)
    swapped = {n: model.get_submodule(n) for n in linears if model.get_submodule(n) is not linears[n]}
    if not swapped:
        raise RuntimeError("verl's apply_qat replaced no Linear")
    for n, q in swapped.items():
        q.weight, q.bias = linears[n].weight, linears[n].bias

    def undo():
        for n in swapped:
            parent, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linears[n])
        del model._qat_fuse_enabled

    return (lambda: core.invalidate_all_scales(model)), undo


def attach(model, name):
    """Put `name`'s quantization on the model; returns (after optimizer step or None, undo)."""
    if name == VERL_NAME:
        return attach_verl(model)
    if name.startswith(L2B_PREFIX):
        mb, keep_mb = l2b_parse(name)
        before = aqn_rs._aqn_rs.cuda_set_tuning()  # RuntimeError without the kernels: skipped
        aqn_rs._aqn_rs.cuda_set_tuning(many_batch_bytes=int(mb * (1 << 20)),
                                       l2_keep_bytes=int(keep_mb * (1 << 20)))
        h = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer(), prefill=True)

        def undo():
            h.remove()
            aqn_rs._aqn_rs.cuda_set_tuning(*before)

        return None, undo
    handles = []
    for vname, make_quantizer, noise_on, prefill in AQN_VARIANTS:
        if vname == name:
            handles.append(aqn_rs.quantize_model(model, make_quantizer(), prefill=prefill))
            if noise_on is not None:
                sched = aqn_rs.SigmaScheduler(0.05, 5e-4, 10, 100)
                noise = aqn_rs.AqnNoise(sched, layer_types=(noise_on,), apply_to="actor", seed=0)
                handles.append(aqn_rs.hooks.attach_noise(model, noise))
                noise.set_step(50)
    return None, lambda: [h.remove() for h in reversed(handles)]


def time_steps(model, opt, batch, steps: int, micro: int, device: str, after_step=None, host=None) -> list:
    """ms per optimizer step over `micro` micro-batches, `steps` timed after two warm-up steps.
    `host`, a list, receives each timed step's host time: from its start until the host has
    queued all its work (before the synchronize). A host time close to the step time means the
    step is bound by the host (launches, Python), not by the GPU, and its overhead is host work.
    Python's garbage collector is off while timing (as timeit does): its pauses land on random
    steps of random variants."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for i in range(steps + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for mb in batch.chunk(micro):
                (model(input_ids=mb, labels=mb).loss / micro).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            t1 = time.perf_counter()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
                if host is not None:
                    host.append((t1 - t0) * 1e3)
    finally:
        gc.enable()
    return times


def measure(model, opt, batch, args, name, micro, host=None):
    """(times, None) or (None, why skipped); `host` as in time_steps."""
    try:
        after_step, undo = attach(model, "none" if name.startswith("none") else name)
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    try:
        return time_steps(model, opt, batch, args.steps, micro, args.device, after_step, host), None
    except Exception as e:  # noqa: BLE001
        if name != VERL_NAME:
            raise
        opt.zero_grad(set_to_none=True)
        hint = "" if args.device == "cuda" else " (its fake quant is a Triton kernel: GPU only)"
        return None, f"step failed on {args.device}{hint}: {type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
    finally:
        undo()


def profile_step(model, opt, batch, args) -> dict:
    """One step of each of none / w4a16-nvfp4 (prefill on, off, each --many-batch-mb) /
    w4a16-mxfp4 at --profile-micro micro-batches under torch's profiler (after two warm-up
    steps): CUDA kernel launches per step and where the host time goes; the quantized step's
    extra launches and host ops are what its overhead is made of."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    names = ["none", "w4a16-nvfp4", "w4a16-nvfp4-noprefill"] + l2b_names(args)
    for name in names + ["w4a16-mxfp4"]:
        after_step, undo = attach(model, name)
        try:
            time_steps(model, opt, batch, 0, args.profile_micro, args.device, after_step)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                time_steps(model, opt, batch, -1, args.profile_micro, args.device, after_step)
        finally:
            undo()
        ev = prof.key_averages()
        cuda = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        out[name] = {"kernels": sum(e.count for e in cuda),
                     "cuda_ms": sum(e.self_device_time_total for e in cuda) / 1e3}
        print(f"== profile {name}: {out[name]['kernels']} CUDA kernel/memcpy events per step, "
              f"{out[name]['cuda_ms']:.2f} ms of device time", flush=True)
        if name != "none":
            print(ev.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60), flush=True)
            mine = sorted((e for e in cuda if "fake_quant" in e.key or "amax" in e.key or "fp4" in e.key.lower()),
                          key=lambda e: -e.self_device_time_total)
            for e in mine[:8]:
                print(f"   kernel {e.key[:70]:<70} x{e.count:<4} {e.self_device_time_total / 1e3:8.3f} ms")
    return out


def main(argv=None) -> dict:
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
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant (after 2 warm-up)")
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4], help="micro-batch counts (each divides --batch)")
    ap.add_argument("--micro-size", type=int,
                    help="sequences per micro-batch: the batch of M micro-batches is M x this (instead of --batch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="profile one step of none / nvfp4 / mxfp4 first (launches, host time)")
    ap.add_argument("--profile-micro", type=int, default=1, help="the micro-batch count of the --profile step")
    ap.add_argument("--many-batch-mb", type=float, nargs="*", default=[],
                    help="extra w4a16-nvfp4 columns with the multi-tensor launches capped at N MiB of weights")
    ap.add_argument("--l2-keep-mb", type=float, metavar="K",
                    help="with --many-batch-mb: a twin of each capped column with the L2 hints keeping K MiB")
    args = ap.parse_args(argv)
    if args.l2_keep_mb is not None and (args.l2_keep_mb <= 0 or not args.many_batch_mb):
        ap.error(f"--l2-keep-mb needs a size > 0 and --many-batch-mb: got {args.l2_keep_mb}")
    if any(mb <= 0 for mb in args.many_batch_mb):
        ap.error(f"--many-batch-mb sizes must be > 0: got {args.many_batch_mb}")
    order = order_for(args)
    if any(m < 1 for m in args.micro):
        ap.error(f"--micro counts must be >= 1: got {args.micro}")
    if args.micro_size is not None and args.micro_size < 1:
        ap.error(f"--micro-size must be >= 1: got {args.micro_size}")
    if args.micro_size is None and any(args.batch % m for m in args.micro):
        ap.error(f"each --micro must divide --batch {args.batch}: got {args.micro}")

    model = build(args)
    nparams = sum(p.numel() for p in model.parameters())
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    shape = (f"batch {args.batch}x{args.seq}" if args.micro_size is None
             else f"micro-batches of {args.micro_size}x{args.seq}")
    print(f"{card}: Llama-style {nparams / 1e9:.2f}B params, {args.dtype}, {shape}, "
          f"micro-batches {args.micro}, {args.rounds} rounds of {args.steps} steps, aqn_rs {aqn_rs.__version__} "
          f"(CUDA kernels: {aqn_rs.build_info()['cuda_available']})", flush=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    # One batch per distinct size: with --batch every micro-batch count splits the same batch.
    counts = set(args.micro) | ({args.profile_micro} if args.profile else set())
    sizes = {m: args.batch if args.micro_size is None else m * args.micro_size for m in counts}
    by_size = {n: torch.randint(0, args.vocab, (n, args.seq), generator=g).to(args.device)
               for n in sorted(set(sizes.values()))}
    batches = {m: by_size[n] for m, n in sizes.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    prof = profile_step(model, opt, batches[args.profile_micro], args) if args.profile else None
    rows, skipped = [], {}
    for r in range(1, args.rounds + 1):
        for micro in args.micro:
            got = {}
            for name in order:
                if name in skipped:
                    continue
                host = []
                times, why = measure(model, opt, batches[micro], args, name, micro, host)
                if why is not None:
                    skipped[name] = why
                    print(f"round {r} micro {micro}  {name:<26}skipped: {why}", flush=True)
                    continue
                got[name] = (statistics.median(times), times, host)
            base = (got["none-before"][0] + got["none-after"][0]) / 2
            for name, (ms, times, host) in got.items():
                rows.append({"round": r, "micro": micro, "variant": name, "ms": ms, "ratio": ms / base,
                             "min_ms": min(times), "times_ms": times, "host_ms": host})
                print(f"round {r} micro {micro}  {name:<26}{ms:>10.2f} ms/step{ms / base:>8.3f}x "
                      f"(min {min(times):.2f}, host {statistics.median(host):.2f})", flush=True)

    summary = {}
    for micro in args.micro:
        for name in order:
            mine = [x for x in rows if x["micro"] == micro and x["variant"] == name]
            if mine:
                summary.setdefault(str(micro), {})[name] = {
                    "ms": statistics.median(x["ms"] for x in mine),
                    "ratio": statistics.median(x["ratio"] for x in mine)}
    print(f"{card}: median over {args.rounds} rounds, ms/step (overhead vs the mean of none before/after)")
    print(f"{'variant':<26}" + "".join(f"{f'micro {m}':>23}" for m in args.micro))
    for name in order:
        if name in skipped:
            print(f"{name:<26}skipped: {skipped[name]}")
            continue
        cells = [summary[str(m)][name] for m in args.micro]
        print(f"{name:<26}" + "".join(f"{c['ms']:>12.2f} ({100 * (c['ratio'] - 1):+6.2f}%)" for c in cells))
    result = {"card": card, "params": nparams, "args": vars(args), "order": order,
              "rows": rows, "summary": summary, "skipped": skipped, "profile": prof}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
