"""Read back what a real verl run put into vLLM, and check it against the actor, bit for bit.

With `AQN_RS_PROBE_DIR=/path` in the environment of every verl process (`aqn-rs run --engine
verl` passes it, and `AQN_RS_PROBE_STEPS`, from its own environment through Ray's runtime env), the plugin records, for the weight syncs
of the global steps up to `AQN_RS_PROBE_STEPS` (default 2):

* actor rank 0, `actor-s{S}-in.safetensors`: the weight-sync stream as the actor's FSDP engine
  yields it (the master weights, before the fake quant), and `actor-s{S}-out.safetensors`:
  what the plugin sends to vLLM;
* every vLLM worker, read from its live model through `collective_rpc`:
  `rollout-s{S}-synced-w{R}` right after the sync, `rollout-s{S}-noised-w{R}` after the step's
  AQN went on, and `rollout-v{S}-clean-w{R}` during a validation;
* the trainer, `meta.json`: the plugin's quantization and noise blocks and the step count.

`python -m aqn_rs.integrations.verl_probe DIR` then checks, and writes `probe_report.json`:

1. the sent weights are the pure-torch reference fake quant (`aqn_rs.reference`) of the actor's
   weights cast to the compute dtype, with the fused q/k/v and gate/up amax for NVFP4;
2. every vLLM parameter after the sync equals what was sent (vLLM's fused `qkv_proj` /
   `gate_up_proj` are the row concatenation of the members), `embed_tokens` / `lm_head` are
   the actor's weights unquantized;
3. after the AQN, each RMSNorm gain is the synced gain plus `noise_for(name, gain, S)` of the
   run's seed and schedule, and every other parameter is unchanged;
4. during validation every parameter equals the synced (clean) value;
5. the actor's master weights are not quantized: not on the FP4 grid, and they move between
   syncs by optimizer-sized steps.

Nothing is recorded without the variable; recording costs a device-to-host copy of the model
per probed sync (a few hundred MB for a 135M model), so keep `AQN_RS_PROBE_STEPS` small.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from ..aqn import AqnNoise
from ..constants import VLLM_FUSED
from ..selection import normalize_name

logger = logging.getLogger(__name__)

ENV_DIR = "AQN_RS_PROBE_DIR"
ENV_STEPS = "AQN_RS_PROBE_STEPS"


def probe_dir() -> Optional[pathlib.Path]:
    d = os.environ.get(ENV_DIR)
    return pathlib.Path(d) if d else None


def probes(step: Any) -> bool:
    """Whether the sync / state of global step `step` is recorded."""
    if probe_dir() is None or step is None:
        return False
    try:
        return 0 <= int(step) <= int(os.environ.get(ENV_STEPS, "2"))
    except ValueError:
        return False


def _save(tensors: Dict[str, Any], path: pathlib.Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)  # a reader never sees half a file


def _full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rank0() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:
        return True


# ---- actor side -----------------------------------------------------------------------------


def record_sync(stream: Iterable[Tuple[str, Any]], step: Optional[int], quantize,
                actor_meta: Dict[str, Any]) -> Iterator[Tuple[str, Any]]:
    """`quantize(stream)` (the plugin's fake-quantizing sync), recording its input and output
    for a probed step on actor rank 0; otherwise exactly `quantize(stream)`. `actor_meta`:
    what the actor quantizes (`quant_modules`, fused `groups`, `param_dtype`, `format`,
    `scale_mode`), written to `actor-meta.json`."""
    if not (probes(step) and _rank0()):
        yield from quantize(stream)
        return
    seen_in: Dict[str, Any] = {}
    seen_out: Dict[str, Any] = {}

    def tap_in(s):
        for name, t in s:
            seen_in[name] = _full(t).detach().to("cpu", copy=True)
            yield name, t

    for name, t in quantize(tap_in(stream)):
        seen_out[name] = _full(t).detach().to("cpu", copy=True)
        yield name, t
    d = probe_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "actor-meta.json").write_text(json.dumps(actor_meta, indent=2, sort_keys=True))
    _save(seen_in, d / f"actor-s{int(step)}-in.safetensors")
    _save(seen_out, d / f"actor-s{int(step)}-out.safetensors")
    logger.warning("aqn_rs probe: recorded the weight sync of step %s (%d tensors) in %s", step, len(seen_out), d)


# ---- vLLM worker side ------------------------------------------------------------------------


def worker_dump(worker: Any, tag: str, models: List[Any]) -> int:
    """`vLLMColocateWorkerExtension.aqn_rs_probe`: this worker's live parameters to
    `rollout-{tag}-w{R}.safetensors` (R: the worker's rank; a suffix per model beyond the first)."""
    d = probe_dir()
    if d is None:
        return 0
    rank = getattr(worker, "rank", None)
    if rank is None:
        rank = getattr(getattr(worker, "model_runner", None), "rank", 0) or 0
    n = 0
    for i, model in enumerate(models):
        tensors = {name: p for name, p in model.named_parameters()}
        suffix = "" if i == 0 else f"-m{i}"
        _save(tensors, d / f"rollout-{tag}-w{int(rank)}{suffix}.safetensors")
        n += len(tensors)
    return n


# ---- trainer side ----------------------------------------------------------------------------


def write_meta(forwarded: Dict[str, Any]) -> None:
    d = probe_dir()
    if d is None:
        return
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").write_text(json.dumps(forwarded, indent=2, sort_keys=True, default=str))


# ---- the check --------------------------------------------------------------------------------


def _load(path: pathlib.Path) -> Dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _bits_equal(a, b) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def _hf_members(vllm_name: str) -> Optional[List[str]]:
    mod, _, leaf = vllm_name.rpartition(".")  # "...self_attn.qkv_proj", "weight"
    parent, _, fused = mod.rpartition(".")
    members = VLLM_FUSED.get(fused)
    if members is None:
        return None
    return [f"{parent}.{m}.{leaf}" for m in members]


def _reference_fake_quant(actor: Dict[str, Any], sent_in: Dict[str, Any], device: str) -> Dict[str, Any]:
    """The pure-torch reference's fake quant of every quantized Linear weight of the stream
    (the modules and fused groups the actor recorded), from the actor's weights cast to its
    compute dtype. On the CPU: on CUDA, torch computes `tensor / scalar` as a multiplication
    by the reciprocal (not IEEE division), so the reference is bit-exact only there."""
    import torch

    from .. import reference as ref
    dtype = getattr(torch, actor["param_dtype"])
    by_mod = {normalize_name(n[: -len(".weight")]): n for n in sent_in if n.endswith(".weight")}
    amax: Dict[str, float] = {}
    if actor["format"] == "nvfp4":
        for g in actor["groups"]:
            a = max(float(sent_in[by_mod[m]].to(device).to(dtype).float().abs().amax()) for m in g)
            amax.update({m: a for m in g})
    out = {}
    for m in actor["quant_modules"]:
        w = sent_in[by_mod[m]].to(device).to(dtype)
        if actor["format"] == "nvfp4":
            out[by_mod[m]] = ref.nvfp4_fake_quant(w, amax.get(m)).cpu()
        else:
            out[by_mod[m]] = ref.mxfp4_fake_quant(w, actor["scale_mode"]).cpu()
    return out


def check(dir_: str, device: Optional[str] = None) -> Dict[str, Any]:
    """Run the checks of the module docstring on a probe folder; returns the report."""
    import torch

    d = pathlib.Path(dir_)
    device = device or "cpu"
    meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
    actor = json.loads((d / "actor-meta.json").read_text()) if (d / "actor-meta.json").exists() else None
    quant = actor if actor and actor.get("quant_modules") else None
    noise_cfg = meta.get("noise_injection")
    steps = sorted({int(p.name.split("-")[1][1:]) for p in d.glob("actor-s*-out.safetensors")})
    report: Dict[str, Any] = {"dir": str(d), "steps": steps, "meta": meta, "checks": [], "failures": []}

    def ok(name: str, passed: bool, detail: str = "") -> None:
        report["checks"].append({"check": name, "passed": bool(passed), "detail": detail})
        if not passed:
            report["failures"].append(f"{name}: {detail}")

    if not steps:
        ok("recorded syncs", False, f"no actor-s*-out.safetensors in {d}")
        return report
    noise = None
    if noise_cfg:
        noise = AqnNoise.from_config(noise_cfg, int(meta["total_steps"]), apply_to="rollout")
    prev_in = None
    for s in steps:
        sent_in = _load(d / f"actor-s{s}-in.safetensors")
        sent = _load(d / f"actor-s{s}-out.safetensors")
        ok(f"s{s} stream complete", set(sent) == set(sent_in), f"{len(sent)} out, {len(sent_in)} in")
        # 1. what was sent == reference fake quant of the actor's weights
        quantized: Dict[str, Any] = {}
        if quant:
            quantized = _reference_fake_quant(quant, sent_in, device)
            proj = [n for n in sent_in if n.endswith("proj.weight")]
            missed = [n for n in proj if n not in quantized]
            ok(f"s{s} every projection weight quantized", not missed,
               f"{len(quantized)} quantized" + (f"; not quantized: {missed[:3]}" if missed else ""))
            bad = [n for n, q in quantized.items() if not _bits_equal(sent[n], q)]
            ok(f"s{s} sync == reference fake_quant(actor)", not bad and bool(quantized),
               f"{len(quantized) - len(bad)}/{len(quantized)} Linear weights bit-exact" + (f"; first bad {bad[0]}" if bad else ""))
            # 5. masters are not quantized
            on_grid = []
            for n, q in quantized.items():
                w = sent_in[n].to(q.dtype)
                on_grid.append(float((w == q).float().mean()))
            frac = max(on_grid) if on_grid else 0.0
            ok(f"s{s} actor masters unquantized", frac < 0.5, f"max fraction of elements on the FP4 grid {frac:.3f}")
        passthrough = [n for n in sent if n not in quantized]
        bad = [n for n in passthrough if not _bits_equal(sent[n], sent_in[n])]
        ok(f"s{s} unselected tensors passed through", not bad, f"{len(passthrough)} tensors" + (f"; first changed {bad[0]}" if bad else ""))
        if prev_in is not None and quantized:
            deltas = [float((sent_in[n].float() - prev_in[n].float()).abs().max()) for n in quantized if n in prev_in]
            moved = sum(x > 0 for x in deltas)
            ok(f"s{s} masters moved since the last probed sync", moved > 0, f"{moved}/{len(deltas)} moved, max |dw| {max(deltas):.3g}")
        prev_in = sent_in

        # 2. the rollout after the sync == what was sent
        for synced_path in sorted(d.glob(f"rollout-s{s}-synced-w*.safetensors")):
            worker = synced_path.name.split("-")[-1].split(".")[0]
            synced = _load(synced_path)
            matched, bad, unmatched = 0, [], []
            for vn, vt in synced.items():
                members = _hf_members(vn)
                if members is not None and all(m in sent for m in members):
                    want = torch.cat([sent[m] for m in members], 0)
                elif vn in sent:
                    want = sent[vn]
                else:
                    unmatched.append(vn)
                    continue
                want = want.to(vt.dtype)  # vLLM copies into its bf16 parameters (round to nearest even)
                if _bits_equal(vt, want):
                    matched += 1
                else:
                    bad.append(vn)
            ok(f"s{s} {worker} rollout weights == sync", not bad and not unmatched and matched > 0,
               f"{matched} vLLM parameters bit-exact" + (f"; differ: {bad[:3]}" if bad else "") +
               (f"; no actor tensor for {unmatched[:3]}" if unmatched else ""))
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                if key in synced and key in sent_in:
                    ok(f"s{s} {worker} {key} untouched", _bits_equal(synced[key], sent_in[key].to(synced[key].dtype)),
                       "equals the actor's weight, unquantized")
            # 3. the noise of step s on the RMSNorm gains, nothing else changed
            noised_path = d / synced_path.name.replace("-synced-", "-noised-")
            if noised_path.exists():
                noised = _load(noised_path)
                if noise is not None and float(noise.sigma(s)) > 0:
                    norm_ok, norm_bad, other_bad, linear_noise = 0, [], [], []
                    for vn, vt in noised.items():
                        is_norm = vn.endswith("norm.weight")
                        selected = noise.selector.decide(vn[: -len(".weight")], "RMSNorm" if is_norm else "Linear")[0]
                        if is_norm and selected:
                            clean = synced[vn].to(device)
                            want = (clean + noise.noise_for(vn[: -len(".weight")], clean, s)).cpu()
                            if _bits_equal(vt, want):
                                norm_ok += 1
                            else:
                                norm_bad.append(vn)
                        elif not is_norm and selected and vt.dim() == 2:
                            linear_noise.append(vn)
                        elif not _bits_equal(vt, synced[vn]):
                            other_bad.append(vn)
                    ok(f"s{s} {worker} RMSNorm gains carry noise(seed, {s}, name)", norm_ok > 0 and not norm_bad,
                       f"{norm_ok} gains bit-exact, sigma {noise.sigma(s):.3g}" + (f"; differ: {norm_bad[:3]}" if norm_bad else ""))
                    ok(f"s{s} {worker} unnoised parameters unchanged", not other_bad,
                       f"changed: {other_bad[:3]}" if other_bad else "all equal the synced values")
                    if linear_noise:
                        report.setdefault("not_checked", []).append(
                            f"s{s} {worker}: Linear noise on {len(linear_noise)} weights (only RMSNorm noise is recomputed)")
                else:
                    bad = [n for n in noised if not _bits_equal(noised[n], synced[n])]
                    ok(f"s{s} {worker} no noise (sigma 0 or no AQN)", not bad, f"changed: {bad[:3]}" if bad else "")
    # 4. validation saw clean weights
    for clean_path in sorted(d.glob("rollout-v*-clean-w*.safetensors")):
        s = int(clean_path.name.split("-")[1][1:])
        worker = clean_path.name.split("-")[-1].split(".")[0]
        synced_path = d / f"rollout-s{s}-synced-{worker}.safetensors"
        if not synced_path.exists():
            report.setdefault("not_checked", []).append(f"{clean_path.name}: no synced record of step {s}")
            continue
        clean, synced = _load(clean_path), _load(synced_path)
        bad = [n for n in synced if n not in clean or not _bits_equal(clean[n], synced[n])]
        ok(f"v{s} {worker} validation on clean weights", not bad,
           f"{len(synced) - len(bad)}/{len(synced)} parameters equal the synced ones")
    report["passed"] = not report["failures"]
    return report


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m aqn_rs.integrations.verl_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--device", default="cpu", help="where the reference runs (cpu: bit-exact)")
    args = ap.parse_args(argv)
    rep = check(args.dir, args.device)
    for c in rep["checks"]:
        print(f"{'ok  ' if c['passed'] else 'FAIL'} {c['check']}: {c['detail']}")
    for n in rep.get("not_checked", []):
        print(f"not checked: {n}")
    print(f"{len(rep['checks']) - len(rep['failures'])}/{len(rep['checks'])} checks passed")
    pathlib.Path(args.dir, "probe_report.json").write_text(json.dumps(rep, indent=2, default=str))
    return 0 if rep.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
