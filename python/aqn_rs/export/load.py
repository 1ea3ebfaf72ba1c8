"""The way back: compressed-tensors FP4 checkpoints (ours or compressed-tensors') read into
`QuantizedTensor`s (`load_compressed_checkpoint`) or dense tensors (`dequantize_checkpoint`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from ..checkpoint import FolderTensors
from ..constants import (
    MXFP4_BLOCK,
    NVFP4_BLOCK,
)
from ..errors import CheckpointError, CheckpointNotFoundError
from ..quantizers import (
    Mxfp4Quantizer,
    Nvfp4Quantizer,
    QuantizedTensor,
)

# fused_weight_groups lives with the selection rules; `aqn_rs.export.fused_weight_groups` stays.
from .formats import (
    _BLOCK,
    _DTYPE_NAMES,
    _DTYPE_TAGS,
)
from .plan import _resolve_dtype


def _format_of_args(w: Mapping[str, Any]) -> Optional[str]:
    if w is None or w.get("num_bits") != 4 or str(w.get("type", "")).lower() != "float":
        return None
    strategy = str(w.get("strategy", "")).lower()
    if w.get("group_size") == NVFP4_BLOCK and strategy == "tensor_group":
        return "nvfp4"
    if w.get("group_size") == MXFP4_BLOCK and strategy == "group":
        return "mxfp4"
    return None


def _read_quant_config(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointNotFoundError(f"no config.json in {path}")
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config") or cfg.get("compression_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{path} is not a compressed-tensors checkpoint (config.json has no compressed-tensors quantization_config)")
    return cfg, qc


def _match_target(module: str, target: str) -> bool:
    # compressed_tensors.utils.match.match_name on names; "Linear" targets every packed module.
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target


def load_compressed_checkpoint(path: Union[str, os.PathLike], device: Any = "cpu") -> Dict[str, Union[QuantizedTensor, Tensor]]:
    """Read an NVFP4/MXFP4 compressed-tensors checkpoint (written by `export_checkpoint` or by
    compressed-tensors / llm-compressor) into aqn-rs objects.

    Args:
        path: the checkpoint folder (`config.json` with a compressed-tensors
            `quantization_config`, safetensors single or sharded).
        device: where to put the tensors.

    Returns:
        `{name: value}` in state-dict form: each packed Linear `X` gives `"X.weight"` ->
        `QuantizedTensor` (codes = `weight_packed`, scales = `weight_scale` bytes, NVFP4
        global_scale = `weight_global_scale` as a 0-d f32 tensor, dtype = the config's dtype,
        MXFP4 scale_mode as recorded by aqn-rs or None); every other tensor as stored.

    Raises:
        CheckpointError (a ValueError): not a compressed-tensors checkpoint, a scheme other
            than FP4 W4A16 (NVFP4 group 16 / MXFP4 group 32, symmetric), or a packed weight
            whose scales are missing or of the wrong shape.
        CheckpointNotFoundError (a FileNotFoundError): no config.json or no weights.
    """
    path = Path(path)
    cfg, qc = _read_quant_config(path)
    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        fmt = _format_of_args(g.get("weights"))
        if fmt is None or not g["weights"].get("symmetric", True):
            raise CheckpointError(
                f"config group {gname!r} is not an FP4 W4A16 scheme aqn-rs reads (NVFP4 tensor_group/16 "
                f"or MXFP4 group/32, 4-bit float, symmetric): {g.get('weights')}"
            )
        groups.append((fmt, list(g.get("targets") or ["Linear"])))
    if not groups:
        raise CheckpointError(f"{path}: quantization_config has no config_groups")
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    tag = _DTYPE_TAGS.get(_DTYPE_NAMES.get(str(dtype_name).removeprefix("torch."), torch.bfloat16), "bf16")

    tensors = FolderTensors(path, classes=False)
    out: Dict[str, Union[QuantizedTensor, Tensor]] = {}
    try:
        raw = {n: tensors.get(n).to(device) for n in tensors.names}
        scale_mode = tensors.metadata.get("aqn_rs.scale_mode")
    finally:
        tensors.close()
    consumed = set()
    for name in raw:
        if not name.endswith(".weight_packed"):
            continue
        mod = name[: -len(".weight_packed")]
        fmt = next((f for f, targets in groups if any(_match_target(mod, t) for t in targets)), None)
        if fmt is None:
            raise CheckpointError(f"{mod} has a weight_packed but matches no config group targets")
        codes = raw[name]
        scales = raw.get(f"{mod}.weight_scale")
        if scales is None:
            raise CheckpointError(f"{mod}.weight_scale is missing")
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise CheckpointError(f"{name} must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        shape = (codes.shape[0], codes.shape[1] * 2)
        block = _BLOCK[fmt]
        if tuple(scales.shape) != (shape[0], shape[1] // block):
            raise CheckpointError(f"{mod}.weight_scale has shape {tuple(scales.shape)}, expected {(shape[0], shape[1] // block)}")
        gs = None
        if fmt == "nvfp4":
            if scales.dtype != torch.float8_e4m3fn:
                scales = scales.float().to(torch.float8_e4m3fn)
            scales = scales.view(torch.uint8)
            g = raw.get(f"{mod}.weight_global_scale")
            if g is None:
                raise CheckpointError(f"{mod}.weight_global_scale is missing (NVFP4)")
            gs = g.float().reshape(-1)[0].clone()
            consumed.add(f"{mod}.weight_global_scale")
        elif scales.dtype != torch.uint8:  # float powers of two -> E8M0 bytes
            scales = (torch.floor(torch.log2(scales.float())).to(torch.int32) + 127).to(torch.uint8)
        consumed.update((name, f"{mod}.weight_scale"))
        out[f"{mod}.weight"] = QuantizedTensor(
            codes.contiguous(), scales.contiguous(), gs, shape, fmt, tag,
            scale_mode if fmt == "mxfp4" else None,
        )
    for name, t in raw.items():
        if name not in consumed:
            out[name] = t
    return out


def dequantize_checkpoint(
    path: Union[str, os.PathLike], dtype: Any = None, device: Any = "cpu"
) -> Dict[str, Tensor]:
    """Dense state dict of a compressed-tensors NVFP4/MXFP4 checkpoint.

    Args:
        path: the checkpoint folder.
        dtype: dtype of the dequantized weights (torch dtype or "bfloat16"/...); default the
            checkpoint's dtype from config.json. Other tensors keep their stored dtype.
        device: where to compute (CUDA uses the kernels).

    Returns:
        `{name: tensor}` with every `X.weight_packed/weight_scale/weight_global_scale` replaced
        by `X.weight` = `Quantizer.dequantize(...)`, equal to what compressed-tensors'
        decompressor gives in that dtype.
    """
    dt = _resolve_dtype(dtype)
    out: Dict[str, Tensor] = {}
    for name, v in load_compressed_checkpoint(path, device=device).items():
        if isinstance(v, QuantizedTensor):
            q = Nvfp4Quantizer() if v.format == "nvfp4" else Mxfp4Quantizer()
            out[name] = q.dequantize(v, dt)
        else:
            out[name] = v
    return out

