"""The scan with calibration data: the per-layer output error on real activations and the
end-to-end NLL change of the fake-quantized model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..constants import DEFAULT_EXCLUDE
from ..errors import ScanError
from ..experiments.data import builtin_problems
from ..quantizers import Nvfp4Quantizer
from .layers import _Progress
from .metrics import FormatSpec, _num
from .source import ModelSource


def calibration_texts(calib: str, n: int) -> Tuple[List[str], str]:
    """The first `n` calibration texts and a description.

    `calib` is "builtin" (the experiments' built-in GSM8K-style problems, test split), a
    `.jsonl` file (records with question+answer (GSM8K), prompt+response/completion, text, or
    messages), or a text file (paragraphs separated by blank lines, else one sample a line).
    """
    if n <= 0:
        raise ScanError(f"--calib-samples must be positive, got {n}")
    if calib == "builtin":
        recs = builtin_problems("test", n)
        return [f"{r['question']}\n{r['answer']}" for r in recs], f"builtin problems (test split, {n})"
    p = Path(calib).expanduser()
    if not p.is_file():
        raise ScanError(f"calibration file {p} does not exist (pass a .jsonl/.txt file or 'builtin')")
    texts: List[str] = []
    if p.suffix in (".jsonl", ".json"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ScanError(f"{p} line {i} is not JSON: {e}") from None
            if isinstance(r, str):
                texts.append(r)
            elif isinstance(r, dict) and "question" in r:
                texts.append(f"{r['question']}\n{r.get('answer', '')}".rstrip())
            elif isinstance(r, dict) and "prompt" in r:
                texts.append(f"{r['prompt']}{r.get('response', r.get('completion', ''))}")
            elif isinstance(r, dict) and "text" in r:
                texts.append(str(r["text"]))
            elif isinstance(r, dict) and isinstance(r.get("messages"), list):
                texts.append("\n".join(str(m.get("content", "")) for m in r["messages"] if isinstance(m, dict)))
            else:
                raise ScanError(f"{p} line {i}: expected question/answer, prompt/response, text or messages")
            if len(texts) >= n:
                break
    else:
        body = p.read_text()
        parts = [s.strip() for s in re.split(r"\n\s*\n", body)] if "\n\n" in body else body.splitlines()
        texts = [s for s in parts if s.strip()][:n]
    if not texts:
        raise ScanError(f"calibration file {p} has no samples")
    return texts, f"{p} (first {len(texts)})"


def run_calibration(src: ModelSource, results: Dict[str, Any], specs: Sequence[FormatSpec], calib: str,
                    samples: int, batch_size: int, max_length: int, device: str,
                    selector_args=(None, DEFAULT_EXCLUDE), fuse: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Load the model, run the calibration texts teacher-forced, and record (a) per scanned
    layer and format the error of the layer's output when only its weight is fake-quantized
    (its clean input, `F.linear(x, Q(W))` vs `F.linear(x, W)`), into each layer's
    `metrics[fmt]["output"]`, and (b) the mean NLL per token of the clean model and of the
    model with every selected layer fake-quantized (`quantize_model`). Returns the `calib` block.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hooks import quantize_model

    if src.folder is None or (src.kind != "gguf" and not (src.folder / "config.json").is_file()):
        raise ScanError(f"--calib runs the model, which needs a config.json next to the weights ({src.path})")
    texts, desc = calibration_texts(calib, samples)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kw = {"gguf_file": src.gguf.name} if src.gguf else {}
    if not src.gguf and not any((src.folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ScanError(f"--calib needs the model's tokenizer next to its config (tokenizer.json or "
                        f"tokenizer_config.json in {src.folder}); copy it there from the base model")
    try:
        tok = AutoTokenizer.from_pretrained(str(src.folder), **kw)
    except (OSError, ValueError) as e:
        raise ScanError(f"--calib: cannot load the tokenizer of {src.folder}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=dtype, **kw).to(device).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF-loaded: dequantized already
        model.hf_quantizer = None
    mods = dict(model.named_modules())
    by_name = {e["name"]: e for e in results["layers"]}
    group_amax = {}
    if fuse and any(s.format == "nvfp4" for s in specs):
        from ..export import fused_weight_groups

        chosen = [e["name"] for e in results["layers"] if not e["excluded"] and e["type"] == "linear" and e["name"] in mods]
        for members in fused_weight_groups(chosen):
            a = max(float(Nvfp4Quantizer().amax(mods[m].weight.detach().contiguous())) for m in members)
            group_amax.update({m: a for m in members})
    acc = {(n, s.key): [0.0, 0.0, 0] for n in by_name for s in specs}
    state: Dict[str, Any] = {"mask": None}

    def hook(name):
        def fn(module, args, output):
            w = module.weight.detach().contiguous()
            mask = state["mask"]
            y = output.detach()[mask].float()
            sy = float(torch.sum(y * y, dtype=torch.float64))
            for s in specs:
                q = s.quantizer()
                wq = q.fake_quant(w, group_amax.get(name)) if s.format == "nvfp4" else q.fake_quant(w)
                if isinstance(module, torch.nn.Embedding):
                    yq = F.embedding(args[0], wq)
                else:
                    yq = F.linear(args[0], wq, module.bias)
                err = yq.detach()[mask].float() - y
                a = acc[(name, s.key)]
                a[0] += sy
                a[1] += float(torch.sum(err * err, dtype=torch.float64))
                a[2] += int(mask.sum())
        return fn

    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        batches.append({k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")})

    def nll_pass(label: str) -> Tuple[float, int]:
        total, count = 0.0, 0
        bar = _Progress(len(batches), progress, desc=f"calib {label}", unit="batch")
        with torch.no_grad():
            for b in batches:
                state["mask"] = b["attention_mask"].bool()
                logits = model(**b).logits
                labels = b["input_ids"].masked_fill(~state["mask"], -100)
                total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100, reduction="sum"))
                count += int((labels[:, 1:] != -100).sum())
                bar.update(label)
        bar.close()
        return total, count

    handles = [mods[n].register_forward_hook(hook(n)) for n in by_name if n in mods]
    try:
        base_sum, tokens = nll_pass("clean")
    finally:
        for h in handles:
            h.remove()
    base = base_sum / max(tokens, 1)
    for (name, key), (sy, se, ntok) in acc.items():
        if ntok == 0:
            continue
        by_name[name]["metrics"][key]["output"] = {
            "sqnr_db": _num(10 * math.log10(sy / se), 8) if se > 0 and sy > 0 else None,
            "rel_err": _num(math.sqrt(se / sy), 8) if sy > 0 else None,
            "sum_y2": sy, "sum_err2": se, "tokens": ntok,
        }
    include, exclude = selector_args
    nll: Dict[str, Any] = {"clean": base}
    for s in specs:
        h = quantize_model(model, s.quantizer(), exclude=exclude, include=include,
                           layer_types=("linear", "embedding"), fuse_global_scales=fuse, cache=False)
        try:
            qs, _ = nll_pass(s.key)
        finally:
            h.remove()
        qn = qs / max(tokens, 1)
        nll[s.key] = {"nll": qn, "delta": qn - base, "ppl_ratio": math.exp(qn - base)}
    return {"source": desc, "samples": len(texts), "tokens": tokens, "batch_size": batch_size,
            "max_length": max_length, "model_dtype": str(dtype).removeprefix("torch."), "nll": nll}


