#!/usr/bin/env python3
"""vLLM serves what `aqn-rs export` writes: greedy tokens and logits against transformers.

For each format (bf16 as the yardstick, then NVFP4 and MXFP4 W4A16):
  1. the model folder is exported with `aqn_rs.export_checkpoint` (bf16: the folder itself);
  2. vLLM (in its own subprocess, so each engine frees its GPU memory) loads the export and
     generates greedily from a fixed prompt set (GSM8K test questions in the chat template),
     returning the chosen token's raw logit (`logprobs_mode="raw_logits"`; raw log-probs where
     the vLLM build refuses that mode);
  3. transformers runs the same bf16 model with `aqn_rs.quantize_model` (the fake quant the
     actor trains with) -- free-running greedy from the same prompts, and teacher-forced on
     vLLM's tokens.

Reported per format: greedy sequences identical, mean common prefix, the teacher-forced
argmax agreement (transformers' argmax equals vLLM's token, on vLLM's prefix: free of the
divergence cascade after one near-tie), and the mean / max |logit difference| of vLLM's chosen
tokens. Marlin's bf16 GEMM is not bit-exact against cuBLAS, so the FP4 exports are held to the
bf16 pair's measured disagreement: argmax agreement at least bf16's minus 0.05 and mean
|logit difference| at most twice bf16's plus 0.05 (exit 1 otherwise).

    python3 scripts/vllm_export_check.py --model FOLDER --out DIR [--data GSM8K_DIR] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

DEVICE = "cuda"  # the tests run the transformers side on the CPU

FALLBACK_PROMPTS = [
    "What is 12 times 7? Explain step by step.",
    "Write a short sentence about the sea.",
    "List three prime numbers greater than 20.",
    "Tom has 5 apples and buys 8 more. How many apples does he have?",
]


def prompt_ids(model: str, data: str | None, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    qs: list[str] = []
    if data:
        f = Path(data) / "test.jsonl" if Path(data).is_dir() else Path(data)
        with open(f) as fh:
            for line in fh:
                qs.append(json.loads(line)["question"])
                if len(qs) == n:
                    break
    qs = qs or FALLBACK_PROMPTS[:n]
    out = []
    for q in qs:
        msgs = [{"role": "user", "content": q + " Let's think step by step."}]
        if tok.chat_template:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(q)["input_ids"]
        out.append([int(i) for i in ids])
    return out


# ---------------------------------------------------------------------------------------------
# vLLM side (a subprocess per engine)
# ---------------------------------------------------------------------------------------------

def vllm_worker(folder: str, job: str, result: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(job).read_text())
    t0 = time.perf_counter()
    kw = dict(model=folder, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", seed=0,
              gpu_memory_utilization=0.3, max_model_len=2048)
    mode = "raw_logits"
    try:
        llm = LLM(logprobs_mode=mode, **kw)
    except Exception as e:  # a build whose sampler refuses raw logits: log-probs instead
        print(f"logprobs_mode=raw_logits refused ({type(e).__name__}: {e}); using raw_logprobs", flush=True)
        mode = "raw_logprobs"
        llm = LLM(logprobs_mode=mode, **kw)
    t_load = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True, logprobs=1, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sp, use_tqdm=False)
    t_gen = time.perf_counter() - t0
    seqs, vals = [], []
    for o in outs:
        c = o.outputs[0]
        seqs.append([int(t) for t in c.token_ids])
        vals.append([float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)])
    schemes = []
    try:  # which linear method vLLM chose for each quantized layer (the Marlin kernels on Hopper)
        def _names(model):
            s = set()
            for m in model.modules():
                sch = getattr(m, "scheme", None)
                if sch is not None:
                    k = getattr(sch, "kernel", None) or getattr(sch, "linear_kernel", None)
                    s.add(type(sch).__name__ + (f"/{type(k).__name__}" if k is not None else ""))
            return sorted(s)
        schemes = llm.apply_model(_names)[0]
    except Exception as e:
        schemes = [f"unknown ({type(e).__name__}: {e})"]
    Path(result).write_text(json.dumps({"tokens": seqs, "values": vals, "mode": mode, "schemes": schemes,
                                        "load_s": t_load, "generate_s": t_gen}))


def run_vllm(folder: Path, job: Path, result: Path, log: Path) -> dict:
    cmd = [sys.executable, __file__, "--vllm-worker", str(folder), str(job), str(result)]
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    if rc != 0 or not result.is_file():
        sys.stderr.write(text[-6000:])
        raise SystemExit(f"vLLM on {folder} failed (exit {rc}); log: {log}")
    r = json.loads(result.read_text())
    r["kernel_lines"] = sorted(set(re.findall(r"Using (\w*(?:Marlin|Kernel)\w*)", text)))
    return r


# ---------------------------------------------------------------------------------------------
# transformers side
# ---------------------------------------------------------------------------------------------

def hf_model(model: str, fmt: str):
    """The bf16 model as the actor computes: `quantize_model` with the export's defaults."""
    import torch
    from transformers import AutoModelForCausalLM

    import aqn_rs

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").to(DEVICE).eval()
    if fmt == "nvfp4":
        aqn_rs.quantize_model(m, aqn_rs.Nvfp4Quantizer())
    elif fmt == "mxfp4":
        aqn_rs.quantize_model(m, aqn_rs.Mxfp4Quantizer())
    return m


