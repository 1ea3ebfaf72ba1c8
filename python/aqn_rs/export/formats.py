"""The compressed-tensors side of the export: the names, config and tensor layout that
compressed-tensors 0.20 writes for NVFP4A16 / MXFP4A16, the packing of one weight (or fused
group) with our quantizers, and the tensors of an in-memory model."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..constants import (
    BLOCK_SIZES,
    DTYPE_TAGS,
    FORMATS,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    SAFETENSORS_DTYPES,
    SCALE_MODES,
)
from ..quantizers import (
    Mxfp4Quantizer,
    Nvfp4Quantizer,
)

# fused_weight_groups lives with the selection rules; `aqn_rs.export.fused_weight_groups` stays.
from ..selection import ModuleSelector, canonical_name, class_name_of

# compressed-tensors' CompressionFormat values (compressed_tensors/config/base.py).
CT_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


# The compressed-tensors release whose config and tensor layout this module writes.
CT_VERSION = "0.20.0"


# `QuantizationArgs.model_dump()` of the weights of compressed-tensors 0.20's NVFP4A16 and
# MXFP4A16 presets (quantization/quant_scheme.py), as its ModelCompressor.update_config writes
# them (None fields, observer and the symmetric zp_dtype are omitted by its serializer).
_CT_WEIGHT_ARGS = {
    "nvfp4": {
        "dynamic": False,
        "group_size": NVFP4_BLOCK,
        "num_bits": 4,
        "scale_dtype": "torch.float8_e4m3fn",
        "strategy": "tensor_group",
        "symmetric": True,
        "type": "float",
    },
    "mxfp4": {
        "dynamic": False,
        "group_size": MXFP4_BLOCK,
        "num_bits": 4,
        "scale_dtype": "torch.uint8",
        "strategy": "group",
        "symmetric": True,
        "type": "float",
    },
}


_BLOCK = BLOCK_SIZES


# safetensors dtype names (safetensors' Dtype enum) <-> torch dtypes.
_ST_TORCH = {st: getattr(torch, name) for st, name in SAFETENSORS_DTYPES.items()}


_ST_DTYPES = {dt: st for st, dt in _ST_TORCH.items()}


_DTYPE_NAMES = {name: getattr(torch, name) for name in DTYPE_TAGS}


_DTYPE_TAGS = {getattr(torch, name): tag for name, tag in DTYPE_TAGS.items()}


_QUANT_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Files that hold weights; everything else in a source folder is copied.
_WEIGHT_FILE_SUFFIXES = (
    ".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth",
    ".ckpt", ".h5", ".msgpack", ".gguf",
)


# The selector's rules (wrapper-free names, the class name along the MRO) are selection's;
# these short names keep this module's call sites as they were.
_canonical = canonical_name


_class_name = class_name_of


def _selector(include, exclude, layer_types=("linear",)):
    return ModuleSelector(
        include=tuple(include) if include is not None else None,
        exclude=tuple(exclude) if exclude is not None else (),
        layer_types=tuple(layer_types),
    )


def _check_format(format: str, scale_mode: Optional[str]) -> Tuple[str, str]:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    if format == "nvfp4":
        if scale_mode not in (None, "floor"):
            raise ValueError(
                f"scale_mode={scale_mode!r} applies to MXFP4 only (NVFP4 block scales are E4M3, "
                "not powers of two); leave it at its default for format='nvfp4'"
            )
        return format, "floor"
    scale_mode = scale_mode or "floor"
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown MXFP4 scale_mode {scale_mode!r}; expected one of {SCALE_MODES}")
    return format, scale_mode


def _quantizer(format: str, scale_mode: str):
    return Nvfp4Quantizer() if format == "nvfp4" else Mxfp4Quantizer(scale_mode)


def quantization_config(format: str, ignore: Sequence[str] = ()) -> Dict[str, Any]:
    """The `quantization_config` block of `config.json` for a W4A16 checkpoint.

    It is what compressed-tensors 0.20's `ModelCompressor.update_config` writes for a model
    quantized with its NVFP4A16 / MXFP4A16 preset on `targets=["Linear"]` (same keys and
    values, `version` = `CT_VERSION`), which vLLM's `CompressedTensorsConfig` maps to
    `CompressedTensorsW4A16Fp4` / `CompressedTensorsW4A16Mxfp4`.

    Args:
        format: "nvfp4" or "mxfp4".
        ignore: names of the Linear modules left unquantized (exact names).

    Returns:
        A JSON-serialisable dict.
    """
    _check_format(format, None)
    return {
        "config_groups": {
            "group_0": {
                "format": CT_FORMATS[format],
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": dict(_CT_WEIGHT_ARGS[format]),
            }
        },
        "format": CT_FORMATS[format],
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _pack_weight(q, w: Tensor, amax: Any = None) -> List[Tuple[str, Tensor]]:
    """(suffix, tensor) of one packed weight, on `w`'s device."""
    if isinstance(q, Nvfp4Quantizer):
        t = q.quantize(w, amax)
        return [
            ("weight_packed", t.codes),
            ("weight_scale", t.scales.view(torch.float8_e4m3fn)),
            ("weight_global_scale", t.global_scale.reshape(1).to(torch.float32)),
        ]
    t = q.quantize(w)
    return [("weight_packed", t.codes), ("weight_scale", t.scales)]


