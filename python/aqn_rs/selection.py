"""Module selection: which modules of a model are quantized or noised, by the rules stated
below.

The decision itself is made in Rust (`ModuleSelector`, from `aqn_core::selector`) on a module's
qualified name and class name, so transformers and vLLM models are handled alike and no model
library is imported. This file adds the torch-side walk over ``model.named_modules()``.

Patterns (``include`` / ``exclude``):

- ``lm_head``, ``mlp.down_proj`` -- an exact name: it must equal a whole dotted suffix of the
  module name (``lm_head`` matches ``lm_head`` and ``model.lm_head``, not ``my_lm_head``).
  Note: verl's plain ``ignore_patterns`` entries are substring matches (``pattern in name``);
  ours are dotted suffixes, so ``mlp`` does not exclude ``model.layers.0.mlp.gate_proj``
  (write ``*.mlp.*`` for that).
- ``*.mlp.gate``, ``model.layers.[0-3].*`` -- a shell glob with Python ``fnmatch.fnmatchcase``
  semantics, matched against the whole name: ``*`` crosses dots, ``?`` is one character,
  ``[seq]`` / ``[!seq]`` are sets, there is no escaping.
- ``re:.*mlp\\.gate$`` -- a regular expression in Rust ``regex`` syntax (like Python's ``re``
  without look-around or back-references), matched like verl's ``ignore_patterns``
  (``re.match``: anchored at the start of the name, not at the end).

Decision order: a module whose class is not of one of ``layer_types`` is not selected (rule
``type:<class>``); then the first matching ``exclude`` pattern rejects it (``exclude:<pat>``);
then, with ``include`` given, the first matching include pattern selects it
(``include:<pat>``) and no match rejects it (``not-included``); with ``include=None`` every
remaining module is selected (``default``).

Layer types, by class name: ``linear`` (``Linear`` and every class ending in ``Linear``: vLLM's
parallel linears, verl's ``QATLinear``, ...; and vLLM's ``ParallelLMHead``), ``rmsnorm`` (class
name ends in ``RMSNorm``: vLLM's ``RMSNorm``, ``Qwen2RMSNorm``, ``LlamaRMSNorm``, ...),
``embedding`` (ends in ``Embedding`` but not ``RotaryEmbedding``). The class name used is the
first one along the module's MRO that has a layer type, so FSDP2's ``FSDPLinear`` and
subclasses of ``nn.Linear`` with other names count as ``linear``.

Names are canonicalized first: the wrapper components ``_fsdp_wrapped_module``,
``_checkpoint_wrapped_module`` and ``_orig_mod`` are dropped.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

from ._aqn_rs import LAYER_TYPES, ModuleSelector
from .constants import DEFAULT_EXCLUDE, FUSED_GROUPS, VLLM_FUSED

__all__ = [
    "DEFAULT_EXCLUDE",
    "LAYER_TYPES",
    "ModuleSelector",
    "SelectionRow",
    "canonical_name",
    "fused_group_key",
    "is_adapter",
    "normalize_name",
    "vllm_alias",
    "fused_weight_groups",
    "class_name_of",
    "iter_selected",
    "layer_type_of",
    "selection_rows",
]


class SelectionRow(NamedTuple):
    """One module's decision, for summaries."""

    name: str
    class_name: str
    layer_type: Optional[str]
    selected: bool
    rule: str


def canonical_name(name: str) -> str:
    """`name` without torch's wrapper components (see the module docstring)."""
    return ModuleSelector.canonical_name(name)


def class_name_of(module: Any) -> str:
    """The class name a selector should see for `module`: the first class along its MRO
    whose name has a layer type (so ``FSDPLinear`` -> ``FSDPLinear``, a ``class Proj(nn.Linear)``
    -> ``Linear``), else the module's own class name."""
    for cls in type(module).__mro__:
        if ModuleSelector.layer_type(cls.__name__) is not None:
            return cls.__name__
    return type(module).__name__


