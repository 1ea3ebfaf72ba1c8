"""The verl plugin (aqn_rs.integrations.verl): config, fake-quantized weight sync, AQN on a
vLLM-style model, the wrappers verl's classes get, and -- with verl installed -- its patch
points and the hydra composition of every preset's `aqn-rs run --engine verl` command.

Tests marked `needs_verl` skip when verl is not importable (CI installs it in a second
virtual environment, see docs/guides/VERL.md); the rest need torch only.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import re
import shlex
import types

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import aqn_rs  # noqa: E402
from aqn_rs.aqn import AqnNoise, gaussian_noise  # noqa: E402
from aqn_rs.integrations import verl as plugin  # noqa: E402
from aqn_rs.integrations.verl import patches as plugin_patches  # noqa: E402
from aqn_rs.integrations.verl import sync as plugin_sync  # noqa: E402
from aqn_rs.integrations.verl import trainer as plugin_trainer  # noqa: E402

# plugin_sync, plugin_trainer, plugin_patches: the submodules that own the module state the tests
# set and the helpers they replace; a name is patched in the module that reads it.


def _verl_importable() -> bool:
    if importlib.util.find_spec("verl") is None:
        return False
    try:
        import verl  # noqa: F401
    except Exception:
        return False
    return True


HAVE_VERL = _verl_importable()
needs_verl = pytest.mark.skipif(not HAVE_VERL, reason="verl is not importable (pip install verl)")
needs_omegaconf = pytest.mark.skipif(importlib.util.find_spec("omegaconf") is None, reason="needs omegaconf")

NOISE = {"enabled": True, "sigma_start": 0.05, "sigma_end": 0.0005, "num_stages": 10, "layer_types": ["rmsnorm"]}
T = 174

# ---------------------------------------------------------------------------------------------
# Tiny models: HF naming (the actor) and vLLM naming (the rollout)
# ---------------------------------------------------------------------------------------------

HID, INTER, HEADS, KV, HD, LAYERS, VOCAB = 64, 96, 4, 2, 16, 2, 80


class RMSNorm(nn.Module):
    """Named like vLLM's class (`vllm.model_executor.layers.layernorm.RMSNorm`)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _module(**children):
    m = nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


def hf_model(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    layers = nn.ModuleList()
    for _ in range(LAYERS):
        attn = _module(q_proj=nn.Linear(HID, HEADS * HD, bias=True), k_proj=nn.Linear(HID, KV * HD, bias=True),
                       v_proj=nn.Linear(HID, KV * HD, bias=True), o_proj=nn.Linear(HEADS * HD, HID, bias=False))
        # k_proj gets a larger scale so the q/k/v group amax differs from q's own
        with torch.no_grad():
            attn.k_proj.weight.mul_(3.0)
        mlp = _module(gate_proj=nn.Linear(HID, INTER, bias=False), up_proj=nn.Linear(HID, INTER, bias=False),
                      down_proj=nn.Linear(INTER, HID, bias=False))
        layers.append(_module(input_layernorm=RMSNorm(HID), self_attn=attn, post_attention_layernorm=RMSNorm(HID),
                              mlp=mlp))
    model = _module(model=_module(embed_tokens=nn.Embedding(VOCAB, HID), layers=layers, norm=RMSNorm(HID)),
                    lm_head=nn.Linear(HID, VOCAB, bias=False))
    return model.to(dtype)


class _VllmLinear(nn.Module):
    def __init__(self, weight, tp_rank=0, tp_size=1, input_size=None, output_size=None):
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size = input_size if input_size is not None else weight.shape[1]
        self.output_size = output_size if output_size is not None else weight.shape[0]


class QKVParallelLinear(_VllmLinear):
    def __init__(self, weight, sizes, tp_rank=0, tp_size=1, replicas=1):
        super().__init__(weight, tp_rank, tp_size)
        self.output_partition_sizes = list(sizes)
        self.num_kv_head_replicas = replicas


class MergedColumnParallelLinear(_VllmLinear):
    def __init__(self, weight, sizes, tp_rank=0, tp_size=1):
        super().__init__(weight, tp_rank, tp_size)
        self.output_partition_sizes = list(sizes)


class RowParallelLinear(_VllmLinear):
    pass


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)


def vllm_model(synced: dict):
    """A vLLM-style model (fused qkv_proj / gate_up_proj, class RMSNorm) loaded from a synced
    HF-named state dict, as vLLM's load_weights stacks q/k/v and gate/up."""
    g = lambda k: synced[k].to(torch.bfloat16)  # noqa: E731
    layers = nn.ModuleList()
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        qkv = torch.cat([g(f"{p}.self_attn.{m}_proj.weight") for m in "qkv"], 0)
        attn = _module(qkv_proj=QKVParallelLinear(qkv, [HEADS * HD, KV * HD, KV * HD]),
                       o_proj=RowParallelLinear(g(f"{p}.self_attn.o_proj.weight")))
        gu = torch.cat([g(f"{p}.mlp.gate_proj.weight"), g(f"{p}.mlp.up_proj.weight")], 0)
        mlp = _module(gate_up_proj=MergedColumnParallelLinear(gu, [INTER, INTER]),
                      down_proj=RowParallelLinear(g(f"{p}.mlp.down_proj.weight")))
        ln1, ln2 = RMSNorm(HID), RMSNorm(HID)
        with torch.no_grad():
            ln1.weight.copy_(g(f"{p}.input_layernorm.weight"))
            ln2.weight.copy_(g(f"{p}.post_attention_layernorm.weight"))
        layers.append(_module(input_layernorm=ln1, self_attn=attn, post_attention_layernorm=ln2, mlp=mlp))
    norm = RMSNorm(HID)
    with torch.no_grad():
        norm.weight.copy_(g("model.norm.weight"))
    m = _module(model=_module(embed_tokens=VocabParallelEmbedding(g("model.embed_tokens.weight")), layers=layers,
                              norm=norm))
    m.lm_head = RowParallelLinear(g("lm_head.weight"))
    return m.to(torch.bfloat16)


class FakeWorker:
    """What `vLLMColocateWorkerExtension` methods see: `self.model_runner.model`."""

    def __init__(self, model):
        self.model_runner = types.SimpleNamespace(model=model)


def effective_weight(linear):
    """The weight a (hooked) Linear's forward computes with: its output on the identity with
    the bias off (each output element is one product, so exact in any dtype)."""
    bias = linear.bias
    linear.bias = None
    try:
        with torch.no_grad():
            return linear(torch.eye(linear.in_features, dtype=linear.weight.dtype)).t().contiguous()
    finally:
        linear.bias = bias


def clean_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cfg(quant=None, noise=None, total=T):
    return plugin.parse_config(quant, noise, total)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_and_forwarding():
    c = cfg({"format": "mxfp4"}, NOISE)
    assert c.quantization["scale_mode"] == "floor" and c.quantization["exclude"] == ["lm_head", "embed_tokens"]
    assert c.noise["apply_to"] == "both" and c.actor_noise and c.rollout_noise
    assert plugin.parse_config(**{k: v for k, v in zip(("quantization", "noise_injection", "total_steps"),
                                                        c.forwarded().values())}) == c
    assert cfg({"format": "none"}, {"enabled": False}).active is False
    assert cfg(None, None).active is False
    assert c.scheduler().sigma(T) == pytest.approx(0.0005)


@pytest.mark.parametrize("quant,noise,needle", [
    ({"fromat": "mxfp4"}, None, "trainer.quantization.fromat: unknown key"),
    ({"format": "int4"}, None, "trainer.quantization.format"),
    ({"format": "mxfp4", "scale_mode": "up"}, None, "trainer.quantization.scale_mode"),
    ({"format": "mxfp4", "injection_point": "activation"}, None, "W4A16 only"),
    ({"format": "nvfp4", "layer_types": ["embedding"]}, None, "trainer.quantization.layer_types"),
    ({"format": "nvfp4", "exclude": "lm_head"}, None, None),
    (None, {**NOISE, "sigma_strat": 0.1}, "trainer.noise_injection.sigma_strat: unknown key"),
    (None, {"enabled": True, "sigma_start": 0.1, "sigma_end": 0.01}, "trainer.noise_injection.num_stages is required"),
    (None, {**NOISE, "layer_types": ["conv"]}, "trainer.noise_injection.layer_types"),
    (None, {**NOISE, "apply_to": "vllm"}, "trainer.noise_injection.apply_to"),
    (None, {**NOISE, "enabled": "maybe"}, "trainer.noise_injection.enabled"),
    (None, {**NOISE, "sigma_end": 0.5}, "trainer.noise_injection"),
])
def test_config_errors_name_the_key(quant, noise, needle):
    if needle is None:
        assert cfg(quant, noise).quantization["exclude"] == ["lm_head"]
        return
    with pytest.raises(plugin.VerlPluginError, match=needle.replace(".", r"\.")):
        cfg(quant, noise)


