"""Real FP4 checkpoints in the compressed-tensors format, which vLLM loads, and the way back.

* `export_checkpoint(model_or_path, out_dir, format="nvfp4"|"mxfp4", ...)` packs every selected
  Linear weight `X.weight` into `X.weight_packed` (uint8 `[out, in/2]`, element 2i in the low
  nibble), `X.weight_scale` (float8_e4m3fn `[out, in/16]` for NVFP4; E8M0 bytes as uint8
  `[out, in/32]` for MXFP4) and, for NVFP4, `X.weight_global_scale` (float32 `[1]`, the
  encode-direction scale: `d_block = e4m3(scale) / global_scale`). Every other tensor is copied
  (cast to `dtype`, bf16 by default). `config.json` gets the `quantization_config` that
  compressed-tensors 0.20 writes for its NVFP4A16 / MXFP4A16 presets; tokenizer and other files
  are copied. Output goes to a temporary folder next to `out_dir` that is renamed at the end,
  so a failed export leaves nothing behind.
* `load_compressed_checkpoint(path)` reads such a checkpoint (ours or one that compressed-tensors
  wrote) into `QuantizedTensor`s; `dequantize_checkpoint(path)` gives dense tensors.
* `iter_packed(named_tensors, format)` does the packing in memory for weight sync: `(name,
  tensor)` in, compressed-tensors names out, on the tensors' device.

Names, shapes and dtypes are those of compressed-tensors 0.20's `NVFP4PackedCompressor` /
`MXFP4PackedCompressor` and of vLLM's `CompressedTensorsW4A16Fp4` / `CompressedTensorsW4A16Mxfp4`
schemes (docs/EXPORT.md says which versions were checked). The codes, block scales and global
scale written are exactly those `Nvfp4Quantizer` / `Mxfp4Quantizer` compute, so the weights
vLLM (and compressed-tensors' decompressor) reconstruct equal our `fake_quant` bit for bit.

vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` and keeps ONE NVFP4 global scale
per fused layer (it takes the max of the shards' scales), so the shards must share it, as
llm-compressor's `update_fused_layer_weight_global_scales` makes them do. With
`fuse_global_scales=True` (the default) the members of such a group are quantized with their
common amax (`max` of the members' amax, whose global scale is the `min` of theirs); the matching
training-side fake quant is `fake_quant(w, amax=group_amax)` (see `fused_weight_groups`).

Memory: a folder is read one tensor (or one fused group) at a time through safetensors'
`safe_open`, and shards are written by a streaming safetensors writer, so the host holds about
one tensor at a time, never a whole shard.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._aqn_rs import __version__
from .constants import (
    BLOCK_SIZES,
    DEFAULT_EXCLUDE,
    DTYPE_TAGS,
    FORMATS,
    FUSED_GROUPS,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    SAFETENSORS_DTYPES,
    SCALE_MODES,
)
from .quantizers import (
    Mxfp4Quantizer,
    Nvfp4Quantizer,
    QuantizedTensor,
)

# fused_weight_groups lives with the selection rules; `aqn_rs.export.fused_weight_groups` stays.
from .selection import ModuleSelector, canonical_name, class_name_of, fused_group_key, fused_weight_groups

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


# ---------------------------------------------------------------------------------------------
# Module selection
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Formats, quantizers and the compressed-tensors config
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Tensor sources: an in-memory model or a safetensors folder, one tensor at a time
# ---------------------------------------------------------------------------------------------


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


class _FolderTensors:
    """Tensors of a safetensors checkpoint folder (single file or sharded with an index), read
    lazily one at a time. With `classes=True` the module classes come from the model
    transformers builds on the meta device (see `_module_classes_of_folder`)."""

    def __init__(self, folder: Path, classes: bool = True) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            if any(folder.glob("*.bin")):
                raise ValueError(
                    f"{folder} holds PyTorch .bin weights; only safetensors checkpoints are read "
                    "(load the model with transformers and pass it in memory, or re-save it with "
                    "save_pretrained(..., safe_serialization=True))"
                )
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        self._handles: Dict[str, Any] = {}
        self._file_of: Dict[str, str] = {}
        self.names: List[str] = []
        self.metadata: Dict[str, str] = {}  # the first shard's __metadata__
        for f in files:
            h = safe_open(str(folder / f), framework="pt", device="cpu")
            self._handles[f] = h
            if not self.metadata:
                self.metadata = dict(h.metadata() or {})
            for name in h.keys():
                if name not in self._file_of:
                    self._file_of[name] = f
                    self.names.append(name)
        self.classes = _module_classes_of_folder(folder, self) if classes else {}

    def meta(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        sl = self._handles[self._file_of[name]].get_slice(name)
        dt = sl.get_dtype()
        if dt not in _ST_TORCH:
            raise ValueError(f"{name}: unsupported safetensors dtype {dt}")
        return _ST_TORCH[dt], tuple(sl.get_shape())

    def get(self, name: str) -> Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _module_classes_of_folder(folder: Path, tensors: _FolderTensors) -> Dict[str, str]:
    """Module name -> class name, from the model transformers builds on the meta device from
    `config.json` (no weights are allocated). Falls back to treating every 2-D `.weight` whose
    module name does not look like an embedding or a norm as a Linear, with a warning."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}; vLLM needs one next to the weights")
    cfg = json.loads(config_path.read_text())
    if "quantization_config" in cfg or "compression_config" in cfg:
        raise ValueError(
            f"{folder} is already a quantized checkpoint (its config.json has a "
            "quantization_config); export from the dense model, or read it with "
            "aqn_rs.export.load_compressed_checkpoint / dequantize_checkpoint"
        )
    weights = {n.rpartition(".")[0] for n in tensors.names if n.endswith(".weight")}
    classes: Dict[str, str] = {}
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
        classes = {n: _class_name(m) for n, m in model.named_modules() if n}
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to the name heuristic
        reason = f"{type(e).__name__}: {e}"
    else:
        if any(n in weights and classes[n].endswith("Linear") for n in classes):
            return classes
        reason = "its module names do not match the checkpoint's tensor names"
    warnings.warn(
        f"could not build the model of {folder} on the meta device ({reason}); treating every 2-D "
        "'.weight' whose module name has no 'embed', 'norm', 'wte' or 'wpe' in it as a Linear layer",
        stacklevel=3,
    )
    for n in tensors.names:
        mod, _, leaf = n.rpartition(".")
        low = mod.lower()
        if leaf == "weight" and len(tensors.meta(n)[1]) == 2 and not any(
            k in low for k in ("embed", "norm", "wte", "wpe")
        ):
            classes[mod] = "Linear"
    return classes


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------


