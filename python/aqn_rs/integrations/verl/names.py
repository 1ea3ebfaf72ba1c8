"""Module names across the actor's HF model and the rollout's vLLM model: which Linear modules
get fake quant (`select_linear`, an exclusion of vLLM's fused name counts), and how the rows and
columns of a vLLM weight (fused q/k/v or gate/up, a tensor-parallel shard) map onto the unfused
HF weights whose noise the actor draws (`vllm_layout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

from ...constants import VLLM_FUSED
from ...errors import VerlPluginError
from ...selection import ModuleSelector, class_name_of, is_adapter, normalize_name, vllm_alias


def select_linear(model: Any, exclude: Sequence[str], include: Optional[Sequence[str]]) -> List[str]:
    """Names of the `nn.Linear` modules of `model` that get fake quant.

    A module is selected when the selector (layer type linear, `exclude`, `include`) selects it
    under its own name, unless an `exclude` pattern matches the vLLM module it is fused into
    (`*.qkv_proj` excludes q/k/v_proj); with `include`, a match on either name includes it.
    """
    import torch

    sel = ModuleSelector(include=include, exclude=tuple(exclude), layer_types=("linear",))
    out = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, torch.nn.Linear) or is_adapter(name):
            continue
        cls = class_name_of(module)
        key = normalize_name(name)
        ok, rule = sel.decide(key, cls)
        alias = vllm_alias(key)
        if alias is not None:
            ok_alias, rule_alias = sel.decide(alias, cls)
            if ok and not ok_alias and rule_alias.startswith("exclude"):
                ok = False
            elif not ok and rule == "not-included" and ok_alias:
                ok = True
        if ok:
            out.append(name)
    return out


@dataclasses.dataclass
class _Layout:
    """How a vLLM weight's local rows/columns map onto the unfused weights the actor noises:
    `rows` = (member name, first global row, number of rows) in local row order; `cols` =
    (first global column, number) for a column-sharded (row-parallel) weight, else None;
    `full_cols` = the unfused weight's column count."""

    rows: List[Tuple[str, int, int]]
    cols: Optional[Tuple[int, int]]
    full_cols: int


def vllm_layout(name: str, module: Any, weight: Any) -> Optional[_Layout]:
    """The layout of a vLLM Linear weight when it differs from one whole unfused weight:
    a fused `qkv_proj` / `gate_up_proj` (vLLM's `output_partition_sizes`, with `tp_rank`,
    `num_kv_head_replicas` for QKV), or a tensor-parallel shard (`tp_size` > 1). None for a
    plain weight (its noise is drawn as a whole under its own name)."""
    if weight.dim() != 2:
        return None
    rows, cols = int(weight.shape[0]), int(weight.shape[1])
    parent, _, leaf = name.rpartition(".")
    tp_rank = int(getattr(module, "tp_rank", 0) or 0)
    tp_size = int(getattr(module, "tp_size", 1) or 1)
    members = VLLM_FUSED.get(leaf)
    if members is not None:
        sizes = [int(s) for s in (getattr(module, "output_partition_sizes", None) or [])]
        if len(sizes) != len(members) or sum(sizes) != rows:
            raise VerlPluginError(
                f"vLLM module {name} ({type(module).__name__}): cannot map its {rows} rows onto "
                f"{'/'.join(members)} (output_partition_sizes={sizes or None})"
            )
        if hasattr(module, "num_kv_head_replicas"):  # QKVParallelLinear: k/v heads may be replicated
            rep = max(int(module.num_kv_head_replicas), 1)
            starts = [tp_rank * sizes[0]] + [(tp_rank // rep) * s for s in sizes[1:]]
        else:
            starts = [tp_rank * s for s in sizes]
        full = [f"{parent}.{m}" if parent else m for m in members]
        return _Layout(list(zip(full, starts, sizes)), None, cols)
    if tp_size <= 1:
        return None
    in_size = getattr(module, "input_size", None)
    out_size = getattr(module, "output_size", None)
    if in_size is not None and int(in_size) != cols:  # RowParallelLinear: columns sharded
        return _Layout([(name, 0, rows)], (tp_rank * cols, cols), int(in_size))
    if out_size is not None and int(out_size) != rows:  # ColumnParallelLinear: rows sharded
        return _Layout([(name, tp_rank * rows, rows)], None, cols)
    return None