def layer_type_of(module: Any) -> Optional[str]:
    """``"linear"``, ``"rmsnorm"``, ``"embedding"`` or ``None`` for a module."""
    return ModuleSelector.layer_type(class_name_of(module))


def _as_selector(selector: Any) -> ModuleSelector:
    if isinstance(selector, ModuleSelector):
        return selector
    if isinstance(selector, dict):
        return ModuleSelector(**selector)
    raise TypeError(f"expected a ModuleSelector or a dict of its arguments, got {type(selector).__name__}")


def selection_rows(model: Any, selector: Any) -> List[SelectionRow]:
    """One row per module of ``model.named_modules()`` (the root, named ``""``, included):
    name, class name, layer type, whether selected, and the deciding rule."""
    sel = _as_selector(selector)
    rows = []
    for name, module in model.named_modules():
        cls = class_name_of(module)
        selected, rule = sel.decide(name, cls)
        rows.append(SelectionRow(name, cls, ModuleSelector.layer_type(cls), selected, rule))
    return rows


def iter_selected(model: Any, selector: Any) -> Iterator[Tuple[str, Any, str]]:
    """``(name, module, rule)`` for every selected module of ``model``, in module order."""
    sel = _as_selector(selector)
    for name, module in model.named_modules():
        selected, rule = sel.decide(name, class_name_of(module))
        if selected:
            yield name, module, rule


def fused_weight_groups(module_names: Iterable[str]) -> List[Tuple[str, ...]]:
    """The groups of Linear modules that vLLM fuses into one layer with one NVFP4 global scale.

    Args:
        module_names: qualified module names (e.g. the selected Linear layers of a model).

    Returns:
        Tuples of two or more names from `module_names` that share a parent module and form one
        of `FUSED_GROUPS` (`q_proj/k_proj/v_proj`, `gate_proj/up_proj`, `q_a_proj/
        kv_a_proj_with_mqa`), each in `FUSED_GROUPS` order. Fake quant that must equal what vLLM
        computes uses, for every member, `amax = max(amax of the members)`.
    """
    found: Dict[Tuple[str, int], Dict[str, str]] = {}
    for name in module_names:
        key = fused_group_key(name)
        if key is not None:
            found.setdefault(key, {})[name.rpartition(".")[2]] = name
    groups = []
    for (parent, gi), members in found.items():
        names = tuple(members[leaf] for leaf in FUSED_GROUPS[gi] if leaf in members)
        if len(names) > 1:
            groups.append(names)
    return groups


def fused_group_key(module_name: str) -> Optional[Tuple[str, int]]:
    """`(parent module, index into FUSED_GROUPS)` of a module that is a member of a fused group,
    else None: the key under which a streaming export collects a group's members."""
    parent, _, leaf = module_name.rpartition(".")
    for gi, group in enumerate(FUSED_GROUPS):
        if leaf in group:
            return parent, gi
    return None


# Names across HF (the actor, verl's weight sync), PEFT and vLLM (the rollout).

_MEMBER_OF = {m: fused for fused, members in VLLM_FUSED.items() for m in members}
_PEFT_PREFIX = "base_model.model."
# PEFT's adapter modules: vLLM gets them unquantized and noise-free (add_lora), so the verl
# plugin leaves them alone on the actor too.
_PEFT_ADAPTERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_adapter(name: str) -> bool:
    """Whether a module name lies inside a PEFT LoRA adapter (`...q_proj.lora_A.default`)."""
    return any(part in _PEFT_ADAPTERS for part in name.split("."))


def normalize_name(name: str) -> str:
    """A module or parameter name without FSDP/checkpoint/compile wrappers and PEFT's
    `base_model.model.` / `.base_layer` components, so actor module names, verl's weight-sync
    names and vLLM's names line up."""
    name = canonical_name(name)
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def vllm_alias(module_name: str) -> Optional[str]:
    """The vLLM module that holds an HF module's rows (`...q_proj` -> `...qkv_proj`), or None."""
    parent, _, leaf = module_name.rpartition(".")
    fused = _MEMBER_OF.get(leaf)
    if fused is None:
        return None
    return f"{parent}.{fused}" if parent else fused