def test_vllm_alias_and_normalized_names():
    assert plugin.vllm_alias("model.layers.3.self_attn.k_proj") == "model.layers.3.self_attn.qkv_proj"
    assert plugin.vllm_alias("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_up_proj"
    assert plugin.vllm_alias("model.layers.3.mlp.down_proj") is None
    assert plugin.normalize_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert plugin.normalize_name("_fsdp_wrapped_module.model.norm.weight") == "model.norm.weight"


# ---------------------------------------------------------------------------------------------
# Weight sync
# ---------------------------------------------------------------------------------------------

GROUPS = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
          "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
          "up_proj": ("gate_proj", "up_proj")}


def _expected_sync(state, fmt, quantizer, dtype):
    """fake_quant of each quantized weight in `dtype`, with the fused-group amax for NVFP4."""
    out = {}
    for name, t in state.items():
        mod, _, leaf = name.rpartition(".")
        short = mod.rpartition(".")[2]
        if leaf != "weight" or short in ("embed_tokens", "lm_head") or not short.endswith("proj"):
            out[name] = t
            continue
        w = t.to(dtype)
        if fmt == "nvfp4":
            parent = mod.rpartition(".")[0]
            members = GROUPS.get(short, (short,))
            amax = max(float(state[f"{parent}.{m}.weight"].to(dtype).abs().amax().float()) for m in members)
            out[name] = quantizer.fake_quant(w, amax=amax if len(members) > 1 else None)
        else:
            out[name] = quantizer.fake_quant(w)
    return out


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_sync_equals_fake_quant_and_leaves_excluded_alone(fmt, model_dtype):
    model = hf_model(model_dtype)
    st = plugin.ActorState(model, cfg({"format": fmt}), param_dtype=torch.bfloat16)
    state = clean_state(model)
    synced = dict(st.wrap_sync(iter(state.items())))
    assert list(sorted(synced)) == list(sorted(state))
    q = aqn_rs.Mxfp4Quantizer() if fmt == "mxfp4" else aqn_rs.Nvfp4Quantizer()
    want = _expected_sync(state, fmt, q, torch.bfloat16)
    quantized = 0
    for name, t in synced.items():
        assert torch.equal(t, want[name]), name
        if t is not state[name]:
            quantized += 1
            assert t.dtype == torch.bfloat16
        else:  # excluded / not Linear: the very same tensor
            assert any(s in name for s in ("embed_tokens", "lm_head", "norm", "bias")), name
    assert quantized == 7 * LAYERS
    assert torch.equal(synced["lm_head.weight"], state["lm_head.weight"])
    assert st.last_stats["tensors"] == 7 * LAYERS and 0.05 < st.last_stats["rel_error"] < 0.2
    assert st.last_stats["sqnr_db"] == pytest.approx(-20 * math.log10(st.last_stats["rel_error"]))
    assert 0 < st.last_stats["fake_quant_s"] < 60


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_sync_is_what_the_actor_forward_computes_with(fmt):
    """The rollout gets bit for bit the weight the hooked actor's forward uses (bf16 compute,
    fused amax for NVFP4): F.linear with the synced weight == the hooked module's output."""
    model = hf_model(torch.bfloat16)
    st = plugin.ActorState(model, cfg({"format": fmt}), param_dtype=torch.bfloat16)
    synced = dict(st.wrap_sync(iter(clean_state(model).items())))
    x = torch.randn(5, HID, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            mod = getattr(model.model.layers[1].self_attn, name)
            w = synced[f"model.layers.1.self_attn.{name}.weight"]
            b = synced[f"model.layers.1.self_attn.{name}.bias"]
            assert torch.equal(mod(x), F.linear(x, w, b))
        up = model.model.layers[0].mlp.up_proj
        assert torch.equal(up(x), F.linear(x, synced["model.layers.0.mlp.up_proj.weight"]))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("batch_bytes", [1, 256 << 20])
def test_sync_error_statistics_equal_a_float64_reference(fmt, batch_bytes, monkeypatch):
    """The sync's error statistics (multi-tensor norms over batches of tensors, a batch cut
    where the dtype changes) == the same quantities in float64 from the synced weights: per
    tensor ||w - q|| / ||w||, their max, the total and the SQNR; a batch of one tensor (1 byte)
    and one batch for the whole stream agree."""
    monkeypatch.setattr(plugin_sync, "_STATS_BATCH_BYTES", batch_bytes)
    model = hf_model(torch.float32)
    state = clean_state(model)
    # half the layers stream in bf16 and half in f32, and no param_dtype cast: batches must
    # be cut where the dtype changes
    state = {n: (t.to(torch.bfloat16) if ".layers.0." in n else t) for n, t in state.items()}
    st = plugin.ActorState(model, cfg({"format": fmt}))
    got = {}
    synced = dict(plugin.quant_sync(iter(state.items()), st.quantizer, st.quant_modules, groups=st.groups,
                                    param_dtype=None, on_done=got.update))
    assert {t.dtype for n, t in synced.items() if t is not state[n]} == {torch.bfloat16, torch.float32}
    es, rs, per = 0.0, 0.0, []
    for n, t in synced.items():
        if t is state[n]:
            continue
        w, q = state[n].double(), t.double()
        e, r = float(((w - q) ** 2).sum()), float((w ** 2).sum())
        es, rs = es + e, rs + r
        per.append(math.sqrt(e / r))
    assert got["tensors"] == len(per) == 7 * LAYERS
    assert got["rel_error"] == pytest.approx(math.sqrt(es / rs), rel=1e-5)
    assert got["max_rel_error"] == pytest.approx(max(per), rel=1e-5)
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(rs / es), rel=1e-5)


def test_sync_group_amax_is_shared_for_nvfp4():
    model = hf_model(torch.bfloat16)
    st = plugin.ActorState(model, cfg({"format": "nvfp4"}), param_dtype=torch.bfloat16)
    state = clean_state(model)
    synced = dict(st.wrap_sync(iter(state.items())))
    q = aqn_rs.Nvfp4Quantizer()
    w = state["model.layers.0.self_attn.q_proj.weight"]
    own = q.fake_quant(w)  # q's own amax: differs, since k_proj was scaled up
    assert not torch.equal(synced["model.layers.0.self_attn.q_proj.weight"], own)
    st2 = plugin.ActorState(hf_model(torch.bfloat16), cfg({"format": "nvfp4", "fuse_global_scales": False}))
    synced2 = dict(st2.wrap_sync(iter(state.items())))
    assert torch.equal(synced2["model.layers.0.self_attn.q_proj.weight"], own)