def _write_bytes(f, t: Tensor) -> None:
    """Write the raw bytes of `t` (moved to the CPU if needed). The bytes are read through the
    data pointer, not `Tensor.numpy()`, which would mark a model parameter's storage
    non-resizable for good (breaking FSDP2, see quantizers._rs_view)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    n = t.numel() * t.element_size()
    if n:
        f.write(memoryview((ctypes.c_char * n).from_address(t.data_ptr())))


class _ShardWriter:
    """Writes one safetensors file whose header is known up front, tensor by tensor in header
    order: 8-byte little-endian header length, the JSON header (padded with spaces to a multiple
    of 8, as safetensors does), then the data."""

    def __init__(self, path: Path, outs: Sequence[_Out], metadata: Mapping[str, str]) -> None:
        header: Dict[str, Any] = {"__metadata__": dict(metadata)}
        off = 0
        for o in outs:
            header[o.name] = {"dtype": _ST_DTYPES[o.dtype], "shape": list(o.shape), "data_offsets": [off, off + o.nbytes]}
            off += o.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self.path = path
        self._outs = list(outs)
        self._i = 0
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)

    @property
    def full(self) -> bool:
        return self._i == len(self._outs)

    def write(self, name: str, t: Tensor) -> None:
        o = self._outs[self._i]
        if name != o.name or t.dtype != o.dtype or tuple(t.shape) != o.shape:
            raise RuntimeError(
                f"internal error: expected {o.name} {o.dtype} {o.shape}, got {name} {t.dtype} {tuple(t.shape)}"
            )
        _write_bytes(self._f, t)
        self._i += 1

    def close(self) -> None:
        self._f.close()


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MB", "2GiB" (2^30), "100KB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad max_shard_size {size!r}; expected bytes or a size like '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Unit:
    """Input tensors processed together: one dense tensor, or a weight (or fused group of
    weights) packed together."""

    kind: str  # "dense" | "pack"
    inputs: List[str]
    outs: List[_Out]


@dataclasses.dataclass
class ExportReport:
    """What `export_checkpoint` wrote (the CLI prints it)."""

    path: Path
    format: str
    scale_mode: Optional[str]
    packed: List[str]
    ignore: List[str]
    fused_groups: List[Tuple[str, ...]]
    shards: List[str]
    packed_bytes: int
    dense_bytes: int
    seconds_quantize: float  # reading + casting + quantizing the packed weights (device synced)
    seconds_write: float  # device-to-host copies and file writes of every output tensor
    seconds_total: float

    def format_summary(self) -> str:
        mode = f" (scale mode {self.scale_mode})" if self.format == "mxfp4" else ""
        return (
            f"wrote {self.path}: {self.format}{mode}, {len(self.packed)} Linear weights packed "
            f"({_human(self.packed_bytes)}), {_human(self.dense_bytes)} dense, "
            f"{len(self.shards)} shard(s); ignore list: {len(self.ignore)} module(s)"
            + (f"; {len(self.fused_groups)} fused groups share a global scale" if self.fused_groups else "")
            + f"; quantize {self.seconds_quantize:.2f} s, write {self.seconds_write:.2f} s, "
            f"total {self.seconds_total:.2f} s"
        )


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _plan(tensors, format: str, selector, fuse: bool, dtype: Optional[torch.dtype]):
    """Decide, before anything is written, what every output tensor is. Returns (units,
    packed module names, ignore list, fused groups)."""
    linear_sel = _selector(None, (), ("linear",))
    block = _BLOCK[format]
    weights = {n.rpartition(".")[0]: n for n in tensors.names if n.endswith(".weight")}
    # Linear modules in module order; those without a 2-D weight tensor of their own (a tied
    # lm_head) cannot be packed but are listed in `ignore`, as compressed-tensors lists every
    # unquantized Linear.
    linear: List[str] = [m for m, cls in tensors.classes.items() if linear_sel.decide(m, cls)[0]]
    with_weight = {m for m in linear if m in weights and len(tensors.meta(weights[m])[1]) == 2}
    if not with_weight:
        raise ValueError(
            "the model has no Linear layer with a 2-D weight, so there is nothing to export in FP4 "
            f"(module classes seen: {sorted(set(tensors.classes.values()))[:12]})"
        )
    packed, ignore, unaligned = [], [], []
    for mod in linear:
        if mod not in with_weight or not selector.decide(mod, tensors.classes[mod])[0]:
            ignore.append(mod)
        elif tensors.meta(weights[mod])[1][1] % block:
            unaligned.append(mod)
            ignore.append(mod)
        else:
            packed.append(mod)
    if unaligned:
        warnings.warn(
            f"{len(unaligned)} Linear layer(s) have in_features not a multiple of the {format} block "
            f"({block}); compressed-tensors and vLLM need whole blocks, so they stay dense and go "
            f"to the ignore list: {unaligned[:8]}",
            stacklevel=3,
        )
    if not packed:
        raise ValueError(
            f"no Linear layer is selected for {format} export: all {len(with_weight)} are excluded "
            f"or have in_features that are not whole {block}-blocks (e.g. {ignore[:4]}); check "
            "exclude/include"
        )
    # vLLM loads each fused layer (qkv_proj, gate_up_proj) with one scheme: all shards packed or
    # all dense.
    packed_set = set(packed)
    for group in fused_weight_groups(linear):
        state = {m in packed_set for m in group}
        if len(state) > 1:
            raise ValueError(
                f"fused group {list(group)} is partly quantized ({[m for m in group if m in packed_set]} "
                f"packed, the rest not); vLLM fuses these into one layer with one scheme, so exclude "
                "all of them or none (e.g. exclude='re:.*self_attn\\.[qkv]_proj$')"
            )
    groups = fused_weight_groups(packed) if (fuse and format == "nvfp4") else []
    group_of = {m: g for g in groups for m in g}

    units: List[_Unit] = []
    done = set()
    for name in tensors.names:
        if name in done:
            continue
        mod = name.rpartition(".")[0]
        if name.endswith(".weight") and mod in packed_set:
            members = group_of.get(mod, (mod,))
            ins = [weights[m] for m in members]
            outs = [o for m in members for o in _packed_outs(format, m, tensors.meta(weights[m])[1])]
            units.append(_Unit("pack", ins, outs))
            done.update(ins)
        else:
            src_dtype, shape = tensors.meta(name)
            units.append(_Unit("dense", [name], [_Out(name, _dense_dtype(src_dtype, dtype), shape)]))
            done.add(name)
    return units, packed, ignore, groups


def _shard(outs: Sequence[_Out], max_bytes: int) -> List[List[_Out]]:
    shards: List[List[_Out]] = [[]]
    size = 0
    for o in outs:
        if shards[-1] and size + o.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return shards


def _resolve_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype is None or dtype == "keep":
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_NAMES)} or 'keep'")
        return _DTYPE_NAMES[dtype]
    if dtype not in _QUANT_INPUT_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16, torch.float32 or None, got {dtype}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPE_NAMES.items()}[dtype]


def export_checkpoint(
    model_or_path: Union[torch.nn.Module, str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    format: str = "nvfp4",
    scale_mode: Optional[str] = "floor",
    exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE,
    include: Optional[Sequence[str]] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    *,
    tokenizer: Any = None,
    dtype: Any = torch.bfloat16,
    fuse_global_scales: bool = True,
    device: Any = None,
) -> Path:
    """Write a packed FP4 checkpoint in the compressed-tensors format, loadable by vLLM.

    Args:
        model_or_path: a transformers model in memory (an `nn.Module` with `.config`; CPU or
            CUDA, unsharded) or a checkpoint folder (safetensors, single or sharded with an
            index, plus `config.json`); a folder is read one tensor at a time.
        out_dir: the folder to create. It is written as a temporary sibling folder and renamed
            at the end; on any error nothing is left behind.
        format: "nvfp4" (E4M3 block scales of 16 + f32 global scale; vLLM's
            `CompressedTensorsW4A16Fp4`, Marlin on Hopper) or "mxfp4" (E8M0 block scales of 32;
            `CompressedTensorsW4A16Mxfp4`).
        scale_mode: MXFP4 scale mode ("floor", "rceil", "even", "ceil"); must stay "floor"
            (or None) for NVFP4. The scales are stored as bytes, so vLLM serves any mode.
        exclude: module patterns kept dense (exact dotted-suffix names, shell globs, `re:`
            regexes); they are listed in the config's `ignore`. Default: lm_head, embed_tokens.
        include: if given, only Linear modules matching one of these patterns are packed.
        max_shard_size: bytes per safetensors shard (int, or "5GB", "500MB", "2GiB"); one shard
            is written as `model.safetensors`, several with `model.safetensors.index.json`.
        overwrite: replace an existing `out_dir` (only once the new checkpoint is complete).
        tokenizer: optional tokenizer to save alongside (in-memory model).
        dtype: dtype of everything that is not packed, and the dtype weights are cast to before
            they are quantized (bf16 by default: verl's FSDP actor computes, and fake-quantizes,
            in bf16). None keeps each tensor's own dtype.
        fuse_global_scales: NVFP4: quantize q/k/v and gate/up (and MLA q_a/kv_a) with their
            common amax so that each vLLM-fused layer has one global scale (vLLM requires it).
        device: where to quantize ("cuda" to use the GPU for a folder or a CPU model); default:
            where each tensor is.

    Returns:
        The path of the written checkpoint.

    Raises:
        ValueError: unknown format or scale mode, no Linear layer to pack, a fused group only
            partly excluded, an already quantized input folder, `out_dir` equal to the input.
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    return _export(model_or_path, out_dir, format, scale_mode, exclude, include, max_shard_size,
                   overwrite, tokenizer, dtype, fuse_global_scales, device).path


