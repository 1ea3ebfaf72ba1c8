"""The packing in memory, for weight sync: `(name, tensor)` in, compressed-tensors names out,
on the tensors' device (`iter_packed`), and the Linear modules a model has (`linear_module_names`)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..constants import (
    DEFAULT_EXCLUDE,
    FUSED_GROUPS,
)

# fused_weight_groups lives with the selection rules; `aqn_rs.export.fused_weight_groups` stays.
from ..selection import fused_group_key
from .formats import (
    _BLOCK,
    _canonical,
    _check_format,
    _check_not_dtensor,
    _class_name,
    _dense,
    _group_amax,
    _pack_weight,
    _quantizer,
    _selector,
    _to_quant_input,
)
from .plan import _resolve_dtype


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