def hf_greedy(m, prompt: list[int], n: int) -> list[int]:
    """Greedy with the KV cache, never stopping at eos (as vLLM's ignore_eos)."""
    import torch

    ids = torch.tensor([prompt], device=DEVICE)
    out, past = [], None
    with torch.inference_mode():
        for _ in range(n):
            r = m(input_ids=ids, past_key_values=past, use_cache=True)
            past = r.past_key_values
            t = int(r.logits[0, -1].float().argmax())
            out.append(t)
            ids = torch.tensor([[t]], device=DEVICE)
    return out


def hf_forced(m, prompt: list[int], toks: list[int], mode: str):
    """transformers' argmax and value (logit or log-prob) of `toks` at each position, on vLLM's prefix."""
    import torch

    ids = torch.tensor([prompt + toks], device=DEVICE)
    with torch.inference_mode():
        lg = m(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    if mode.endswith("logprobs"):
        lg = torch.log_softmax(lg, dim=-1)
    tt = torch.tensor(toks, device=DEVICE)
    return lg.argmax(-1).tolist(), lg.gather(1, tt[:, None])[:, 0].tolist()


def compare(m, prompts, v: dict) -> dict:
    n_same = 0
    prefix, agree, total, diffs = [], 0, 0, []
    for p, vt, vv in zip(prompts, v["tokens"], v["values"]):
        ht = hf_greedy(m, p, len(vt))
        n_same += ht == vt
        k = next((i for i, (a, b) in enumerate(zip(ht, vt)) if a != b), len(vt))
        prefix.append(k)
        am, hv = hf_forced(m, p, vt, v["mode"])
        agree += sum(int(a == b) for a, b in zip(am, vt))
        total += len(vt)
        diffs += [abs(a - b) for a, b in zip(hv, vv)]
    return {
        "greedy_identical": f"{n_same}/{len(prompts)}",
        "greedy_identical_frac": n_same / len(prompts),
        "mean_common_prefix": sum(prefix) / len(prefix),
        "forced_argmax_agreement": agree / total,
        "mean_abs_diff": sum(diffs) / len(diffs),
        "max_abs_diff": max(diffs),
        "value": "logit" if v["mode"] == "raw_logits" else "log-prob",
    }


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--vllm-worker":
        vllm_worker(*sys.argv[2:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a transformers folder (safetensors + config.json)")
    ap.add_argument("--out", required=True, help="folder for the exports and the engines' logs")
    ap.add_argument("--data", help="GSM8K folder or jsonl (questions become the prompts)")
    ap.add_argument("--formats", default="bf16,nvfp4,mxfp4")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args(argv)
    fmts = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in fmts if f not in ("bf16", "nvfp4", "mxfp4")]
    if bad or not fmts:
        ap.error(f"--formats: {bad or 'empty'}; expected a list of bf16, nvfp4, mxfp4")
    import torch

    if not torch.cuda.is_available():
        print("vllm_export_check: needs a CUDA GPU (vLLM and the Marlin kernels)", file=sys.stderr)
        return 2
    import aqn_rs

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_ids(a.model, a.data, a.prompts)
    job = out / "job.json"
    job.write_text(json.dumps({"prompts": prompts, "tokens": a.tokens}))
    report = {"model": a.model, "gpu": torch.cuda.get_device_name(), "prompts": len(prompts),
              "tokens": a.tokens, "formats": {}}
    for fmt in fmts:
        t0 = time.perf_counter()
        folder = Path(a.model)
        if fmt != "bf16":
            folder = aqn_rs.export_checkpoint(a.model, out / fmt, format=fmt, overwrite=True, device=DEVICE)
        t_exp = time.perf_counter() - t0
        v = run_vllm(folder, job, out / f"vllm_{fmt}.json", out / f"vllm_{fmt}.log")
        m = hf_model(a.model, fmt)
        r = compare(m, prompts, v)
        del m
        torch.cuda.empty_cache()
        r.update(export_s=round(t_exp, 2), vllm_load_s=round(v["load_s"], 2), vllm_generate_s=round(v["generate_s"], 2),
                 vllm_schemes=v["schemes"], vllm_kernel_log=v["kernel_lines"])
        report["formats"][fmt] = r
        print(f"{fmt:6s} greedy identical {r['greedy_identical']:>6s}, common prefix {r['mean_common_prefix']:5.1f}/{a.tokens}, "
              f"forced argmax agreement {r['forced_argmax_agreement']:.4f}, |d {r['value']}| mean {r['mean_abs_diff']:.4f} "
              f"max {r['max_abs_diff']:.4f}; vLLM {', '.join(v['schemes']) or '-'} {' '.join(v['kernel_lines'])}", flush=True)
    ok = True
    base = report["formats"].get("bf16")
    if base:
        for fmt, r in report["formats"].items():
            if fmt == "bf16":
                continue
            r["within_bf16_tolerance"] = (r["forced_argmax_agreement"] >= base["forced_argmax_agreement"] - 0.05
                                          and r["mean_abs_diff"] <= 2 * base["mean_abs_diff"] + 0.05)
            ok &= r["within_bf16_tolerance"]
        report["tolerance"] = ("FP4 export vs transformers+quantize_model: forced argmax agreement >= bf16's - 0.05, "
                               "mean |diff| <= 2 x bf16's + 0.05 (bf16 = vLLM bf16 vs transformers bf16, same run)")
        print(("PASS: " if ok else "FAIL: ") + report["tolerance"])
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