def _export(model_or_path, out_dir, format, scale_mode, exclude, include, max_shard_size, overwrite,
            tokenizer, dtype, fuse_global_scales, device) -> ExportReport:
    t_start = time.perf_counter()
    format, scale_mode = _check_format(format, scale_mode)
    dtype = _resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; export needs a little-endian host")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")

    if isinstance(model_or_path, torch.nn.Module):
        if getattr(model_or_path, "config", None) is None:
            raise TypeError("the model has no .config; export needs a transformers model (vLLM reads config.json)")
        tensors: Any = _ModelTensors(model_or_path)
        src_folder = None
    elif isinstance(model_or_path, (str, os.PathLike)):
        src_folder = Path(model_or_path).absolute()
        if not src_folder.is_dir():
            raise FileNotFoundError(f"{src_folder} is not a folder")
        if src_folder.resolve() == out_dir.resolve():
            raise ValueError("out_dir is the input folder; export to a new folder")
        tensors = _FolderTensors(src_folder)
    else:
        raise TypeError(f"model_or_path must be an nn.Module or a folder path, got {type(model_or_path).__name__}")

    try:
        selector = _selector(include, exclude)
        units, packed, ignore, groups = _plan(tensors, format, selector, fuse_global_scales, dtype)
        outs = [o for u in units for o in u.outs]
        shards = _shard(outs, max_bytes)
        n = len(shards)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        metadata = {"format": "pt", "aqn_rs.version": __version__, "aqn_rs.format": format}
        if format == "mxfp4":
            metadata["aqn_rs.scale_mode"] = scale_mode

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.aqn-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except BaseException:
        tensors.close()
        raise
    try:
        q = _quantizer(format, scale_mode)
        t_quant = t_write = 0.0
        writers = iter([(files[i], shards[i]) for i in range(n)])
        w: Optional[_ShardWriter] = None
        for unit in units:
            if unit.kind == "dense":
                results = [(unit.outs[0].name, _dense(tensors.get(unit.inputs[0]), dtype))]
            else:
                t0 = time.perf_counter()
                ws = [_to_quant_input(tensors.get(name), dtype, device) for name in unit.inputs]
                amax = _group_amax(q, ws) if len(ws) > 1 else None
                results = []
                for name, wt in zip(unit.inputs, ws):
                    mod = name.rpartition(".")[0]
                    results += [(f"{mod}.{suffix}", t) for suffix, t in _pack_weight(q, wt, amax)]
                if ws and ws[0].is_cuda:
                    torch.cuda.synchronize(ws[0].device)
                t_quant += time.perf_counter() - t0
            t0 = time.perf_counter()
            for name, t in results:
                if w is None or w.full:
                    if w is not None:
                        w.close()
                    fname, souts = next(writers)
                    w = _ShardWriter(tmp / fname, souts, metadata)
                w.write(name, t)
            t_write += time.perf_counter() - t0
        if w is not None:
            w.close()
        if n > 1:
            weight_map = {o.name: files[i] for i in range(n) for o in shards[i]}
            index = {"metadata": {"total_size": sum(o.nbytes for o in outs)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        # config.json, tokenizer, generation config and the rest.
        if src_folder is not None:
            _copy_other_files(src_folder, tmp)
            config = json.loads((src_folder / "config.json").read_text())
        else:
            model = model_or_path
            model.config.save_pretrained(str(tmp))
            config = json.loads((tmp / "config.json").read_text())
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                try:
                    gen.save_pretrained(str(tmp))
                except Exception as e:  # noqa: BLE001 - a bad generation config must not lose the export
                    warnings.warn(f"generation_config not saved: {e}", stacklevel=3)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        config["quantization_config"] = quantization_config(format, ignore)
        if dtype is not None:
            config["dtype"] = _dtype_name(dtype)
            if "torch_dtype" in config:
                config["torch_dtype"] = _dtype_name(dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        # Publish: move an old out_dir aside only now that the new one is complete.
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.aqn-old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        tensors.close()

    packed_names = {o.name for u in units if u.kind == "pack" for o in u.outs}
    return ExportReport(
        path=out_dir,
        format=format,
        scale_mode=scale_mode if format == "mxfp4" else None,
        packed=packed,
        ignore=ignore,
        fused_groups=groups,
        shards=files,
        packed_bytes=sum(o.nbytes for o in outs if o.name in packed_names),
        dense_bytes=sum(o.nbytes for o in outs if o.name not in packed_names),
        seconds_quantize=t_quant,
        seconds_write=t_write,
        seconds_total=time.perf_counter() - t_start,
    )


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copy every non-weight file (tokenizer, generation config, chat template, code, ...)."""
    for root, dirs, fnames in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for fname in fnames:
            if fname.startswith(".") or (fname == "config.json" and Path(root) == src):
                continue
            if fname.endswith(_WEIGHT_FILE_SUFFIXES):
                continue
            rel = Path(root).relative_to(src) / fname
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / fname, dst / rel)


# ---------------------------------------------------------------------------------------------
# In-memory packing for weight sync
# ---------------------------------------------------------------------------------------------


def iter_packed(
    named_tensors: Iterable[Tuple[str, Tensor]],
    format: str = "nvfp4",
    *,
    scale_mode: Optional[str] = "floor",
    exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE,
    include: Optional[Sequence[str]] = None,
    linear_modules: Optional[Iterable[str]] = None,
    fuse_global_scales: bool = True,
    dtype: Any = None,
) -> Iterator[Tuple[str, Tensor]]:
    """Pack a stream of weights for weight sync (e.g. verl's `(name, tensor)` generator into
    vLLM's `load_weights`), with the names and layouts `export_checkpoint` writes.

    Args:
        named_tensors: `(name, tensor)` pairs (full tensors, CPU or CUDA).
        format, scale_mode, exclude, include, fuse_global_scales: as for `export_checkpoint`.
        linear_modules: names of the Linear modules (e.g. `linear_module_names(model)`). If
            None, every 2-D floating `X.weight` is taken for a Linear weight (embeddings are
            kept dense by the default `exclude`).
        dtype: cast every floating tensor to this dtype first (None: keep).

    Yields:
        For each selected Linear weight `X.weight`: `X.weight_packed`, `X.weight_scale` and
        (NVFP4) `X.weight_global_scale`, on the input's device; every other tensor unchanged
        (cast to `dtype` if given). With fused global scales, the members of a q/k/v or gate/up
        group are held back until the whole group has arrived (state dicts list them next to
        each other), so the group is packed with one amax; an incomplete group is flushed at
        the end of the stream.
    """
    format, scale_mode = _check_format(format, scale_mode)
    dtype = _resolve_dtype(dtype)
    q = _quantizer(format, scale_mode)
    sel = _selector(include, exclude)
    linear = None if linear_modules is None else {_canonical(n) for n in linear_modules}
    block = _BLOCK[format]
    fuse = fuse_global_scales and format == "nvfp4"
    pending: Dict[Tuple[str, int], Dict[str, Tensor]] = {}

    def pack(members: Mapping[str, Tensor]) -> Iterator[Tuple[str, Tensor]]:
        ws = {m: _to_quant_input(w, dtype, None) for m, w in members.items()}
        amax = _group_amax(q, list(ws.values())) if len(ws) > 1 else None
        for m, w in ws.items():
            for suffix, t in _pack_weight(q, w, amax):
                yield f"{m}.{suffix}", t

    for name, t in named_tensors:
        _check_not_dtensor(name, t)
        name = _canonical(name)
        mod, _, leaf = name.rpartition(".")
        is_linear = (mod in linear) if linear is not None else (t.dim() == 2 and t.is_floating_point())
        if (leaf == "weight" and is_linear and t.dim() == 2 and t.shape[-1] % block == 0
                and sel.decide(mod, "Linear")[0]):
            key = fused_group_key(mod) if fuse else None
            if key is None:
                yield from pack({mod: t})
                continue
            group = pending.setdefault(key, {})
            group[mod] = t
            expected = {f"{key[0]}.{leaf}" if key[0] else leaf for leaf in FUSED_GROUPS[key[1]]}
            if set(group) >= expected:
                yield from pack(pending.pop(key))
            continue
        yield name, _dense(t, dtype)
    for group in pending.values():
        yield from pack(group)


def linear_module_names(model: torch.nn.Module) -> List[str]:
    """Names (wrapper components removed) of the modules the selector counts as Linear, for
    `iter_packed(..., linear_modules=...)`."""
    sel = _selector(None, (), ("linear",))
    return [_canonical(n) for n, m in model.named_modules() if n and sel.decide(n, _class_name(m))[0]]


# ---------------------------------------------------------------------------------------------
# Reading compressed-tensors checkpoints
# ---------------------------------------------------------------------------------------------


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
        raise FileNotFoundError(f"no config.json in {path}")
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config") or cfg.get("compression_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path} is not a compressed-tensors checkpoint (config.json has no compressed-tensors quantization_config)")
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
        ValueError: not a compressed-tensors checkpoint, or a scheme other than FP4 W4A16
            (NVFP4 group 16 / MXFP4 group 32, symmetric).
    """
    path = Path(path)
    cfg, qc = _read_quant_config(path)
    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        fmt = _format_of_args(g.get("weights"))
        if fmt is None or not g["weights"].get("symmetric", True):
            raise ValueError(
                f"config group {gname!r} is not an FP4 W4A16 scheme aqn-rs reads (NVFP4 tensor_group/16 "
                f"or MXFP4 group/32, 4-bit float, symmetric): {g.get('weights')}"
            )
        groups.append((fmt, list(g.get("targets") or ["Linear"])))
    if not groups:
        raise ValueError(f"{path}: quantization_config has no config_groups")
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    tag = _DTYPE_TAGS.get(_DTYPE_NAMES.get(str(dtype_name).removeprefix("torch."), torch.bfloat16), "bf16")

    tensors = _FolderTensors(path, classes=False)
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
            raise ValueError(f"{mod} has a weight_packed but matches no config group targets")
        codes = raw[name]
        scales = raw.get(f"{mod}.weight_scale")
        if scales is None:
            raise ValueError(f"{mod}.weight_scale is missing")
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise ValueError(f"{name} must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        shape = (codes.shape[0], codes.shape[1] * 2)
        block = _BLOCK[fmt]
        if tuple(scales.shape) != (shape[0], shape[1] // block):
            raise ValueError(f"{mod}.weight_scale has shape {tuple(scales.shape)}, expected {(shape[0], shape[1] // block)}")
        gs = None
        if fmt == "nvfp4":
            if scales.dtype != torch.float8_e4m3fn:
                scales = scales.float().to(torch.float8_e4m3fn)
            scales = scales.view(torch.uint8)
            g = raw.get(f"{mod}.weight_global_scale")
            if g is None:
                raise ValueError(f"{mod}.weight_global_scale is missing (NVFP4)")
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


# ---------------------------------------------------------------------------------------------
# Command line (wired into `aqn-rs` by cli.py)
# ---------------------------------------------------------------------------------------------


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the `export` subcommand to an `argparse` subparsers object; `run_cli` runs it."""
    p = subparsers.add_parser(
        "export",
        help="write a packed FP4 checkpoint (compressed-tensors format) that vLLM loads",
        description=(
            "Pack the Linear weights of a safetensors checkpoint folder into NVFP4 or MXFP4 "
            "(compressed-tensors nvfp4-pack-quantized / mxfp4-pack-quantized), copy the rest "
            "(bf16 by default) and the tokenizer, and write config.json's quantization_config. "
            "Serve the result with `vllm serve OUT_DIR`."
        ),
    )
    p.add_argument("model", help="checkpoint folder (config.json + *.safetensors)")
    p.add_argument("out_dir", help="folder to create")
    p.add_argument("--format", choices=FORMATS, default="nvfp4")
    p.add_argument("--scale-mode", choices=SCALE_MODES, default=None, help="MXFP4 scale mode (default floor)")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE), metavar="PATTERN",
                   help="modules kept dense: names, globs, re:regex (default: lm_head embed_tokens)")
    p.add_argument("--include", nargs="*", default=None, metavar="PATTERN",
                   help="pack only Linear modules matching these patterns")
    p.add_argument("--max-shard-size", default="5GB", help="bytes per shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--dtype", choices=sorted(_DTYPE_NAMES) + ["keep"], default="bfloat16",
                   help="dtype of unpacked tensors and of weights before quantization (default bfloat16)")
    p.add_argument("--no-fuse-global-scales", action="store_true",
                   help="NVFP4: one global scale per tensor even for q/k/v and gate/up (vLLM needs them fused)")
    p.add_argument("--device", default=None, help="quantize on this device, e.g. cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run `aqn-rs export` from parsed arguments; returns the exit status."""
    try:
        report = _export(
            args.model, args.out_dir, args.format, args.scale_mode, args.exclude, args.include,
            args.max_shard_size, args.overwrite, None, args.dtype, not args.no_fuse_global_scales,
            args.device,
        )
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"aqn-rs export: error: {e}", file=sys.stderr)
        return 2
    print(report.format_summary())
    return 0


__all__ = [
    "CT_FORMATS",
    "CT_VERSION",
    "DEFAULT_EXCLUDE",
    "FORMATS",
    "FUSED_GROUPS",
    "ExportReport",
    "add_cli",
    "dequantize_checkpoint",
    "export_checkpoint",
    "fused_weight_groups",
    "iter_packed",
    "linear_module_names",
    "load_compressed_checkpoint",
    "parse_size",
    "quantization_config",
    "run_cli",
]
