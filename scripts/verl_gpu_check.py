#!/usr/bin/env python3
"""The verl plugin's actor path and weight-sync path on a real transformers model, on CUDA.

Run on the GPU machine (docs/guides/VERL.md says what this covers and what it does not):

    python3 scripts/verl_gpu_check.py                       # tiny Qwen2s, then Qwen2.5-1.5B's shape
    python3 scripts/verl_gpu_check.py --config qwen2.5-1.5b --model /path/to/Qwen2.5-1.5B-Instruct
    python3 scripts/verl_gpu_check.py --device cpu --config tiny --engine verl   # what CI runs

For each config and format (MXFP4, NVFP4) it builds a Qwen2 model with transformers (random
weights from the config, or `--model PATH`), installs the plugin on it the way verl's FSDP
engine does, and checks:

1. actor: the plugin's hooks go in before FSDP2 wraps the model (`FSDPEngine._build_fsdp_module`
   when verl is importable, `--engine verl`; else the same steps by hand, `--engine fsdp2`:
   fp32 master weights, bf16 compute, one rank);
2. sync: the weight-sync stream (verl's `get_per_tensor_param`, or `state_dict()` +
   `full_tensor()` as verl does) carries `fake_quant` of each selected Linear weight in bf16,
   with the fused q/k/v and gate/up amax for NVFP4, and every other tensor unchanged;
3. train: optimizer steps with the STE and the actor's RMSNorm AQN: gradients reach the fake-
   quantized weights, the weights move, the next sync is again exactly `fake_quant`;
4. rollout: a plain bf16 transformers model loaded with the synced weights plus the
   rollout-side AQN of the same step (`aqn_rs_apply`, what the vLLM workers run) gives
   bit for bit the actor's logits;
5. noise: the Philox noise on the device equals the CPU's, and the fused qkv/gate_up noise
   equals the actor's per-module draws;
6. timing: the sync's fake quant (whole model) and the per-step rollout AQN, in ms.

vLLM, Ray and verl's trainer do not run here (the GPU machine has none of them); the rollout
is stood in for by a transformers model with the weights vLLM would get.

Exit status 0 when every check passes; a JSON summary goes to `--json` (default
`$OUT/verl_gpu_check.json` when $OUT is set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

import torch

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
try:
    import aqn_rs
except ImportError:  # not installed: the checkout (with its built extension)
    sys.path.insert(0, _SRC)
    import aqn_rs
try:
    import aqn_rs.integrations  # noqa: F401
except ImportError:  # an installed wheel older than the plugin: its Python from the checkout
    aqn_rs.__path__.append(os.path.join(_SRC, "aqn_rs"))
from aqn_rs.aqn import gaussian_noise  # noqa: E402
from aqn_rs.integrations import verl as plugin  # noqa: E402
from aqn_rs.integrations.verl import patches as plugin_patches  # noqa: E402

CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=128, tie_word_embeddings=False),
    "tiny-tied": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, tie_word_embeddings=True),
    # Qwen2.5-1.5B-Instruct's config.json (the plan's model), random weights
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                         num_hidden_layers=28, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
}
NOISE = {"enabled": True, "sigma_start": 0.05, "sigma_end": 0.0005, "num_stages": 10, "layer_types": ["rmsnorm"]}
TOTAL = 20
GROUPS = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
          "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
          "up_proj": ("gate_proj", "up_proj")}


class Report:
    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []

    def check(self, what: str, ok: bool, **info: Any) -> bool:
        self.rows.append({"check": what, "ok": bool(ok), **info})
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        print(f"  {'PASS' if ok else 'FAIL'}  {what}  {extra}", flush=True)
        return ok

    def note(self, what: str, **info: Any) -> None:
        self.rows.append({"check": what, "ok": None, **info})
        print(f"  ....  {what}  " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r["ok"] is False)


def sync_dev(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device, timings: Dict[str, float], key: str):
    """`timings[key]`: the block's wall time in ms, with the device's queue drained on both sides."""
    sync_dev(device)
    t0 = time.perf_counter()
    yield
    sync_dev(device)
    timings[key] = 1e3 * (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Engines: verl's FSDPEngine (with verl installed) or the same steps by hand
# ---------------------------------------------------------------------------------------------


def cpu_platform_for_verl() -> None:
    """verl >= 0.9 picks its device through a platform registry that has no CPU entry; a CPU
    platform lets its FSDP engine run with gloo (CI's check)."""
    from verl.plugin.platform import platform_manager as pm
    from verl.plugin.platform.platform_base import PlatformBase

    class CPUPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = torch.cpu

        def is_available(self): return True
        def current_device(self): return "cpu"
        def device_count(self): return 1
        def set_device(self, i): pass
        def synchronize(self, i=None): pass
        def manual_seed(self, s): torch.manual_seed(s)
        def manual_seed_all(self, s): torch.manual_seed(s)
        def empty_cache(self): pass
        def communication_backend_name(self): return "gloo"
        def set_allocator_settings(self, s): pass
        def cudart(self): return None
        def get_device_capability(self, i=0): return (None, None)
        def is_ipc_supported(self): return False
        def nvtx_range(self, msg): return contextlib.nullcontext()
        def profiler_start(self): pass
        def profiler_stop(self): pass
        def ray_noset_envvars(self): return []
        def ray_resource_name(self): return "CPU"
        def visible_devices_envvar(self): return "CUDA_VISIBLE_DEVICES"

    pm.set_platform(CPUPlatform())


class VerlEngine:
    """verl's FSDPEngineWithLMHead (FSDP2), built through the plugin's patched hook points."""

    name = "verl"

    def __init__(self, path: str, cfg: plugin.PluginConfig, device: torch.device) -> None:
        from verl.trainer.config import CheckpointConfig
        from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        mc = HFModelConfig(path=path, load_tokenizer=False, override_config={"attn_implementation": "eager"},
                           use_remove_padding=False, enable_gradient_checkpointing=True, external_lib=plugin.PLUGIN)
        ec = FSDPEngineConfig(strategy="fsdp2", forward_only=False)
        oc = FSDPOptimizerConfig(lr=1e-4, total_training_steps=TOTAL)
        # what ActorRolloutRefWorker.init_model sets (the state lives in the patches module)
        plugin_patches._ACTOR_PENDING = cfg
        try:
            self.engine = FSDPEngineWithLMHead(model_config=mc, engine_config=ec, optimizer_config=oc,
                                               checkpoint_config=CheckpointConfig())
            self.engine.initialize()
        finally:
            plugin_patches._ACTOR_PENDING = None
        self.engine.to(device=str(device.type), model=True, optimizer=True, grad=True)
        self.module = self.engine.module
        self.state = self.engine._aqn_rs_actor
        self.hf_config = mc.hf_config

    def sync(self) -> Dict[str, torch.Tensor]:
        gen, _ = self.engine.get_per_tensor_param()
        return dict(gen)

    def step(self) -> float:
        norm = float(self.engine.optimizer_step())
        self.engine.optimizer.zero_grad(set_to_none=True)  # verl zeroes them before each train batch
        return norm


class HandEngine:
    """The FSDP engine's steps without verl: hooks, then fully_shard per decoder layer and on
    the root with bf16 compute / fp32 reduce, AdamW; the sync as verl's get_per_tensor_param."""

    name = "fsdp2"

    def __init__(self, path: str, cfg: plugin.PluginConfig, device: torch.device) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoConfig, AutoModelForCausalLM

        self.hf_config = AutoConfig.from_pretrained(path, attn_implementation="eager")
        model = AutoModelForCausalLM.from_pretrained(path, config=self.hf_config, dtype=torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.state = plugin.ActorState(model, cfg, torch.bfloat16)  # FSDPEngine._build_fsdp_module
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
        model.to(device)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self.module = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def sync(self) -> Dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        params = self.module.state_dict()
        gen = ((n, p.full_tensor() if isinstance(p, DTensor) else p) for n, p in params.items())
        return dict(self.state.wrap_sync(gen))

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.invalidate()  # what the plugin's FSDPEngine.optimizer_step wrapper does
        return float(norm)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def full_state(module) -> Dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in module.state_dict().items()}


def expected_sync(src: Dict[str, torch.Tensor], quantized: List[str], q) -> Dict[str, torch.Tensor]:
    mods = set(quantized)
    out = {}
    for name, t in src.items():
        mod, _, leaf = name.rpartition(".")
        if leaf != "weight" or plugin.normalize_name(mod) not in mods:
            out[name] = t
            continue
        parent, _, short = mod.rpartition(".")
        members = GROUPS.get(short, (short,)) if q.format == "nvfp4" else (short,)
        members = tuple(m for m in members if f"{parent}.{m}" in mods)
        w = t.to(torch.bfloat16).contiguous()
        if len(members) > 1:
            amax = torch.stack([src[f"{parent}.{m}.weight"].to(torch.bfloat16).abs().amax().float()
                                for m in members]).amax()
            out[name] = q.fake_quant(w, amax=amax)
        else:
            out[name] = q.fake_quant(w)
    return out


def compare_sync(rep: Report, tag: str, got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                 n_quant: int) -> None:
    same_keys = sorted(got) == sorted(want)
    bad = [k for k in want if k in got and not torch.equal(got[k].to(want[k].device), want[k])]
    rep.check(f"{tag}: sync == fake_quant (bf16, fused amax) / untouched", same_keys and not bad,
              tensors=len(got), quantized=n_quant, mismatched=len(bad), first=bad[0] if bad else None)


class FakeWorker:
    def __init__(self, model) -> None:
        self.model_runner = type("Runner", (), {"model": model})()


def checked_sync(rep: Report, eng, q, device: torch.device, timings: Dict[str, float], key: str,
                 tag: str) -> Dict[str, torch.Tensor]:
    """One timed weight sync (`timings[key]`), checked against `fake_quant` of the actor's weights."""
    with timed(device, timings, key):
        synced = eng.sync()
    quantized = eng.state.quant_modules
    compare_sync(rep, tag, synced, expected_sync(full_state(eng.module), quantized, q), len(quantized))
    return synced


def rollout_model(hf_config, synced: Dict[str, torch.Tensor], device: torch.device):
    """A plain transformers model with bf16 parameters (buffers as in the actor) holding the
    synced weights: the weights vLLM's load_weights would get."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        m = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)
    missing, unexpected = m.load_state_dict({k: v.to(device, torch.bfloat16) for k, v in synced.items()}, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"rollout model load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(hf_config, "tie_word_embeddings", False):
        m.tie_weights()
    m.eval()
    return m


def run_one(rep: Report, engine_cls, path: str, fmt: str, device: torch.device, steps: int, batch: int,
            seq: int, timings: Dict[str, float]) -> None:
    tag = f"{engine_cls.name}/{fmt}"
    cfg = plugin.parse_config({"format": fmt}, NOISE, TOTAL)
    t0 = time.perf_counter()
    eng = engine_cls(path, cfg, device)
    st = eng.state
    rep.note(f"{tag}: built", seconds=round(time.perf_counter() - t0, 1), quantized=len(st.quant_modules),
             fused_amax_caches=len(st._group_amaxes), module=type(eng.module).__name__)
    linears = sum(1 for n, m in eng.module.named_modules() if isinstance(m, torch.nn.Linear))
    rep.check(f"{tag}: every Linear but lm_head fake-quantized", len(st.quant_modules) == linears - 1,
              linears=linears, quantized=len(st.quant_modules))
    q = aqn_rs.Mxfp4Quantizer() if fmt == "mxfp4" else aqn_rs.Nvfp4Quantizer()

    st.set_step(0)
    s0 = checked_sync(rep, eng, q, device, timings, f"{tag}/sync_ms", f"{tag} step 0")
    rep.note(f"{tag}: sync error", **{k: round(v, 5) for k, v in (st.last_stats or {}).items()
                                      if isinstance(v, float)})

    vocab = eng.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    eng.module.train()
    qname = next(n for n in st.quant_modules if n.endswith("self_attn.q_proj"))
    for s in range(1, steps + 1):
        st.set_step(TOTAL // 2 + s)  # a noisy stage
        out = eng.module(input_ids=ids)
        loss = out.logits.float().logsumexp(-1).mean()
        loss.backward()
        grad = dict(eng.module.named_parameters())[qname + ".weight"].grad
        gnorm = float((grad.full_tensor() if hasattr(grad, "full_tensor") else grad).float().norm())
        norm = eng.step()
        rep.check(f"{tag}: train step {s} (STE gradient reaches {qname})", gnorm > 0 and norm == norm,
                  loss=round(float(loss), 4), q_proj_grad_norm=round(gnorm, 6), grad_norm=round(norm, 4))
    s1 = checked_sync(rep, eng, q, device, timings, f"{tag}/sync_ms_warm", f"{tag} after {steps} step(s)")
    k = qname + ".weight"
    rep.check(f"{tag}: synced weights moved", not torch.equal(s0[k], s1[k]))

    # the rollout: synced weights + the step's AQN, as aqn_rs_apply puts it on the vLLM model
    step = st.step
    ref = rollout_model(eng.hf_config, s1, device)
    with timed(device, timings, f"{tag}/rollout_rmsnorm_aqn_ms"):
        worker = FakeWorker(ref)  # one vLLM worker: its AQN state lives as long as it does
        n = plugin.vllm_worker_apply(worker, step, NOISE, TOTAL)
    eng.module.eval()
    with torch.no_grad():
        a = eng.module(input_ids=ids).logits
        b = ref(input_ids=ids).logits
    diff = float((a.float() - b.float()).abs().max())
    scale = float(b.float().abs().max())
    # Bit-equal on the CPU. On CUDA the weights are identical (the sync check above is exact),
    # but cuBLAS may pick another kernel for FSDP2's gathered buffers than for plain tensors
    # (alignment), so a difference of a few bf16 ulps is reported, not failed.
    rep.check(f"{tag}: actor logits == rollout logits (synced weights + step {step} AQN)",
              torch.equal(a, b) or (device.type == "cuda" and diff <= 2 ** -6 * max(scale, 1.0)),
              bit_equal=torch.equal(a, b), noised_tensors=n, max_abs_diff=diff, max_abs_logit=round(scale, 3))
    restored = plugin.vllm_worker_restore(worker)
    rep.check(f"{tag}: validation restores the clean rollout weights", restored == n and all(
        torch.equal(p.detach(), s1[name].to(device, torch.bfloat16)) for name, p in ref.named_parameters()
        if name in s1), restored=restored)
    del eng, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()


def noise_checks(rep: Report, hf_config, device: torch.device, timings: Dict[str, float]) -> None:
    """Philox on the device == the CPU's; fused rows == the actor's per-module draws; the
    rollout's Linear AQN cost on a vLLM-shaped layer set."""
    name = "model.layers.0.input_layernorm"
    a = gaussian_noise((hf_config.hidden_size,), 0, 11, name, 0.01, dtype=torch.float32, device=device)
    b = gaussian_noise((hf_config.hidden_size,), 0, 11, name, 0.01, dtype=torch.float32)
    rep.check(f"noise: {device.type} Philox == CPU", torch.equal(a.cpu(), b))

    block = {**NOISE, "layer_types": ["linear"]}
    h, kv, hd = hf_config.hidden_size, hf_config.num_key_value_heads, hf_config.hidden_size // hf_config.num_attention_heads
    sizes = [hf_config.num_attention_heads * hd, kv * hd, kv * hd]

    class QKVParallelLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(sum(sizes), h, dtype=torch.bfloat16, device=device),
                                             requires_grad=False)
            self.output_partition_sizes, self.num_kv_head_replicas, self.tp_rank, self.tp_size = sizes, 1, 0, 1

    layers = torch.nn.ModuleList()
    for _ in range(hf_config.num_hidden_layers):
        attn = torch.nn.Module()
        attn.qkv_proj = QKVParallelLinear()
        layer = torch.nn.Module()
        layer.self_attn = attn
        layers.append(layer)
    vm = torch.nn.Module()
    vm.model = torch.nn.Module()
    vm.model.layers = layers
    noise = plugin._vllm_noise_class().from_config(block, TOTAL, apply_to="rollout")
    noise.bind(vm)
    fused = noise.noise_for("model.layers.0.self_attn.qkv_proj", layers[0].self_attn.qkv_proj.weight, 15)
    actor = aqn_rs.AqnNoise.from_config(block, TOTAL, apply_to="actor")
    parts = [actor.noise_for(f"model.layers.0.self_attn.{m}_proj", torch.empty(n, h, dtype=torch.bfloat16,
                                                                               device=device), 15)
             for m, n in zip("qkv", sizes)]
    rep.check("noise: fused qkv_proj rows == the actor's q/k/v draws", torch.equal(fused, torch.cat(parts, 0)))
    with timed(device, timings, "rollout_linear_aqn_qkv_all_layers_ms"):
        cnt = plugin.vllm_worker_apply(FakeWorker(vm), 15, block, TOTAL)
    rep.note("noise: Linear AQN on every layer's qkv_proj", tensors=cnt,
             ms=round(timings["rollout_linear_aqn_qkv_all_layers_ms"], 1))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--config", default="tiny,tiny-tied,qwen2.5-1.5b", help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--model", default=None, help="a transformers Qwen2 folder instead of random weights "
                                                   "(used for every --config)")
    ap.add_argument("--engine", default="auto", choices=["auto", "verl", "fsdp2"],
                    help="verl: verl's FSDPEngine (needs verl); fsdp2: the same steps by hand; auto: both if possible")
    ap.add_argument("--formats", default="mxfp4,nvfp4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    import torch.distributed as dist

    # One process: an in-memory store, so no TCP port is bound (two checks running at once,
    # as the test suite does, would race for one). verl reads the rank variables.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)

    have_verl = True
    try:
        import verl  # noqa: F401

        if device.type == "cpu":
            cpu_platform_for_verl()
    except Exception as e:  # verl missing, or without the platform registry (0.8)
        have_verl = False
        why_no_verl = f"{type(e).__name__}: {e}"
    engines = {"auto": ([VerlEngine] if have_verl else []) + [HandEngine], "verl": [VerlEngine],
               "fsdp2": [HandEngine]}[args.engine]
    if args.engine == "verl" and not have_verl:
        print(f"verl_gpu_check: --engine verl but verl is not usable here ({why_no_verl})", file=sys.stderr)
        return 2

    rep = Report()
    timings: Dict[str, float] = {}
    env = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "aqn_rs": aqn_rs.build_info(), "verl": plugin._verl_version(),
           "engines": [e.name for e in engines], "python": platform.python_version()}
    print(json.dumps(env), flush=True)
    if not have_verl:
        rep.note("verl not importable: its FSDPEngine path not run", reason=why_no_verl[:120])
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for name in args.config.split(","):
        print(f"== {name}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            if args.model:
                path = args.model
            else:
                conf = Qwen2Config(**CONFIGS[name], architectures=["Qwen2ForCausalLM"])
                torch.manual_seed(0)
                with torch.device(device):
                    Qwen2ForCausalLM(conf).save_pretrained(tmp)
                path = tmp
            for fmt in args.formats.split(","):
                for eng in engines:
                    try:
                        run_one(rep, eng, path, fmt, device, args.steps, args.batch, args.seq, timings)
                    except Exception as e:
                        traceback.print_exc()
                        rep.check(f"{eng.name}/{fmt} on {name}: ran", False, error=f"{type(e).__name__}: {e}"[:300])
            from transformers import AutoConfig

            try:
                noise_checks(rep, AutoConfig.from_pretrained(path), device, timings)
            except Exception as e:
                traceback.print_exc()
                rep.check(f"noise checks on {name}: ran", False, error=f"{type(e).__name__}: {e}"[:300])
        timings = {k if k.startswith(name) else f"{name}/{k}": v for k, v in timings.items()}
    print("timings (ms): " + json.dumps({k: round(v, 2) for k, v in timings.items()}), flush=True)
    out = args.json or (os.path.join(os.environ["OUT"], "verl_gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump({"env": env, "checks": rep.rows, "timings_ms": timings}, f, indent=2, default=str)
    print(f"{len(rep.rows)} rows, {rep.failed} failed", flush=True)
    dist.destroy_process_group()
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
