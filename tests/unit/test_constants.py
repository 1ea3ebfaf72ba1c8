"""The shared numbers and rules (`aqn_rs.constants`) are the ones every module uses, and agree
with what the Rust core decides on its own."""

from __future__ import annotations

import aqn_rs
from aqn_rs import constants as C


def test_default_exclude_is_the_rust_selectors_default():
    # The binding does not expose aqn_core's DEFAULT_EXCLUDE; its effect is observable: a
    # selector built with exclude=None rejects exactly these names, by an exclude rule.
    default = aqn_rs.ModuleSelector()
    explicit = aqn_rs.ModuleSelector(exclude=C.DEFAULT_EXCLUDE)
    for name in C.DEFAULT_EXCLUDE:
        assert default.decide(f"model.{name}", "Linear") == (False, f"exclude:{name}")
    for name in ("model.layers.0.self_attn.q_proj", "model.lm_head", "model.embed_tokens", "lm_head_2"):
        assert default.decide(name, "Linear") == explicit.decide(name, "Linear")


def test_the_modules_use_the_shared_definitions():
    from aqn_rs import _cuda, export, hooks, quantizers, reference, scan, selection
    from aqn_rs.experiments import presets
    from aqn_rs.integrations import verl

    assert aqn_rs.MXFP4_BLOCK == quantizers.MXFP4_BLOCK == reference.MX_BLOCK == C.MXFP4_BLOCK == 32
    assert aqn_rs.NVFP4_BLOCK == quantizers.NVFP4_BLOCK == reference.NV_BLOCK == C.NVFP4_BLOCK == 16
    assert _cuda._BLOCK is C.BLOCK_SIZES and export._BLOCK is C.BLOCK_SIZES
    assert reference.F4_E2M1_MAX == scan.F4_E2M1_MAX == C.E2M1_MAX == 6.0
    for mod in (aqn_rs, quantizers, reference, export, scan, presets):
        assert mod.SCALE_MODES is C.SCALE_MODES
    assert hooks.STE_MODES is C.STE_MODES and hooks.INJECTION_POINTS is C.INJECTION_POINTS
    for mod in (selection, export, scan):
        assert mod.DEFAULT_EXCLUDE is C.DEFAULT_EXCLUDE
    assert verl.DEFAULT_EXCLUDE == presets.load_preset("nvfp4")["quantization"]["exclude"] == list(C.DEFAULT_EXCLUDE)
    assert export.FUSED_GROUPS is C.FUSED_GROUPS and verl.VLLM_FUSED is C.VLLM_FUSED
    assert set(presets.DECAYS) == set(aqn_rs._aqn_rs.DECAYS)


def test_fused_groups_are_vllms_fused_names():
    assert C.VLLM_FUSED["qkv_proj"] == ("q_proj", "k_proj", "v_proj")
    assert C.VLLM_FUSED["gate_up_proj"] == ("gate_proj", "up_proj")
    assert C.FUSED_GROUPS == tuple(C.VLLM_FUSED.values())


def test_fused_weight_groups_lives_with_selection():
    from aqn_rs import export, selection

    assert export.fused_weight_groups is selection.fused_weight_groups
    names = ["m.l.0.self_attn.q_proj", "m.l.0.self_attn.k_proj", "m.l.0.self_attn.v_proj",
             "m.l.0.mlp.gate_proj", "m.l.0.mlp.up_proj", "m.l.0.mlp.down_proj", "m.l.1.mlp.up_proj"]
    assert selection.fused_weight_groups(names) == [tuple(names[:3]), tuple(names[3:5])]


def test_dtype_tags():
    import torch

    from aqn_rs import _cuda, export, quantizers

    for name, tag in C.DTYPE_TAGS.items():
        assert quantizers._torch_tag(torch.empty(0, dtype=getattr(torch, name))) == tag
        assert quantizers._torch_dtype(tag) is getattr(torch, name) is export._DTYPE_NAMES[name]
        assert export._DTYPE_TAGS[getattr(torch, name)] == tag
    _cuda._init()
    assert _cuda._dtags == {getattr(torch, n): t for n, t in C.DTYPE_TAGS.items()}
    assert export._ST_DTYPES[torch.float8_e4m3fn] == "F8_E4M3" and export._ST_TORCH["BF16"] is torch.bfloat16