def test_group_amax_caches_are_found_and_invalidated():
    """After an optimizer step the hooks' fused-group amax must be recomputed even where FSDP
    re-gathers the new weights into the same buffer with the same version counter."""
    model = hf_model(torch.bfloat16)
    st = plugin.ActorState(model, cfg({"format": "nvfp4"}))
    assert len(st._group_amaxes) == 2 * LAYERS  # q/k/v and gate/up of each layer
    x = torch.randn(2, HID, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj(x)
    assert any(g.key is not None for g in st._group_amaxes)
    st.invalidate()
    assert all(g.key is None and g.value is None for g in st._group_amaxes)
    assert plugin.ActorState(hf_model(), cfg({"format": "mxfp4"}))._group_amaxes == []


def test_stats_are_not_published_outside_a_ray_job():
    """Publishing the sync statistics must not start a local Ray instance."""
    import sys

    assert plugin._stats_key() is None or sys.modules["ray"].is_initialized()


def test_sync_exclusions_in_vllm_naming():
    state = clean_state(hf_model())
    st = plugin.ActorState(hf_model(), cfg({"format": "mxfp4", "exclude": ["lm_head", "embed_tokens", "*.qkv_proj"]}))
    synced = dict(st.wrap_sync(iter(state.items())))
    for i in range(LAYERS):
        for m in "qkv":
            k = f"model.layers.{i}.self_attn.{m}_proj.weight"
            assert synced[k] is state[k]
        assert not torch.equal(synced[f"model.layers.{i}.self_attn.o_proj.weight"],
                               state[f"model.layers.{i}.self_attn.o_proj.weight"])
    st = plugin.ActorState(hf_model(), cfg({"format": "mxfp4", "include": ["re:.*gate_up_proj$"]}))
    assert sorted(st.quant_modules) == sorted(f"model.layers.{i}.mlp.{m}_proj" for i in range(LAYERS)
                                              for m in ("gate", "up"))
    # verl's ignore_patterns syntax works as exclude
    st = plugin.ActorState(hf_model(), cfg({"format": "nvfp4", "exclude": ["lm_head", "embed_tokens", "re:.*mlp.gate_proj$"]}))
    assert not any(m.endswith("gate_proj") for m in st.quant_modules)


def test_sync_names_that_do_not_match_raise():
    model = hf_model()
    st = plugin.ActorState(model, cfg({"format": "mxfp4"}))
    renamed = ((f"transformer.{k}", v) for k, v in clean_state(model).items())
    with pytest.raises(plugin.VerlPluginError, match="sent no weight for 14 of 14"):
        list(st.wrap_sync(renamed))


def test_lora_adapters_are_neither_quantized_nor_noised():
    peft = pytest.importorskip("peft")
    model = hf_model(torch.float32)
    model.config = types.SimpleNamespace(tie_word_embeddings=False, get=lambda *a: None)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    block = {**NOISE, "layer_types": ["linear", "rmsnorm"]}
    st = plugin.ActorState(lora, cfg({"format": "mxfp4"}, block))
    assert len(st.quant_modules) == 7 * LAYERS and not any("lora" in m for m in st.quant_modules)
    assert "model.layers.0.self_attn.q_proj" in st.quant_modules
    noised = [n for n, m in lora.named_modules() if n and st.noise.selects(n, m)]
    assert noised and not any(plugin.is_adapter(n) for n in noised)


def test_sync_with_fsdp_and_peft_names():
    model = hf_model()
    st = plugin.ActorState(model, cfg({"format": "mxfp4"}))
    state = clean_state(model)
    peft = {("base_model.model." + k).replace("_proj.weight", "_proj.base_layer.weight"): v for k, v in state.items()}
    synced = dict(st.wrap_sync(iter(peft.items())))
    k = "base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"
    assert torch.equal(synced[k], aqn_rs.Mxfp4Quantizer().fake_quant(state["model.layers.0.mlp.down_proj.weight"]))


# ---------------------------------------------------------------------------------------------
# AQN on the vLLM model
# ---------------------------------------------------------------------------------------------


def _sigma(step, block=NOISE):
    return plugin.parse_config(None, block, T).scheduler().sigma(step)


def test_vllm_rmsnorm_noise_once_per_step_cache_restore():
    vm = vllm_model(clean_state(hf_model()))
    clean = clean_state(vm)
    worker = FakeWorker(vm)
    norms = [k for k in clean if "norm" in k]
    assert len(norms) == 2 * LAYERS + 1
    assert plugin.vllm_worker_apply(worker, 0, NOISE, T) == 0  # stage 0: quantization noise only
    assert all(torch.equal(vm.state_dict()[k], clean[k]) for k in clean)
    for step in (30, 31, 31, 100):  # repeated calls: no accumulation
        n = plugin.vllm_worker_apply(worker, step, NOISE, T)
        assert n == len(norms)
        now = vm.state_dict()
        sigma = _sigma(step)
        assert sigma > 0
        for k in clean:
            if k in norms:
                z = gaussian_noise(clean[k].shape, 0, step, k[: -len(".weight")], sigma, dtype=torch.bfloat16)
                assert torch.equal(now[k], clean[k] + z), (step, k)
            else:
                assert torch.equal(now[k], clean[k]), k  # Linear / embedding weights untouched
    assert plugin.vllm_worker_restore(worker) == len(norms)
    assert all(torch.equal(vm.state_dict()[k], clean[k]) for k in clean)


def test_vllm_noise_after_a_weight_sync_takes_the_new_clean_weight():
    vm = vllm_model(clean_state(hf_model()))
    worker = FakeWorker(vm)
    plugin.vllm_worker_apply(worker, 40, NOISE, T)
    new = torch.full_like(vm.model.norm.weight, 0.5)
    with torch.no_grad():
        vm.model.norm.weight.copy_(new)  # the sync writes the next step's clean weight
    plugin.vllm_worker_apply(worker, 41, NOISE, T)
    z = gaussian_noise(new.shape, 0, 41, "model.norm", _sigma(41), dtype=torch.bfloat16)
    assert torch.equal(vm.model.norm.weight, new + z)
    plugin.vllm_worker_restore(worker)
    assert torch.equal(vm.model.norm.weight, new)


def test_vllm_noise_is_identical_in_every_worker():
    a = vllm_model(clean_state(hf_model()))
    b = vllm_model(clean_state(hf_model()))
    plugin.vllm_worker_apply(FakeWorker(a), 77, NOISE, T)
    plugin.vllm_worker_apply(FakeWorker(b), 77, NOISE, T)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", [None, "mxfp4", "nvfp4"])
def test_actor_and_vllm_see_the_same_noisy_linear_weights(fmt):
    """apply_to both, Linear noise: vLLM's fused qkv_proj / gate_up_proj after the sync and
    aqn_rs_apply hold exactly the actor's effective weights Q(w) + n, row for row."""
    block = {**NOISE, "layer_types": ["linear"], "sigma_start": 0.001, "sigma_end": 0.00001}
    model = hf_model(torch.bfloat16)
    st = plugin.ActorState(model, cfg({"format": fmt} if fmt else None, block), param_dtype=torch.bfloat16)
    step = 90
    st.set_step(step)
    state = clean_state(model)
    synced = dict(st.wrap_sync(iter(state.items()))) if st.handle is not None else state
    vm = vllm_model(synced)
    assert plugin.vllm_worker_apply(FakeWorker(vm), step, block, T) == 4 * LAYERS  # qkv, o, gate_up, down
    model.eval()  # verl's log-prob recompute: the actor noise applies in eval mode too
    for i in range(LAYERS):
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        qkv = torch.cat([effective_weight(getattr(attn, f"{m}_proj")) for m in "qkv"], 0)
        assert torch.equal(vm.model.layers[i].self_attn.qkv_proj.weight, qkv)
        gu = torch.cat([effective_weight(mlp.gate_proj), effective_weight(mlp.up_proj)], 0)
        assert torch.equal(vm.model.layers[i].mlp.gate_up_proj.weight, gu)
        assert torch.equal(vm.model.layers[i].mlp.down_proj.weight, effective_weight(mlp.down_proj))
        assert torch.equal(vm.model.layers[i].self_attn.o_proj.weight, effective_weight(attn.o_proj))
    # the noise itself: rows of the fused weight = the actor's draws for q, k, v
    noise = plugin._vllm_noise_class().from_config(block, T, apply_to="rollout")
    noise.bind(vm)
    qkv = vm.model.layers[0].self_attn.qkv_proj.weight
    fused = noise.noise_for("model.layers.0.self_attn.qkv_proj", qkv, step)
    actor = AqnNoise.from_config(block, T, apply_to="actor")
    parts = [actor.noise_for(f"model.layers.0.self_attn.{m}_proj",
                             torch.empty(n, HID, dtype=torch.bfloat16), step)
             for m, n in zip("qkv", (HEADS * HD, KV * HD, KV * HD))]
    assert torch.equal(fused, torch.cat(parts, 0))


def test_vllm_linear_noise_excluded_member_rows_are_zero():
    block = {**NOISE, "layer_types": ["linear"], "exclude": ["lm_head", "embed_tokens", "*.k_proj"]}
    vm = vllm_model(clean_state(hf_model()))
    noise = plugin._vllm_noise_class().from_config(block, T, apply_to="rollout")
    noise.bind(vm)
    z = noise.noise_for("model.layers.0.self_attn.qkv_proj", vm.model.layers[0].self_attn.qkv_proj.weight, 60)
    q, k, v = z.split([HEADS * HD, KV * HD, KV * HD], 0)
    assert q.abs().sum() > 0 and v.abs().sum() > 0 and torch.count_nonzero(k) == 0
    assert not noise.selects("lm_head", vm.lm_head)


def _full_member_noise(block, name, shape, step):
    return gaussian_noise(shape, 0, step, name, _sigma(step, block), dtype=torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("tp_size,replicas", [(2, 1), (4, 2)])
def test_vllm_linear_noise_tensor_parallel_shards(tp_size, replicas):
    """Each TP rank's shard of qkv_proj / gate_up_proj (rows) and o_proj / down_proj (columns)
    gets its slice of the actor's full-weight noise; k/v heads replicated when tp > kv heads."""
    block = {**NOISE, "layer_types": ["linear"]}
    step, p = 55, "model.layers.0"
    full = {m: _full_member_noise(block, f"{p}.self_attn.{m}_proj", (n, HID), step)
            for m, n in zip("qkv", (HEADS * HD, KV * HD, KV * HD))}
    gate = _full_member_noise(block, f"{p}.mlp.gate_proj", (INTER, HID), step)
    up = _full_member_noise(block, f"{p}.mlp.up_proj", (INTER, HID), step)
    down = _full_member_noise(block, f"{p}.mlp.down_proj", (HID, INTER), step)
    for rank in range(tp_size):
        qn = HEADS * HD // tp_size
        kvn = KV * HD * replicas // tp_size
        kv_rank = rank // replicas
        qkv = QKVParallelLinear(torch.zeros(qn + 2 * kvn, HID), [qn, kvn, kvn], rank, tp_size, replicas)
        gu = MergedColumnParallelLinear(torch.zeros(2 * INTER // tp_size, HID), [INTER // tp_size] * 2, rank, tp_size)
        dn = RowParallelLinear(torch.zeros(HID, INTER // tp_size), rank, tp_size, input_size=INTER, output_size=HID)
        model = _module(model=_module(layers=nn.ModuleList([_module(self_attn=_module(qkv_proj=qkv),
                                                                     mlp=_module(gate_up_proj=gu, down_proj=dn))])))
        model.to(torch.bfloat16)
        noise = plugin._vllm_noise_class().from_config(block, T, apply_to="rollout")
        noise.bind(model)
        z = noise.noise_for(f"{p}.self_attn.qkv_proj", qkv.weight, step)
        want = torch.cat([full["q"][rank * qn:(rank + 1) * qn], full["k"][kv_rank * kvn:(kv_rank + 1) * kvn],
                          full["v"][kv_rank * kvn:(kv_rank + 1) * kvn]], 0)
        assert torch.equal(z, want)
        i = INTER // tp_size
        z = noise.noise_for(f"{p}.mlp.gate_up_proj", gu.weight, step)
        assert torch.equal(z, torch.cat([gate[rank * i:(rank + 1) * i], up[rank * i:(rank + 1) * i]], 0))
        z = noise.noise_for(f"{p}.mlp.down_proj", dn.weight, step)
        assert torch.equal(z, down[:, rank * i:(rank + 1) * i])


def test_vllm_fused_module_with_unknown_layout_is_an_error():
    bad = QKVParallelLinear(torch.zeros(10, HID), [4, 4])
    with pytest.raises(plugin.VerlPluginError, match="cannot map its 10 rows onto q_proj/k_proj/v_proj"):
        plugin.vllm_layout("model.layers.0.self_attn.qkv_proj", bad, bad.weight)


# ---------------------------------------------------------------------------------------------
# The wrappers (with stand-ins for verl's objects)
# ---------------------------------------------------------------------------------------------


def _forwarded(quant=None, noise=None):
    return plugin.parse_config(quant, noise, T).forwarded()


class _Cfg(dict):
    """A stand-in for verl's DictConfig: `.get` and attribute access."""

    __getattr__ = dict.__getitem__


def _fake_worker(forwarded, role="actor_rollout_ref", strategy="fsdp2"):
    config = _Cfg(aqn_rs=forwarded, actor=_Cfg(strategy=strategy), model=_Cfg(lora=_Cfg()))
    return types.SimpleNamespace(config=config, role=role, actor=None)


class _Engine:
    def __init__(self, forward_only=False):
        self.engine_config = types.SimpleNamespace(forward_only=forward_only, mixed_precision={"param_dtype": "bf16"})


def test_init_model_and_build_fsdp_module_install_hooks_on_the_actor_only():
    build = plugin._wrap_build_fsdp_module(lambda self, module: ("fsdp", module))
    ref_model, actor_model = hf_model(), hf_model()

    def orig_init_model(self):
        ref, actor = _Engine(forward_only=True), _Engine()
        assert build(ref, ref_model) == ("fsdp", ref_model)
        build(actor, actor_model)
        self.ref, self.actor = types.SimpleNamespace(engine=ref), types.SimpleNamespace(engine=actor)
        return "done"

    init_model = plugin._wrap_init_model(orig_init_model)
    w = _fake_worker(_forwarded({"format": "nvfp4"}, NOISE))
    assert init_model(w) == "done"
    assert not hasattr(w.ref.engine, "_aqn_rs_actor")  # the reference policy stays unquantized
    st = w.actor.engine._aqn_rs_actor
    assert len(st.quant_modules) == 7 * LAYERS and st.noise is not None and st.param_dtype == torch.bfloat16
    assert "forward" in actor_model.model.layers[0].self_attn.q_proj.__dict__
    assert "forward" not in ref_model.model.layers[0].self_attn.q_proj.__dict__
    assert plugin_patches._ACTOR_PENDING is None


def test_actor_noise_under_fsdp1_needs_orig_params():
    init_model = plugin._wrap_init_model(lambda self: None)
    w = _fake_worker(_forwarded(None, NOISE), strategy="fsdp")
    with pytest.raises(plugin.VerlPluginError, match="strategy=fsdp2"):
        init_model(w)


def test_init_model_errors():
    init_model = plugin._wrap_init_model(lambda self: setattr(self, "actor", types.SimpleNamespace(engine=object())))
    with pytest.raises(plugin.VerlPluginError, match="without FSDPEngine._build_fsdp_module"):
        init_model(_fake_worker(_forwarded({"format": "mxfp4"})))
    with pytest.raises(plugin.VerlPluginError, match="strategy=megatron"):
        init_model(_fake_worker(_forwarded({"format": "mxfp4"}), strategy="megatron"))
    w = _fake_worker(_forwarded({"format": "mxfp4"}))
    w.config["model"] = _Cfg(lora=_Cfg(merge=True))
    with pytest.raises(plugin.VerlPluginError, match="lora.merge=True"):
        init_model(w)
    # nothing to do: no error, no hooks (baseline / rollout-only noise)
    init_model(_fake_worker(_forwarded(None, {**NOISE, "apply_to": "rollout"})))
    init_model(_fake_worker(None))


def test_get_per_tensor_param_wrapper():
    model = hf_model()
    state = clean_state(model)
    eng = _Engine()
    eng._aqn_rs_actor = plugin.ActorState(model, cfg({"format": "mxfp4"}))
    wrapped = plugin._wrap_get_per_tensor_param(lambda self, *a, **k: (iter(state.items()), None))
    gen, peft = wrapped(eng)
    out = dict(gen)
    k = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(out[k], aqn_rs.Mxfp4Quantizer().fake_quant(state[k]))
    adapters = [("lora_A", torch.ones(2))]
    wrapped = plugin._wrap_get_per_tensor_param(lambda self, *a, **k: (iter(adapters), {"r": 8}))
    gen, peft = wrapped(eng, layered_summon=False, base_sync_done=True)
    assert list(gen) == adapters and peft == {"r": 8}
    refuse = plugin._wrap_refuse_with_quant(lambda self: "ok", "get_per_tensor_param_shard")
    with pytest.raises(plugin.VerlPluginError, match="checkpoint_engine.backend=naive"):
        refuse(eng)
    assert refuse(_Engine()) == "ok"


def test_worker_update_weights_sets_the_actor_noise_step():
    model = hf_model()
    eng = _Engine()
    eng._aqn_rs_actor = plugin.ActorState(model, cfg(None, NOISE))
    w = types.SimpleNamespace(actor=types.SimpleNamespace(engine=eng))

    async def orig(self, global_steps=None, mode="auto"):
        return (global_steps, mode)

    upd = plugin._wrap_worker_update_weights(orig)
    assert asyncio.iscoroutinefunction(upd)
    assert asyncio.run(upd(w, global_steps=12, mode="naive")) == (12, "naive")
    assert eng._aqn_rs_actor.step == 12 and eng._aqn_rs_actor.noise.step == 12
    asyncio.run(upd(w))  # no step (a wake-up): unchanged
    assert eng._aqn_rs_actor.step == 12


def test_actor_noise_also_in_eval_mode_and_matches_vllm():
    """verl recomputes old log-probs in eval mode: the actor's RMSNorm noise applies there too
    (same policy as the rollout that generated the batch)."""
    model = hf_model(torch.bfloat16)
    st = plugin.ActorState(model, cfg(None, NOISE))
    st.set_step(120)
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, HID, dtype=torch.bfloat16)
    clean_w = norm.weight.detach().clone()
    z = gaussian_noise((HID,), 0, 120, "model.layers.0.input_layernorm", _sigma(120), dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():
        ref = RMSNorm.forward(types.SimpleNamespace(weight=clean_w + z), x)
        assert torch.equal(norm(x), ref)
    assert torch.equal(norm.weight, clean_w)  # master weight untouched


class _Recorder:
    def __init__(self, workers):
        self.calls = []
        self.workers = workers

    def __call__(self, replicas, method, kwargs):
        self.calls.append((method, dict(kwargs)))
        for w in self.workers:
            getattr(plugin, {"aqn_rs_apply": "vllm_worker_apply", "aqn_rs_restore": "vllm_worker_restore"}[method])(
                w, **kwargs)


def _trainer_state(noise=NOISE, quant=None):
    return plugin.TrainerState(plugin.parse_config(quant, noise, T))


def test_manager_update_weights_applies_step_noise_then_validation_is_clean(monkeypatch):
    vm = vllm_model(clean_state(hf_model()))
    clean = clean_state(vm)
    worker = FakeWorker(vm)
    rec = _Recorder([worker])
    monkeypatch.setattr(plugin_trainer, "_rpc_sync", rec)
    monkeypatch.setattr(plugin_trainer, "_clear_prefix_cache_sync", lambda replicas: rec.calls.append(("clear_kv_cache", {})))
    monkeypatch.setattr(plugin_trainer, "_TRAINER", _trainer_state())
    manager = types.SimpleNamespace(replicas=["replica0"])
    update = plugin._wrap_manager_update_weights(lambda self, global_steps=None: {"synced": global_steps})
    assert update(manager, 50) == {"synced": 50}
    assert rec.calls[-1] == ("aqn_rs_apply", {"step": 50, "noise_injection": plugin_trainer._TRAINER.cfg.noise,
                                              "total_steps": T})
    noisy = clean_state(vm)
    assert not torch.equal(noisy["model.norm.weight"], clean["model.norm.weight"])
    seen = {}

    def orig_validate(self):
        seen["norm"] = vm.model.norm.weight.detach().clone()
        update(manager)  # verl's wake-up inside validation (no step): no noise
        return {"val": 1.0}

    validate = plugin._wrap_validate(orig_validate)
    trainer = types.SimpleNamespace(checkpoint_manager=manager)
    assert validate(trainer) == {"val": 1.0}
    assert torch.equal(seen["norm"], clean["model.norm.weight"])  # clean during validation
    # the prefix cache is dropped after each gain swap: blocks computed on noisy gains are not
    # reused by validation, nor clean ones by the next rollout
    assert [c[0] for c in rec.calls] == ["aqn_rs_apply", "aqn_rs_restore", "clear_kv_cache", "aqn_rs_apply",
                                         "clear_kv_cache"]
    assert torch.equal(vm.model.norm.weight, noisy["model.norm.weight"])  # step 50's noise back


def test_manager_wrapper_keeps_verl_auto_await_semantics(monkeypatch):
    """verl's `auto_await` returns a coroutine to async callers and a value to sync ones."""
    if HAVE_VERL:
        from verl.utils.ray_utils import auto_await
    else:
        auto_await = None
    calls = []

    async def fake_rpc(replicas, method, kwargs):
        calls.append((method, kwargs["step"]))

    monkeypatch.setattr(plugin_trainer, "_rpc_async", fake_rpc)
    monkeypatch.setattr(plugin_trainer, "_TRAINER", _trainer_state())

    async def inner(self, global_steps=None):
        return {"step": global_steps}

    orig = auto_await(inner) if auto_await else inner
    update = plugin._wrap_manager_update_weights(orig)
    m = types.SimpleNamespace(replicas=[])
    if auto_await:
        assert update(m, global_steps=3) == {"step": 3}  # sync caller

    async def async_caller():
        return await update(m, 4)

    assert asyncio.run(async_caller()) == {"step": 4}
    assert calls == ([("aqn_rs_apply", 3)] if auto_await else []) + [("aqn_rs_apply", 4)]


def test_tracking_log_adds_aqn_and_quant_metrics(monkeypatch):
    monkeypatch.setattr(plugin_trainer, "_TRAINER", _trainer_state(quant={"format": "mxfp4"}))
    monkeypatch.setattr(plugin_trainer, "_read_stats", lambda: {"rel_error": 0.11, "max_rel_error": 0.2, "sqnr_db": 19.2,
                                                        "tensors": 196.0, "fake_quant_s": 0.0125, "step": 3})
    got = []
    log = plugin._wrap_tracking_log(lambda self, data, step, backend=None: got.append((data, step)))
    log(None, {"training/global_step": 4, "actor/entropy": 0.5}, 4)
    data, step = got[-1]
    sched = plugin_trainer._TRAINER.sched
    assert data["aqn/sigma"] == sched.sigma(3) and data["aqn/stage"] == sched.stage(3)
    assert data["quant/rel_error"] == 0.11 and data["quant/tensors"] == 196.0 and data["actor/entropy"] == 0.5
    assert data["quant/fake_quant_s"] == 0.0125
    log(None, {"val-core/openai/gsm8k/reward/mean@1": 0.5}, 0)  # validation-only record: untouched
    assert got[-1][0] == {"val-core/openai/gsm8k/reward/mean@1": 0.5}


def test_rpc_error_names_the_missing_env_var():
    e = plugin._rpc_error("aqn_rs_apply", AttributeError("'Worker' object has no attribute 'aqn_rs_apply'"))
    assert "VERL_USE_EXTERNAL_MODULES=aqn_rs.integrations.verl" in str(e)
    # vLLM 0.24's collective_rpc on a worker without the method (vllm/v1/serial_utils.py)
    e = plugin._rpc_error("aqn_rs_apply", RuntimeError("Method aqn_rs_apply is not implemented."))
    assert "VERL_USE_EXTERNAL_MODULES=aqn_rs.integrations.verl" in str(e)
    e = plugin._rpc_error("aqn_rs_apply", RuntimeError("CUDA error: out of memory"))
    assert "VERL_USE_EXTERNAL_MODULES" not in str(e) and "out of memory" in str(e)


@needs_omegaconf
def test_trainer_setup_forwards_config_to_workers():
    from omegaconf import OmegaConf, open_dict

    conf = OmegaConf.create({
        "trainer": {"noise_injection": NOISE, "quantization": {"format": "nvfp4"}},
        "actor_rollout_ref": {"actor": {"strategy": "fsdp"}, "rollout": {"name": "vllm"}},
    })
    OmegaConf.set_struct(conf, True)
    trainer = types.SimpleNamespace(config=conf, total_training_steps=T)
    try:
        plugin._trainer_setup(trainer)
        fwd = plugin._config_from_forwarded(conf.actor_rollout_ref.aqn_rs)
        assert fwd.total_steps == T and fwd.quantization["format"] == "nvfp4" and fwd.noise["num_stages"] == 10
        assert plugin_trainer._TRAINER.cfg == fwd
        conf.actor_rollout_ref.rollout.name = "sglang"
        with pytest.raises(plugin.VerlPluginError, match="rollout.name=sglang"):
            plugin._trainer_setup(trainer)
        conf.actor_rollout_ref.rollout.name = "vllm"
        with open_dict(conf.trainer):
            conf.trainer.noise_injection.sigma_strat = 1
        with pytest.raises(plugin.VerlPluginError, match=r"trainer\.noise_injection\.sigma_strat"):
            plugin._trainer_setup(trainer)
    finally:
        plugin_trainer._TRAINER = None


# ---------------------------------------------------------------------------------------------
# With verl installed
# ---------------------------------------------------------------------------------------------


@needs_verl
def test_patch_points_exist_in_installed_verl():
    assert plugin.check_patch_points() == []


@needs_verl
def test_importable_verl_modules_get_patched():
    import verl  # noqa: F401

    mods = {p.module for p in plugin.PATCH_POINTS}
    imported = []
    for m in sorted(mods):
        if plugin._module_file(m) is None:  # not in this verl version (v1 trainer before 0.9)
            continue
        try:
            importlib.import_module(m)
            imported.append(m)
        except ModuleNotFoundError as e:  # vLLM, or an optional dependency of verl's v1 trainer
            assert not (e.name or "").startswith("verl"), e
        except ValueError as e:  # verl's vLLM rollout refuses to import without vLLM
            assert "vllm" in m, e
    done = set(plugin.patched_points())
    for p in plugin.PATCH_POINTS:
        if p.module in imported:
            present = p.optional is False or hasattr(getattr(importlib.import_module(p.module), p.cls), p.attr)
            assert (p.qualname in done) == present, p.qualname
    from verl.workers.engine_workers import ActorRolloutRefWorker

    assert asyncio.iscoroutinefunction(ActorRolloutRefWorker.update_weights)
    assert hasattr(ActorRolloutRefWorker.update_weights, "attrs_3141562937")  # verl's @register survives


@needs_verl
def test_worker_extension_methods_added_to_the_vllm_extension_class():
    """vLLM is not installed here: load verl's vllm_rollout.utils source with its imports
    stubbed, through the plugin's import hook, and check the class gains the methods."""
    import sys

    path = plugin._module_file(plugin._VLLM_UTILS)
    tree = compile(open(path).read(), path, "exec")
    names = tree.co_names
    assert "vLLMColocateWorkerExtension" in names
    stub = types.ModuleType("stub")
    cls = type("vLLMColocateWorkerExtension", (), {})
    stub.vLLMColocateWorkerExtension = cls
    point = next(p for p in plugin.PATCH_POINTS if p.cls == "vLLMColocateWorkerExtension")
    plugin._apply(point, stub)
    assert cls.aqn_rs_apply is plugin._aqn_rs_apply and cls.aqn_rs_restore is plugin._aqn_rs_restore
    assert "aqn_rs" not in sys.modules.get("vllm", types.SimpleNamespace(__name__="none")).__name__


def _preset_commands():
    from aqn_rs.experiments import presets, verl_engine

    out = []
    for name in presets.PRESETS:
        for gpus in (1, 8):
            cmd = verl_engine.build_command(presets.load_preset(name), run_dir="/tmp/runs/" + name, gpus=gpus,
                                            data_dir="/tmp/runs/data")
            out.append((name, gpus, cmd))
    return out


@needs_verl
@pytest.mark.parametrize("name,gpus,cmd", _preset_commands() if HAVE_VERL else [],
                         ids=lambda x: str(x) if not isinstance(x, list) else "cmd")
def test_dry_run_commands_compose_against_verl_hydra_config(name, gpus, cmd):
    """Each preset's `aqn-rs run --engine verl` command: hydra composes it on verl's own
    ppo_trainer config, verl's validate_config accepts it, and the plugin reads its blocks."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    argv = cmd if isinstance(cmd, list) else shlex.split(cmd)
    i = argv.index("verl.trainer.main_ppo")
    overrides = argv[i + 1:]
    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        conf = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config=conf, use_reference_policy=need_reference_policy(conf), use_critic=need_critic(conf))
    pc = plugin.config_from_trainer(conf)
    from aqn_rs.experiments import presets

    p = presets.load_preset(name)
    assert (pc.quantization is not None) == (p["quantization"]["format"] != "none")
    assert (pc.noise is not None) == bool(p["noise_injection"]["enabled"])
    if pc.active:
        plugin._check_actor_settings(conf.actor_rollout_ref, pc)  # what the actor workers check
        env = conf.ray_kwargs.ray_init.runtime_env.env_vars
        assert env.VERL_USE_EXTERNAL_MODULES == plugin.PLUGIN
        assert conf.actor_rollout_ref.model.external_lib == plugin.PLUGIN
    assert conf.trainer.n_gpus_per_node == gpus
    assert conf.actor_rollout_ref.actor.optim.lr == 5e-7 and conf.data.train_batch_size == 128
    assert conf.trainer.total_epochs == 3 and conf.algorithm.adv_estimator == "grpo"


@needs_verl
@pytest.mark.parametrize("env,want", [
    ({}, ["actor_rollout_ref.rollout.gpu_memory_utilization=0.4", "trainer.save_freq=-1"]),
    ({"PARALLEL": "1", "SAVE_HF": "1"},
     ["actor_rollout_ref.rollout.gpu_memory_utilization=0.2",
      "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=2147483648",
      "trainer.save_freq=6", "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]"]),
], ids=["sequential", "parallel-save"])
def test_verl_stack_small_settings_compose_against_verl(env, want, tmp_path):
    """scripts/verl_stack.sh's GPU-machine settings (DRY_RUN): the command it would start, composed
    on verl's own Hydra config and checked by validate_config; the one-GPU memory knobs and the
    checkpoint that the trained-model export reads are what the run gets (a later --set wins)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    e = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, STASH=str(tmp_path / "stash"), STEPS="6",
             OUTPUT=str(tmp_path / "runs"), **env)
    for k in ("PARALLEL", "SAVE_HF", "GPU_MEM", "KV_BYTES", "RUN_ARGS", "MODEL", "DATA"):
        if k not in env:
            e.pop(k, None)
    r = subprocess.run(["bash", str(root / "scripts" / "verl_stack.sh"), "run", "nvfp4"], cwd=root, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "hydra compose + validate_config ok" in r.stdout and "plugin on" in r.stdout
    argv = shlex.split(r.stdout.split("command:\n", 1)[1].strip().splitlines()[0])
    overrides = argv[argv.index("verl.trainer.main_ppo") + 1:]
    last = {}
    for o in overrides:  # Hydra applies them in order: the last one of a key is what the run gets
        k, _, v = o.partition("=")
        last[k] = v
    for w in want:
        k, _, v = w.partition("=")
        assert last.get(k) == v, (k, last.get(k), v)
    assert last["trainer.total_training_steps"] == "6" and last["trainer.test_freq"] == "3"
    assert last["actor_rollout_ref.rollout.n"] == "8" and last["data.max_response_length"] == "128"


# ---------------------------------------------------------------------------------------------
# The whole actor path on a transformers Qwen2 under FSDP2 (scripts/verl_gpu_check.py, CPU)
# ---------------------------------------------------------------------------------------------


def _run_check(engine: str):
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "verl_gpu_check.py"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the script's process group binds no port
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, "-W", "ignore", str(script), "--device", "cpu", "--config", "tiny",
                        "--engine", engine, "--steps", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " 0 failed" in r.stdout and "logits == rollout logits" in r.stdout
    return r.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_actor_and_sync_on_a_qwen2_under_fsdp2():
    """Hooks before fully_shard (fp32 master, bf16 compute), a verl-style sync, optimizer
    steps, and the rollout's logits from the synced weights + AQN equal the actor's."""
    _run_check("fsdp2")


@needs_verl
@pytest.mark.skipif(importlib.util.find_spec("verl.plugin.platform") is None if HAVE_VERL else True,
                    reason="needs verl >= 0.9 (its platform registry lets the FSDP engine run on the CPU)")
def test_actor_and_sync_through_verls_fsdp_engine():
    """The same through verl's own FSDPEngineWithLMHead: the patched _build_fsdp_module,
    get_per_tensor_param and optimizer_step, on the CPU with gloo."""
    out = _run_check("verl")
    assert "verl/nvfp4 after 1 step(s): sync == fake_quant" in out


def test_sync_statistics_reach_the_trainer_through_rays_kv_store(monkeypatch):
    """Actor rank 0 publishes the sync's error statistics; the trainer reads them when it logs."""
    import sys

    store = {}
    kv = types.SimpleNamespace(_internal_kv_initialized=lambda: True,
                               _internal_kv_put=lambda k, v, overwrite=True: store.__setitem__(k, v),
                               _internal_kv_get=lambda k: store.get(k))
    fake_ray = types.ModuleType("ray")
    fake_ray.is_initialized = lambda: True
    fake_ray.get_runtime_context = lambda: types.SimpleNamespace(get_job_id=lambda: "0a000000")
    fake_ray.experimental = types.SimpleNamespace(internal_kv=kv)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.experimental", fake_ray.experimental)
    monkeypatch.setitem(sys.modules, "ray.experimental.internal_kv", kv)
    model = hf_model()
    st = plugin.ActorState(model, cfg({"format": "mxfp4"}))
    st.set_step(9)
    list(st.wrap_sync(iter(clean_state(model).items())))
    assert list(store) == [b"aqn_rs/quant_stats/0a000000"]
    monkeypatch.setattr(plugin_trainer, "_TRAINER", _trainer_state(noise=None, quant={"format": "mxfp4"}))
    m = plugin_trainer._TRAINER.metrics(10)
    assert m["quant/rel_error"] == pytest.approx(st.last_stats["rel_error"]) and m["quant/tensors"] == 7 * LAYERS
    assert "aqn/sigma" not in m


# ---------------------------------------------------------------------------------------------
# aqn-rs run --engine verl (aqn_rs.experiments.verl_engine)
# ---------------------------------------------------------------------------------------------


def _args(**kw):
    import argparse

    base = dict(cmd="run", preset="1E", engine="verl", gpus="2", model=None, data=None, steps=None,
                output="runs", name=None, overrides=[], dry_run=True, sigma=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_verl_rows_are_verls_gsm8k_preprocessing():
    from aqn_rs.experiments import verl_engine

    rows = verl_engine.verl_rows([{"question": "Tom has 3 apples.", "answer": "3 + 0 = 3\n#### 1,003"}], "test")
    assert rows == [{
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": 'Tom has 3 apples. Let\'s think step by step and output the final '
                                               'answer after "####".'}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "1003"},
        "extra_info": {"split": "test", "index": 0, "answer": "3 + 0 = 3\n#### 1,003", "question": "Tom has 3 apples."},
    }]


def test_prepare_data_writes_parquet_from_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from aqn_rs.experiments import verl_engine

    src = tmp_path / "gsm8k"
    src.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        (src / f"{split}.jsonl").write_text("".join(
            f'{{"question": "q{i}?", "answer": "w\\n#### {i}"}}\n' for i in range(n)))
    tr, te, desc = verl_engine.prepare_data(str(src), tmp_path / "out")
    t = pq.read_table(tr).to_pylist()
    assert len(t) == 5 and t[4]["reward_model"]["ground_truth"] == "4" and t[0]["prompt"][0]["role"] == "user"
    assert len(pq.read_table(te).to_pylist()) == 3 and "train.jsonl 5" in desc


def test_builtin_task_for_verl_keeps_the_local_prompt_and_verls_reward(tmp_path):
    """`--data builtin`: the local engine's arithmetic task and prompt (system message with the
    worked example), as GSM8K rows verl's own rule reward scores."""
    pq = pytest.importorskip("pyarrow.parquet")
    from aqn_rs.experiments import data as data_mod
    from aqn_rs.experiments import verl_engine

    tr, te, desc = verl_engine.prepare_data("builtin", tmp_path / "out", {"add_sub": 1.0})
    train, test = pq.read_table(tr).to_pylist(), pq.read_table(te).to_pylist()
    want_train, want_test, _ = data_mod.load_data(None, mix={"add_sub": 1.0})
    assert len(train) == len(want_train) == 5000 and len(test) == len(want_test) == 200
    assert "builtin" in desc and "add_sub 100%" in desc
    for row, rec in ((train[7], want_train[7]), (test[3], want_test[3])):
        assert row["prompt"] == data_mod.prompt_messages(rec["question"])
        assert row["prompt"][0]["role"] == "system" and "#### 7" in row["prompt"][0]["content"]
        assert row["reward_model"]["ground_truth"] == rec["answer"].rsplit("#### ", 1)[1]
        assert row["data_source"] == "openai/gsm8k"
    assert not set(r["extra_info"]["question"] for r in train) & set(r["extra_info"]["question"] for r in test)
    with pytest.raises(Exception, match="builtin_mix"):
        verl_engine.prepare_data("builtin", tmp_path / "bad", {"nope": 1.0})
    try:
        from verl.utils.reward_score import default_compute_score
    except ImportError:
        return  # verl's scorer is checked where verl is installed (the verl test environment)
    gt = test[0]["reward_model"]["ground_truth"]
    assert default_compute_score("openai/gsm8k", f"so\n#### {gt}", gt) == 1.0
    assert default_compute_score("openai/gsm8k", f"so\n#### {int(gt) + 1}", gt) == 0.0


def test_local_engine_takes_builtin_by_name():
    from aqn_rs.experiments import data as data_mod

    a, b, desc = data_mod.load_data("builtin", train_size=10, eval_size=4)
    assert (a, b) == data_mod.load_data(None, train_size=10, eval_size=4)[:2] and len(a) == 10 and len(b) == 4


def test_dry_run_prints_the_command(capsys, tmp_path):
    from aqn_rs.experiments import verl_engine

    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    assert verl_engine.run_cli(_args(data=str(tmp_path), overrides=["verl.trainer.total_epochs=1",
                                                                     "noise_injection.sigma_start=0.01"])) == 0
    out = capsys.readouterr().out
    cmd = shlex.split(out.splitlines()[-1])
    assert cmd[1:3] == ["-m", "verl.trainer.main_ppo"]
    assert "trainer.total_epochs=1" in cmd and "trainer.total_epochs=3" not in cmd
    assert "+trainer.noise_injection.sigma_start=0.01" in cmd and "trainer.n_gpus_per_node=2" in cmd
    assert "actor_rollout_ref.model.path=Qwen/Qwen2.5-1.5B-Instruct" in cmd
    assert "+trainer.quantization.format=mxfp4" in cmd and "+trainer.quantization.scale_mode=floor" in cmd
    assert "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=aqn_rs.integrations.verl" in cmd
    base = verl_engine.build_command(__import__("aqn_rs.experiments.presets", fromlist=["x"]).load_preset("baseline"),
                                     "/r", 8, "/r/data")
    assert not any("aqn_rs.integrations" in a or a.startswith("+trainer.") for a in base[3:])  # plain verl


@pytest.mark.parametrize("flash", [True, False])
def test_remove_padding_only_with_flash_attn(monkeypatch, flash):
    """verl's use_remove_padding calls flash-attn's varlen kernels: without flash-attn the command
    falls back to sdpa on padded batches, and a user's --set still wins."""
    from aqn_rs.experiments import presets, verl_engine

    monkeypatch.setattr(verl_engine, "has_flash_attn", lambda: flash)
    cmd = verl_engine.build_command(presets.load_preset("nvfp4"), "/r", 1, "/r/data")
    assert ("actor_rollout_ref.model.use_remove_padding=true" in cmd) is flash
    assert ("actor_rollout_ref.model.use_remove_padding=false" in cmd) is not flash
    assert ("+actor_rollout_ref.model.override_config.attn_implementation=sdpa" in cmd) is not flash
    user = verl_engine.build_command(presets.load_preset(
        "nvfp4", ["verl.actor_rollout_ref.model.use_remove_padding=true",
                  "verl.+actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2"]),
        "/r", 1, "/r/data")
    assert "actor_rollout_ref.model.use_remove_padding=true" in user
    assert "+actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2" in user
    assert not any(a.endswith("attn_implementation=sdpa") or a.endswith("use_remove_padding=false") for a in user)


@pytest.mark.parametrize("flash,flashinfer", [(True, True), (False, False), (True, False)])
def test_worker_env_without_flash_attn_or_flashinfer(monkeypatch, flash, flashinfer):
    """The sampler and attention settings reach the Ray workers through verl's runtime env, only
    where the package is missing, and a value exported by the user is the one passed on (quoted:
    Ray takes env_vars as strings, Hydra would read a bare 0 as an int)."""
    from aqn_rs.experiments import presets, verl_engine

    monkeypatch.setattr(verl_engine, "has_flash_attn", lambda: flash)
    monkeypatch.setattr(verl_engine, "has_flashinfer", lambda: flashinfer)
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", raising=False)
    env = "+ray_kwargs.ray_init.runtime_env.env_vars."
    for preset in ("baseline", "nvfp4-aqn"):
        cmd = verl_engine.build_command(presets.load_preset(preset), "/r", 1, "/r/data")
        assert (f"{env}VLLM_USE_FLASHINFER_SAMPLER='0'" in cmd) is not flashinfer
        assert (f"{env}TORCH_CUDNN_SDPA_DEPRIORITIZED='1'" in cmd) is not flash
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    cmd = verl_engine.build_command(presets.load_preset("nvfp4"), "/r", 1, "/r/data")
    assert (f"{env}VLLM_USE_FLASHINFER_SAMPLER='1'" in cmd) is not flashinfer
    assert f"{env}VLLM_USE_FLASHINFER_SAMPLER='0'" not in cmd


def test_missing_packages_names_pip_projects(monkeypatch):
    import importlib.util

    from aqn_rs.experiments import verl_engine
    from aqn_rs.experiments.errors import ExperimentError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("vllm", "transfer_queue") else real(name, *a))
    assert [p for p in verl_engine.missing_packages() if p in ("vllm", "TransferQueue")] == ["vllm", "TransferQueue"]
    cfg = verl_engine.plan_run(_args(preset="baseline", gpus="1"))
    with pytest.raises(ExperimentError, match=r"pip install .*vllm.*TransferQueue"):
        verl_engine.execute(cfg, None)


@pytest.mark.parametrize("kw,needle", [
    (dict(model="embedded"), "transformers model vLLM can load"),
    (dict(model="x.gguf"), "not a .gguf"),
    (dict(gpus="0"), "--gpus >= 1"),
    (dict(data="/nonexistent/gsm8k"), "does not exist"),
    (dict(preset="nope"), "unknown preset"),
    (dict(overrides=["noise_injection.apply_to=vllm"]), "apply_to"),
])
def test_verl_engine_errors(kw, needle):
    from aqn_rs.experiments import verl_engine
    from aqn_rs.experiments.errors import ExperimentError

    with pytest.raises(ExperimentError, match=re.escape(needle)):
        verl_engine.run_cli(_args(**kw))


def test_hydra_values():
    from aqn_rs.experiments.verl_engine import hydra_value

    assert hydra_value(["lm_head", "re:.*mlp.gate$"]) == "[lm_head,'re:.*mlp.gate$']"
    assert [hydra_value(v) for v in (True, None, 5e-7, 3, "true", "1e-3")] == ["true", "null", "5e-07", "3", "'true'", "'1e-3'"]


def test_verl_metrics_become_run_metrics():
    from aqn_rs.experiments import verl_engine

    lines = ['{"step": 0, "data": {"val-core/openai/gsm8k/reward/mean@1": 0.6}}',
             '{"step": 1, "data": {"actor/entropy": 0.8, "critic/score/mean": 0.5, "aqn/sigma": 0.0, '
             '"training/global_step": 1, "quant/rel_error": 0.11, "timing_s/gen": 8.1, "timing_s/update_weights": 0.32, '
             '"timing_s/update_actor": 3.6, "quant/fake_quant_s": 0.012}}',
             '{"step": 5, "data": {"actor/entropy": 1.2, "val-core/openai/gsm8k/reward/mean@1": 0.7}}']
    assert verl_engine.convert_metrics(lines) == [
        {"step": 0, "val_strict": 0.6},
        {"step": 1, "entropy": 0.8, "reward": 0.5, "sigma": 0.0, "quant_rel_error": 0.11, "gen_time": 8.1,
         "sync_time": 0.32, "update_time": 3.6, "sync_fake_quant_time": 0.012},
        {"step": 5, "entropy": 1.2, "val_strict": 0.7},
    ]


def test_missing_verl_or_old_verl_or_missing_patch_point_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(plugin_patches, "_verl_version", lambda: None)
    with pytest.raises(plugin.VerlPluginError, match="verl is not installed"):
        plugin.check_patch_points()
    monkeypatch.setattr(plugin_patches, "_verl_version", lambda: "0.7.1")
    with pytest.raises(plugin.VerlPluginError, match="verl 0.7.1 is older than 0.8.0"):
        plugin.check_patch_points()
    monkeypatch.setattr(plugin_patches, "_verl_version", lambda: "0.10.0")
    point = next(p for p in plugin.PATCH_POINTS if p.attr == "get_per_tensor_param")
    stub = types.ModuleType(point.module)
    stub.FSDPEngine = type("FSDPEngine", (), {})  # a release where the method moved
    with pytest.raises(plugin.VerlPluginError, match=r"verl 0\.10\.0 has no verl\.workers\.engine\.fsdp\."
                                                      r"transformer_impl\.FSDPEngine\.get_per_tensor_param"):
        plugin._apply(point, stub)
    optional = next(p for p in plugin.PATCH_POINTS if p.optional)
    stub = types.ModuleType(optional.module)
    stub.FSDPEngine = type("FSDPEngine", (), {})
    plugin._apply(optional, stub)  # optional points may be absent


# ---------------------------------------------------------------------------------------------
# The trainer side over real Ray, with verl's own CheckpointEngineManager
# ---------------------------------------------------------------------------------------------

_RAY_SCRIPT = r'''
import asyncio, os, sys, types, warnings
warnings.filterwarnings("ignore")
TESTS = sys.argv[1]
sys.path.insert(0, TESTS)
import torch, ray
from aqn_rs.aqn import gaussian_noise
from aqn_rs.integrations import verl as plugin
from aqn_rs.integrations.verl import trainer as plugin_trainer
from verl.checkpoint_engine.base import CheckpointEngineManager
from verl.workers.config.rollout import CheckpointEngineConfig

assert getattr(CheckpointEngineManager.update_weights, "__aqn_rs_patched__", False)
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"VERL_USE_EXTERNAL_MODULES": plugin.PLUGIN,
                                   "PYTHONPATH": os.pathsep.join([TESTS] + sys.path[1:])}})


@ray.remote
class Server:
    """vLLMHttpServer's part: collective_rpc runs a worker-extension method on its worker."""

    def __init__(self):
        import test_verl_plugin as T

        self.model = T.vllm_model(T.clean_state(T.hf_model()))
        self.worker = T.FakeWorker(self.model)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        fn = {"aqn_rs_apply": plugin._aqn_rs_apply, "aqn_rs_restore": plugin._aqn_rs_restore}[method]
        return fn(self.worker, *args, **(kwargs or {}))

    def norm(self):
        return self.model.model.norm.weight.detach().clone()

    def clear_kv_cache(self):  # vLLMHttpServer.clear_kv_cache: the prefix cache
        self.cleared = getattr(self, "cleared", 0) + 1

    def n_cleared(self):
        return getattr(self, "cleared", 0)


class ActorWG:  # the naive path: ray.get(actor_wg.update_weights(...))
    def update_weights(self, global_steps=None, mode=None):
        return []


servers = [Server.remote() for _ in range(2)]
replicas = [types.SimpleNamespace(server_handle=s) for s in servers]
mgr = CheckpointEngineManager(CheckpointEngineConfig(backend="naive"), ActorWG(), replicas)
noise = {"enabled": True, "sigma_start": 0.05, "sigma_end": 0.0005, "num_stages": 10, "layer_types": ["rmsnorm"]}
plugin_trainer._TRAINER = plugin.TrainerState(plugin.parse_config(None, noise, 174))
clean = ray.get(servers[0].norm.remote())
sigma = plugin_trainer._TRAINER.sched.sigma


def want(step):
    return clean + gaussian_noise(clean.shape, 0, step, "model.norm", sigma(step), dtype=clean.dtype)


mgr.update_weights(40)  # the sync trainer's call, no event loop: verl's auto_await runs it
a, b = ray.get([s.norm.remote() for s in servers])
assert torch.equal(a, want(40)) and torch.equal(b, a), "sync call"


async def from_async():
    return await mgr.update_weights(global_steps=41)  # an async caller gets the coroutine


asyncio.run(from_async())
assert torch.equal(ray.get(servers[1].norm.remote()), want(41)), "async call"
seen = {}


def validate(self):
    seen["norm"] = ray.get(servers[0].norm.remote())
    mgr.update_weights()  # verl's wake-up inside validation: no step, no noise
    return {"val": 1}


trainer = types.SimpleNamespace(checkpoint_manager=mgr)
assert plugin._wrap_validate(validate)(trainer) == {"val": 1}
assert torch.equal(seen["norm"], clean), "clean during validation"
assert torch.equal(ray.get(servers[0].norm.remote()), want(41)), "noise back after validation"
assert ray.get([s.n_cleared.remote() for s in servers]) == [2, 2], "prefix cache dropped after each swap"
ray.shutdown()
print("RAY OK")
'''


@needs_verl
def test_trainer_side_over_ray_with_verls_checkpoint_manager(tmp_path):
    """verl's CheckpointEngineManager (naive backend, patched), called as the sync trainer and
    as an async caller, makes two Ray actors standing in for vLLM servers apply the step's AQN
    through collective_rpc; the _validate bracket gives them clean weights and the noise back."""
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "ray_check.py"
    script.write_text(_RAY_SCRIPT)
    tests = str(pathlib.Path(__file__).resolve().parent)
    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "-W", "ignore", str(script), tests], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "RAY OK" in r.stdout, (r.stdout[-3000:] + r.stderr[-5000:])


# ---------------------------------------------------------------------------------------------
# The probe: what a real run's vLLM holds, read back and checked (integrations/verl_probe.py)
# ---------------------------------------------------------------------------------------------


def _probe_run(monkeypatch, tmp_path, fmt, steps=(1, 2)):
    """Two syncs of a trained-ish fp32 master through the plugin's own wrappers into a
    vLLM-shaped model, with the step's AQN and a validation after each, probes on."""
    from aqn_rs.integrations import verl_probe

    monkeypatch.setenv(verl_probe.ENV_DIR, str(tmp_path))
    quant = {"format": fmt}
    noise = {**NOISE, "zero_first_stage": False}  # noise from step 0 on
    model = hf_model(torch.float32)
    actor = plugin.ActorState(model, cfg(quant, noise), torch.bfloat16)
    monkeypatch.setattr(plugin_trainer, "_TRAINER", _trainer_state(noise, quant))
    verl_probe.write_meta(plugin_trainer._TRAINER.cfg.forwarded())
    vm = worker = None
    methods = {"aqn_rs_apply": plugin._aqn_rs_apply, "aqn_rs_restore": plugin._aqn_rs_restore,
               "aqn_rs_probe": plugin._aqn_rs_probe}
    monkeypatch.setattr(plugin_trainer, "_rpc_sync", lambda replicas, method, kwargs: methods[method](worker, **kwargs))
    manager = types.SimpleNamespace(replicas=["replica0"])
    trainer = types.SimpleNamespace(checkpoint_manager=manager)
    g = torch.Generator().manual_seed(5)
    for step in steps:
        actor.set_step(step)
        synced = dict(actor.wrap_sync(iter(clean_state(model).items())))

        def sync(self, global_steps=None, synced=synced):
            nonlocal vm, worker
            if vm is None:
                vm = vllm_model(synced)
                worker = FakeWorker(vm)
            else:  # vLLM's load_weights: in place, into the same parameters
                vm.load_state_dict(vllm_model(synced).state_dict())

        plugin._wrap_manager_update_weights(sync)(manager, step)
        plugin._wrap_validate(lambda self: {"val": 1.0})(trainer)
        with torch.no_grad():  # an optimizer step on the masters
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return verl_probe, model, vm


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_probe_checks_a_faithful_rollout_and_catches_a_wrong_one(monkeypatch, tmp_path, fmt):
    verl_probe, _, _ = _probe_run(monkeypatch, tmp_path, fmt)
    files = sorted(p.name for p in tmp_path.iterdir())
    for s in (1, 2):
        for f in (f"actor-s{s}-in", f"actor-s{s}-out", f"rollout-s{s}-synced-w0", f"rollout-s{s}-noised-w0",
                  f"rollout-v{s}-clean-w0"):
            assert f"{f}.safetensors" in files
    rep = verl_probe.check(str(tmp_path), "cpu")
    assert rep["passed"], rep["failures"]
    names = [c["check"] for c in rep["checks"]]
    for needle in ("sync == reference fake_quant(actor)", "rollout weights == sync", "RMSNorm gains carry noise",
                   "validation on clean weights", "masters moved", "actor masters unquantized",
                   "every projection weight quantized"):
        assert any(needle in n for n in names), needle
    detail = {c["check"]: c["detail"] for c in rep["checks"]}
    assert detail["s1 w0 rollout weights == sync"].startswith(f"{6 * LAYERS + 3} vLLM parameters")

    # one element off in vLLM's fused qkv_proj after the sync: caught and named
    from safetensors.torch import load_file, save_file

    path = tmp_path / "rollout-s2-synced-w0.safetensors"
    t = load_file(str(path))
    t["model.layers.1.self_attn.qkv_proj.weight"][3, 5] += 1.0
    save_file(t, str(path))
    # noise from the wrong step on one gain: caught
    path = tmp_path / "rollout-s1-noised-w0.safetensors"
    t = load_file(str(path))
    t["model.norm.weight"] = t["model.norm.weight"] + 0.01
    save_file(t, str(path))
    rep = verl_probe.check(str(tmp_path), "cpu")
    assert not rep["passed"]
    text = " ".join(rep["failures"])
    assert "model.layers.1.self_attn.qkv_proj.weight" in text and "model.norm.weight" in text


def test_probe_records_nothing_without_the_variable(monkeypatch, tmp_path):
    from aqn_rs.integrations import verl_probe

    monkeypatch.delenv(verl_probe.ENV_DIR, raising=False)
    assert not verl_probe.probes(1)
    monkeypatch.setenv(verl_probe.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(verl_probe.ENV_STEPS, "1")
    assert verl_probe.probes(0) and verl_probe.probes(1) and not verl_probe.probes(2) and not verl_probe.probes(None)
