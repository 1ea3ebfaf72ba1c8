"""The numbers and rules the package shares, defined once (torch-free; imports nothing heavy).

Every other module imports these names instead of restating them, so a rule that changes here
changes for the quantizers, the hooks, the export, the scanner, the verl plugin and the presets
alike. What the Rust core already exposes (`LAYER_TYPES`, `DECAYS`) is re-exported from it, not
copied.
"""

from __future__ import annotations

from typing import Dict, Tuple

from ._aqn_rs import DECAYS, LAYER_TYPES

__all__ = [
    "APPLY_TO",
    "BLOCK_SIZES",
    "DECAYS",
    "DEFAULT_EXCLUDE",
    "DTYPE_TAGS",
    "E2M1_MAX",
    "FORMATS",
    "FUSED_GROUPS",
    "INJECTION_POINTS",
    "LAYER_TYPES",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "SAFETENSORS_DTYPES",
    "SCALE_MODES",
    "STE_MODES",
    "TAG_DTYPES",
    "TRAIN_FORMATS",
    "VLLM_FUSED",
]

# Elements per scale block: OCP MX v1.0 fixes 32 for MXFP4 (one E8M0 scale per 32); NVIDIA's
# NVFP4 uses 16 (one E4M3 scale per 16, under one f32 global scale per tensor).
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
BLOCK_SIZES: Dict[str, int] = {"mxfp4": MXFP4_BLOCK, "nvfp4": NVFP4_BLOCK}

# The largest E2M1 magnitude (1.5 * 2**2): an element whose scaled value exceeds it is clipped.
E2M1_MAX = 6.0

# The FP4 formats a model can be quantized to.
FORMATS: Tuple[str, ...] = ("mxfp4", "nvfp4")
# The formats a training config takes: "none" trains without fake quant.
TRAIN_FORMATS: Tuple[str, ...] = ("none",) + FORMATS
# How an MXFP4 block's E8M0 scale is rounded from its amax (floor is OCP's rule; rceil is
# NVIDIA's cuBLAS/TE rule; even and ceil are the other two roundings of the exponent).
SCALE_MODES: Tuple[str, ...] = ("floor", "rceil", "even", "ceil")
# The straight-through estimator's backward: identity passes the gradient everywhere; clipped
# zeroes it where the element saturated at +-E2M1_MAX * scale.
STE_MODES: Tuple[str, ...] = ("identity", "clipped")
# Where fake quant is applied in a Linear: its weight (W4A16, what vLLM's FP4 checkpoints
# compute), its input activation, or both.
INJECTION_POINTS: Tuple[str, ...] = ("weight", "activation", "both")
# Which side of RL training gets the noise: the trainer's actor, vLLM's rollout, or both.
APPLY_TO: Tuple[str, ...] = ("actor", "rollout", "both")

# Modules no format quantizes by default: the output head and the token embedding stay in high
# precision in vLLM's and compressed-tensors' FP4 schemes. The Rust selector's default
# (`aqn_core::selector::DEFAULT_EXCLUDE`, used when `exclude=None`) is the same pair; the
# binding does not expose it, and a test checks the two agree.
DEFAULT_EXCLUDE: Tuple[str, ...] = ("lm_head", "embed_tokens")

# vLLM's fused Linear modules and the HF sibling modules whose rows they stack, in order (vLLM's
# `stacked_params_mapping`). A fused layer has one NVFP4 global scale, so fake quant that must
# equal vLLM's computes one amax over the members.
VLLM_FUSED: Dict[str, Tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek's MLA
}
# The same groups by their HF member names.
FUSED_GROUPS: Tuple[Tuple[str, ...], ...] = tuple(VLLM_FUSED.values())

# The dtype tags the Rust core and the kernels take, by torch dtype name (`str(dtype)` without
# "torch."). Modules that hold torch build their `torch.dtype -> tag` tables from this one.
DTYPE_TAGS: Dict[str, str] = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
TAG_DTYPES: Dict[str, str] = {tag: name for name, tag in DTYPE_TAGS.items()}

# safetensors' dtype names (its `Dtype` enum) and the torch dtype each one reads as.
SAFETENSORS_DTYPES: Dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
