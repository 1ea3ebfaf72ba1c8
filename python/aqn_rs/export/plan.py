"""The plan of an export before anything is computed: which tensors are packed (alone or in a
fused group) and which copied, their output names, shapes and dtypes, the shards they go to, and
the report of what was written (`ExportReport`)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

# fused_weight_groups lives with the selection rules; `aqn_rs.export.fused_weight_groups` stays.
from ..selection import fused_weight_groups
from .formats import (
    _BLOCK,
    _DTYPE_NAMES,
    _QUANT_INPUT_DTYPES,
    _dense_dtype,
    _Out,
    _packed_outs,
    _selector,
)


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