def _packed_outs(format: str, module: str, shape: Tuple[int, ...]) -> List["_Out"]:
    rows, k = shape
    outs = [
        _Out(f"{module}.weight_packed", torch.uint8, (rows, k // 2)),
        _Out(
            f"{module}.weight_scale",
            torch.float8_e4m3fn if format == "nvfp4" else torch.uint8,
            (rows, k // _BLOCK[format]),
        ),
    ]
    if format == "nvfp4":
        outs.append(_Out(f"{module}.weight_global_scale", torch.float32, (1,)))
    return outs


def _group_amax(q: Nvfp4Quantizer, ws: Sequence[Tensor]) -> Any:
    """max of the members' amax, NaN if any is NaN (so the global scale falls back to 1 as
    compressed-tensors does); a device tensor for CUDA input (no host sync)."""
    amaxes = [q.amax(w) for w in ws]
    if all(isinstance(a, float) for a in amaxes):
        return math.nan if any(math.isnan(a) for a in amaxes) else max(amaxes)
    dev = ws[0].device
    return torch.stack([torch.as_tensor(a, dtype=torch.float32, device=dev).reshape(()) for a in amaxes]).amax()


def _to_quant_input(w: Tensor, dtype: Optional[torch.dtype], device: Any) -> Tensor:
    w = w.detach()
    if device is not None:
        w = w.to(device)
    if dtype is not None:
        w = w.to(dtype)
    if w.dtype not in _QUANT_INPUT_DTYPES:
        w = w.float()
    return w.contiguous()


def _dense(t: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(dtype)
    return t


def _dense_dtype(src: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None and src.is_floating_point and src not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return dtype
    return src


def _check_not_dtensor(name: str, t: Any) -> None:
    if type(t).__name__ == "DTensor":
        raise TypeError(
            f"{name} is a DTensor (FSDP2 shard); gather a full state dict first, e.g. "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True))"
        )


@dataclasses.dataclass
class _Out:
    """One tensor of the output checkpoint, known before it is computed."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


class _ModelTensors:
    """The state dict of an in-memory model (tied tensors once, wrapper names removed)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._tensors: Dict[str, Tensor] = {}
        seen = set()
        for name, t in model.state_dict().items():
            _check_not_dtensor(name, t)
            if t.device.type == "meta":
                raise ValueError(f"{name} is on the meta device; load the weights before exporting")
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:  # a tied weight (lm_head = embed_tokens): written once, as transformers does
                continue
            seen.add(key)
            self._tensors[_canonical(name)] = t
        self.names = list(self._tensors)
        self.classes = {_canonical(n): _class_name(m) for n, m in model.named_modules() if n}

    def meta(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        t = self._tensors[name]
        return t.dtype, tuple(t.shape)

    def get(self, name: str) -> Tensor:
        return self._tensors[name]

    def close(self) -> None:
        pass

