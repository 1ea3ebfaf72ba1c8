"""Fake quantization of torch modules without touching their parameters.

`quantize_model(model, quantizer, ...)` makes the selected `nn.Linear` (and optionally
`nn.Embedding`) modules compute with fake-quantized weights (W4A16), inputs (W16A4) or both
(W4A4). Design, and the bugs of the research plan's original fork it avoids:

* The master weight is never written. The plan's fork swapped `module.weight.data` in a
  pre-hook and restored it in a backward hook, which never fires under `no_grad` (log-prob
  recompute), so the quantized weight replaced the master weight. Here the module's forward is
  wrapped per instance: it reads `self.weight`, fake-quantizes it out of place, and calls the
  functional op. `state_dict()` keys and values stay exactly the same, under any grad mode.
* Backward is the straight-through estimator: the gradient of the fake-quantized weight is
  passed to the master weight unchanged (`ste="identity"`), or zeroed where the element was
  clipped at the top of the FP4 grid (`ste="clipped"`).
* The weight's fake quant is cached per weight version (`data_ptr`, `_version`, shape, dtype,
  device), so micro-batches between two optimizer steps reuse it; the optimizer's in-place
  update bumps `_version` and invalidates it. Under FSDP (detected at install time) and under
  `torch.compile` the cache is off. With `prefill=True` the first forward after a change fills
  every stale cache in one multi-tensor pass (`_Prefill`), same bits.
* A cached value serves every later forward, whatever its grad mode, so it is always made the
  same way: detached, outside autograd and outside `inference_mode` (`normal_tensor`). A value
  made under `inference_mode` would be an inference tensor: a training forward that reused it
  would get no gradient on the weight (autograd cannot record an op on it) or fail to save it
  for backward. The gradient never goes through the cached value: `STELink` returns it and
  routes the output's gradient to the master weight (identity or clipped STE).
* The op is `torch.ops.aqn_rs.fake_quant` (`aqn_rs.ops`: a custom op with a fake
  implementation and an autograd formula), so `torch.compile(fullgraph=True)` traces it whole.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cuda
from .aqn import AqnNoise
from .constants import DEFAULT_EXCLUDE, DTYPE_TAGS, INJECTION_POINTS, STE_MODES
from .ops import STELink, fake_quant_with, normal_tensor, quantizer_for

# The op's public names, importable from here as they were when the op lived in this module.
from .ops import clipped_ste_grad as clipped_ste_grad
from .ops import fake_quant as fake_quant
from .ops import fake_quant_op as fake_quant_op
from .quantizers import Mxfp4Quantizer, Nvfp4Quantizer, _Quantizer
from .selection import ModuleSelector, fused_weight_groups

# ---- module wrapping -----------------------------------------------------------------------


@dataclasses.dataclass
class ModuleDecision:
    """One row of `QuantizationHandle.summary()`."""

    name: str
    type: str
    selected: bool
    rule: str


class _WeightCache:
    """Detached fake-quantized weight per (data_ptr, _version, shape, dtype, device, extra).

    `extra` carries what else the value depends on (the fused group's amax version). The value
    is computed by `normal_tensor`, so one computed under `no_grad` or `inference_mode` serves
    a training forward and the other way round. A weight that is itself an inference tensor
    has no version counter: it is never cached."""

    __slots__ = ("key", "value", "hits", "misses", "linked", "seen", "filled")

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.value: Optional[Tensor] = None
        self.hits = 0
        self.misses = 0
        self.linked: Optional[tuple] = None  # (w, value, the STE view), see link()
        # (data_ptr, _version) of the weight the last prefill looked at (see _Prefill)
        self.seen: Optional[tuple] = None
        # the value was filled by a prefill and not served yet: its first use is the miss
        self.filled = False

    @staticmethod
    def key_of(w: Tensor, extra: tuple) -> tuple:
        return (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device, extra)

    def get(self, w: Tensor, compute, extra: tuple = ()) -> Tensor:
        if w.is_inference():
            self.misses += 1
            return compute(w.detach())
        key = self.key_of(w, extra)
        if key != self.key:
            self.key, self.value, self.linked = None, None, None  # a failed compute leaves no stale entry
            self.filled = False
            self.value = normal_tensor(compute, w.detach())
            self.key = key
            self.misses += 1
        elif self.filled:  # computed ahead by a prefill: counted as the miss it replaces
            self.filled = False
            self.misses += 1
        else:
            self.hits += 1
        return self.value

    def unseen(self, w: Tensor) -> bool:
        """Whether no prefill has looked at this version of `w` yet (`w` a normal tensor)."""
        s = self.seen
        return s is None or s[1] != w._version or s[0] != w.data_ptr()

    def fill(self, w: Tensor, value: Tensor, extra: tuple) -> None:
        """Store a value a prefill computed for `w` (the same bits `get` would compute)."""
        self.key, self.value, self.linked = self.key_of(w, extra), value, None
        self.filled = True

    def link(self, w: Tensor, q: Tensor) -> Tensor:
        """The identity STE's output for a training forward: the values of `q` with `w`'s
        gradient path, made once per (w, cached value) and served to every training forward
        until the value changes. It is a `view_as` of `w` whose data is swapped for `q`'s:
        autograd records the view (its backward, in C++, hands the gradient to `w`
        unchanged, and it saves no tensor, so each micro-batch's backward runs through it
        again), while the forward reads `q`. An `autograd.Function` here cost two Python
        calls per Linear per micro-batch (forward and backward) on the host."""
        got = self.linked
        if got is None or got[0] is not w or got[1] is not q:
            v = w.view_as(w)
            v.data = q  # same shape, dtype and device: only the storage changes
            got = self.linked = (w, q, v)
        return got[2]

    def clear(self) -> None:
        self.key, self.value, self.linked, self.seen = None, None, None, None
        self.filled = False


class _GroupAmax:
    """The shared NVFP4 tensor amax of a fused group (q/k/v, gate/up): vLLM keeps one global
    scale per fused layer, computed from the max of its members' amaxes, so fake quant that
    must equal what vLLM computes from the exported checkpoint uses that amax for every member
    (the convention llm-compressor and `aqn_rs.export` follow)."""

    def __init__(self, modules: List[torch.nn.Module]) -> None:
        self.modules = modules
        self.key: Optional[tuple] = None
        self.value: Optional[Tensor] = None
        self.prefill: Optional["_Prefill"] = None  # the handle's, when on

    def version(self) -> tuple:
        """The members' (data_ptr, _version); raises RuntimeError for an inference tensor
        (it has no version counter, so nothing to key a cached value on)."""
        return tuple([(w.data_ptr(), w._version) for w in map(_weight_of, self.modules)])

    def _amax(self) -> Tensor:
        ws = [m.weight.detach() for m in self.modules]
        if torch.compiler.is_compiling() or not ws[0].is_cuda:
            return torch.stack([w.abs().amax().float() for w in ws]).amax()
        # CUDA: one call, a read-only amax pass per member and one fold (abs().amax() would
        # also write |w|, and a stack + max would be two launches more); stays on the device
        # (no host sync), and leaves the first member, which is fake-quantized next, in L2
        return Nvfp4Quantizer().amax_many([w.contiguous() for w in ws])

    def compute(self) -> Tensor:
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return self._amax()
        # cached and saved for the clipped STE's backward: a normal tensor in every grad mode
        return normal_tensor(self._amax)

    def get(self) -> Tensor:
        # Every member's forward asks, so this runs three times per q/k/v group per forward
        # (micro-batches included): one pass over the members, no Module.__getattr__.
        if torch.compiler.is_compiling():
            return self.compute()
        try:
            key = self.version()
        except RuntimeError:  # an inference-mode weight: computed each time, never cached
            return self.compute()
        if key != self.key:
            if self.prefill is not None:  # a member changed: the prefill refreshes the group whole
                self.prefill.run()
                if key == self.key:
                    return self.value
            self.key, self.value = None, None
            self.value, self.key = self.compute(), key
        return self.value


class _Prefill:
    """The fake quant of every stale cached weight of a handle at once: the first forward
    that finds its own weight changed (the first after an optimizer step) fills the caches
    of all the others too, in a few multi-tensor launches per dtype and device
    (`fake_quant_many`: for NVFP4 one amax pass over all of them with one amax per fused
    group, one fold, one fake quant) instead of one to four launches and their host work per
    weight. Each value has the bits the weight's own forward would compute, and each cache
    counts the miss it replaces at its first use. On the CPU it runs one fake quant per
    weight, as the forwards would. Weights it does not take (inference tensors; on CUDA a
    layout without whole blocks or an unaligned view), every member of a fused group with
    such a weight, and a stale weight of a fused group whose amax is still cached, are left
    to their own forwards. A module that does not run (an unrouted expert) still gets its
    value: the memory its cache would hold anyway, and the work its forward would have done."""

    def __init__(self, quantizer: _Quantizer, entries: List[tuple]) -> None:
        self.fmt = quantizer.format
        self.mode = getattr(quantizer, "scale_mode", "floor")
        self.block = quantizer.block_size
        self.direct = quantizer_for(self.fmt, self.mode)  # the CPU path: the op's implementation
        self.entries = entries  # (module, cache, group or None), in module order
        self.runs = 0  # prefills that launched something
        self.kernels: Optional[bool] = None  # the CUDA kernels are there (asked once)

    def run(self) -> None:
        normal_tensor(self._run)

    def _ready(self, w: Tensor) -> bool:
        if w.is_inference() or w.dim() == 0 or not w.is_contiguous() or w.dtype not in _MANY_DTYPES:
            return False
        if w.device.type == "cpu":  # one fake quant per weight, as its forward would
            return True
        if not w.is_cuda:
            return False
        if self.kernels is None:
            self.kernels = _cuda.available()
        return bool(self.kernels) and _cuda.many_ready([w], self.block)

    def _run(self) -> None:
        rows = []
        group_state: Dict[int, Optional[tuple]] = {}  # id -> the new version if stale, () if fresh, None: left alone
        for module, cache, group in self.entries:
            w = _weight_of(module)
            if w.is_inference():  # no version counter: its forward computes it each time
                continue
            cache.seen = (w.data_ptr(), w._version)  # looked at: its forwards do not ask again
            ok = self._ready(w)
            st = ()
            if group is not None:
                gid = id(group)
                if gid not in group_state:
                    group_state[gid] = self._group_state(group)
                st = group_state[gid]
                if st is None:
                    continue
            if not ok:
                continue
            if group is not None:
                # a stale group goes whole (its amax is a max over all members); a member of
                # a fresh group with a stale value is left to its forward, which reuses the
                # group's cached amax
                if st:
                    rows.append((cache, group, w))
                continue
            k = cache.key
            if k is None or k[1] != w._version or k[0] != w.data_ptr():
                rows.append((cache, group, w))
        if not rows:
            return
        by_kind: Dict[tuple, list] = {}
        for r in rows:
            by_kind.setdefault((r[2].device, r[2].dtype), []).append(r)
        for (device, _), part in by_kind.items():
            for cache, _, _ in part:  # the old values go before the new ones are made
                cache.key, cache.value, cache.linked = None, None, None
            ws = [w for _, _, w in part]
            if device.type == "cpu":
                outs = []
                for cache, g, w in part:
                    if g is not None and group_state[id(g)]:
                        g.key, g.value = group_state[id(g)], g._amax()
                        group_state[id(g)] = ()
                    outs.append(fake_quant_with(self.direct, w.detach(), g.value if g is not None else None))
            elif self.fmt == "nvfp4":
                slot_of: Dict[int, int] = {}
                slots = [slot_of.setdefault(id(g) if g is not None else -1 - i, len(slot_of))
                         for i, (_, g, _) in enumerate(part)]
                outs, amax = _cuda.fake_quant_many(ws, "nvfp4", "floor", slots, len(slot_of))
                for (cache, g, w), s in zip(part, slots):
                    if g is not None and group_state[id(g)]:
                        g.key, g.value = group_state[id(g)], amax[s]
                        group_state[id(g)] = ()  # set once
            else:
                outs, _ = _cuda.fake_quant_many(ws, self.fmt, self.mode)
            for (cache, g, w), out in zip(part, outs):
                cache.fill(w, out, g.key if g is not None else ())
        self.runs += 1

    def _group_state(self, group: "_GroupAmax") -> Optional[tuple]:
        """For a group whose members are all `_ready` and in this handle's caches: its new
        version if the cached amax is stale, () if not; None for a group left alone."""
        ws = [_weight_of(m) for m in group.modules]
        if not all(self._ready(w) for w in ws) or len({(w.device, w.dtype) for w in ws}) != 1:
            return None
        v = tuple([(w.data_ptr(), w._version) for w in ws])
        return v if v != group.key else ()


# The dtypes the quantizers take (CPU and CUDA alike).
_MANY_DTYPES = tuple(getattr(torch, name) for name in DTYPE_TAGS)


def _weight_of(module: torch.nn.Module) -> Tensor:
    """`module.weight`, by the same lookup (an instance attribute, e.g. FSDP1's unsharded view,
    first, then the registered parameter) without `nn.Module.__getattr__`'s Python slow path,
    which the per-forward version checks would otherwise pay per member."""
    d = module.__dict__
    w = d.get("weight")
    if w is None:
        w = d["_parameters"].get("weight")
    return w if w is not None else module.weight


def _fsdp_present(model: torch.nn.Module) -> bool:
    names = {"FullyShardedDataParallel", "FSDPModule"}
    for m in model.modules():
        if any(c.__name__ in names or c.__name__.startswith("FSDP") for c in type(m).__mro__):
            return True
    for p in model.parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return True
    return False


class QuantizationHandle:
    """What `quantize_model` returns: `remove()` undoes it, `summary()` says what it did."""

    def __init__(self, model, quantizer, injection_point, ste, decisions, wrapped) -> None:
        self._model = weakref.ref(model)
        self.quantizer = quantizer
        self.injection_point = injection_point
        self.ste = ste
        self._decisions: List[ModuleDecision] = decisions
        self._wrapped: Dict[str, Tuple[torch.nn.Module, _WeightCache]] = wrapped
        self._groups: List["_GroupAmax"] = []
        self._prefill: Optional[_Prefill] = None
        self.removed = False

    @property
    def modules(self) -> List[str]:
        """Names of the modules that compute with fake quant."""
        return list(self._wrapped)

    def summary(self) -> List[ModuleDecision]:
        """One row per module: name, class, whether selected, and the rule that decided."""
        return list(self._decisions)

    def format_summary(self) -> str:
        """The summary as a text table, selected modules first."""
        rows = sorted(self._decisions, key=lambda d: (not d.selected, d.name))
        w = max([len(d.name) for d in rows] + [4])
        t = max([len(d.type) for d in rows] + [4])
        lines = [f"{'name':<{w}}  {'type':<{t}}  sel  rule"]
        lines += [f"{d.name:<{w}}  {d.type:<{t}}  {'yes' if d.selected else 'no ':<3}  {d.rule}" for d in rows]
        n = sum(d.selected for d in rows)
        lines.append(f"{n} of {len(rows)} modules fake-quantized ({self.quantizer!r}, {self.injection_point}, ste={self.ste})")
        return "\n".join(lines)

    def cache_stats(self) -> Dict[str, int]:
        """Weight-cache hits and misses summed over modules."""
        hits = sum(c.hits for _, c in self._wrapped.values())
        misses = sum(c.misses for _, c in self._wrapped.values())
        return {"hits": hits, "misses": misses}

    def invalidate(self) -> None:
        """Drop every cached fake-quantized weight and fused-group amax. Call it after anything
        that rewrites weights without bumping their version counter (e.g. an FSDP1 re-gather
        into the same buffer, or `param.data.copy_`)."""
        for _, cache in self._wrapped.values():
            cache.clear()
        for g in self._groups:
            g.key, g.value = None, None

    def remove(self) -> None:
        """Restore every wrapped module's original forward and drop the caches."""
        for module, cache in self._wrapped.values():
            if "forward" in module.__dict__:
                del module.__dict__["forward"]
            module.__dict__.pop("_aqn_rs_handle", None)
            cache.clear()
        self._wrapped.clear()
        self.removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _make_forward(module, kind: str, quantizer, injection_point: str, ste: str, cache: Optional[_WeightCache],
                  group: Optional[_GroupAmax] = None, prefill: Optional[_Prefill] = None):
    mode = getattr(quantizer, "scale_mode", "floor")
    fmt = quantizer.format
    q_weight = injection_point in ("weight", "both")
    q_act = injection_point in ("activation", "both")

    # The cached path computes outside autograd (`normal_tensor`), so it calls the op's
    # implementation itself: the same quantizer the op builds from (fmt, mode), without the
    # custom op's Python dispatch on every cache miss.
    direct = quantizer_for(fmt, mode)

    def weight_q(w: Tensor) -> Tensor:
        if not q_weight:
            return w
        if cache is not None and not torch.compiler.is_compiling():
            if prefill is not None and not w.is_inference() and cache.unseen(w):
                prefill.run()  # the weights changed: fill every stale cache at once
            amax = group.get() if group is not None else None
            extra = group.key if group is not None else ()
            qw = cache.get(w, lambda wd: fake_quant_with(direct, wd, amax), extra)
            if torch.is_grad_enabled() and w.requires_grad:
                if ste == "identity":
                    return cache.link(w, qw)
                return STELink.apply(w, qw, fmt, mode, ste, amax)
            return qw
        amax = group.get() if group is not None else None
        return torch.ops.aqn_rs.fake_quant(w, fmt, mode, ste, amax)

    def effective_weight(self) -> Tensor:
        w = weight_q(self.weight)
        noise = self.__dict__.get("_aqn_rs_noise")
        if noise is not None:  # AQN on top of the quantized weight, as the rollout sees it
            aqn, name = noise
            w = aqn.actor_weight(name, w, training=self.training)
        return w

    if kind == "linear":

        def forward(self, input: Tensor) -> Tensor:
            x = torch.ops.aqn_rs.fake_quant(input, fmt, mode, ste, None) if q_act else input
            return F.linear(x, effective_weight(self), self.bias)

    else:  # embedding: weight only

        def forward(self, input: Tensor) -> Tensor:
            return F.embedding(input, effective_weight(self), self.padding_idx, self.max_norm,
                               self.norm_type, self.scale_grad_by_freq, self.sparse)

    return types.MethodType(forward, module)


def _layer_kind(module) -> Optional[str]:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return None


def quantize_model(
    model: torch.nn.Module,
    quantizer: _Quantizer,
    injection_point: str = "weight",
    exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE,
    include: Optional[Sequence[str]] = None,
    layer_types: Sequence[str] = ("linear",),
    ste: str = "identity",
    cache: bool = True,
    fuse_global_scales: bool = True,
    prefill: bool = False,
) -> QuantizationHandle:
    """Make the selected modules of `model` compute with fake-quantized weights/activations.

    Args:
        model: any `torch.nn.Module` (a transformers model, a plain stack of Linears, ...).
        quantizer: `aqn_rs.Mxfp4Quantizer(...)` or `aqn_rs.Nvfp4Quantizer()`.
        injection_point: "weight" (W4A16), "activation" (W16A4: the Linear's input, blocks along
            in_features) or "both" (W4A4).
        exclude: patterns never quantized (exact dotted-suffix names, shell globs, `re:` regexes);
            default `lm_head` and `embed_tokens`, as production recipes do.
        include: if given, only modules matching one of these patterns.
        layer_types: "linear" and/or "embedding" (weight fake quant applies to those).
        ste: "identity" or "clipped" straight-through estimator.
        cache: reuse a weight's fake quant until the weight changes (off under FSDP).
        fuse_global_scales: NVFP4 only: the members of a group that vLLM fuses into one layer
            (q/k/v_proj, gate/up_proj under one parent) share one tensor amax, the max of
            theirs, so fake quant equals what vLLM computes from `aqn_rs.export`'s checkpoint.
        prefill: with the cache on, the first forward after the weights change fake-quantizes
            every changed weight at once (a few multi-tensor launches on CUDA instead of a
            few per weight), so later modules find their value cached. The values are the
            same bits; False computes each at its own module's forward. Off by default
            until the multi-tensor kernels' GPU tests (tests/exact/test_cuda_many.py) and the
            step benchmark (benchmarks/bench_step.py, its -noprefill column) have run on a GPU.

    Returns:
        A `QuantizationHandle` (`remove()`, `summary()`, `format_summary()`, `cache_stats()`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(quantizer, (Mxfp4Quantizer, Nvfp4Quantizer)):
        raise TypeError(f"quantizer must be an aqn_rs Mxfp4Quantizer or Nvfp4Quantizer, got {quantizer!r}")
    if injection_point not in INJECTION_POINTS:
        raise ValueError(f"unknown injection_point {injection_point!r}; expected one of {INJECTION_POINTS}")
    if ste not in STE_MODES:
        raise ValueError(f"unknown ste {ste!r}; expected one of {STE_MODES}")
    bad = [t for t in layer_types if t not in ("linear", "embedding")]
    if bad:
        raise ValueError(f"quantize_model fake-quantizes 'linear' and 'embedding' layers; got {bad} "
                         "(RMSNorm weights get AQN noise, not quantization: see aqn_rs.AqnNoise)")
    if injection_point != "weight" and "embedding" in layer_types:
        raise ValueError("activation fake quant applies to Linear inputs only; use layer_types=('linear',)")
    selector = ModuleSelector(include=include, exclude=exclude if exclude is not None else (), layer_types=tuple(layer_types))
    use_cache = cache and not _fsdp_present(model)

    decisions: List[ModuleDecision] = []
    chosen: List[Tuple[str, torch.nn.Module, str]] = []
    for name, module in model.named_modules():
        if not name:
            continue
        cls = type(module).__name__
        selected, rule = selector.decide(name, cls)
        kind = _layer_kind(module)
        if selected and kind is None:
            selected, rule = False, f"unsupported:{cls}"
        if selected and "_aqn_rs_handle" in module.__dict__:
            raise ValueError(f"module {name!r} is already fake-quantized by another handle; remove() it first")
        if selected and "forward" in module.__dict__:
            raise ValueError(
                f"module {name!r} already has a per-instance forward (attach_noise?); "
                "call quantize_model before attach_noise"
            )
        if kind is not None or selected or cls.endswith("RMSNorm"):
            decisions.append(ModuleDecision(name, cls, selected, rule))
        if selected:
            chosen.append((name, module, kind))

    groups: Dict[str, _GroupAmax] = {}
    if fuse_global_scales and quantizer.format == "nvfp4" and injection_point != "activation":
        by_name = {n: m for n, m, k in chosen if k == "linear"}
        for members in fused_weight_groups(by_name):
            g = _GroupAmax([by_name[n] for n in members])
            groups.update({n: g for n in members})

    wrapped: Dict[str, Tuple[torch.nn.Module, _WeightCache]] = {}
    caches = {name: _WeightCache() for name, _, _ in chosen} if use_cache else {}
    pre = None
    if use_cache and prefill and injection_point != "activation":
        pre = _Prefill(quantizer, [(m, caches[n], groups.get(n)) for n, m, _ in chosen])
        for g in groups.values():
            g.prefill = pre
    for name, module, kind in chosen:
        c = caches.get(name)
        module.forward = _make_forward(module, kind, quantizer, injection_point, ste, c, groups.get(name), pre)
        module.__dict__["_aqn_rs_handle"] = True
        wrapped[name] = (module, c if c is not None else _WeightCache())
    handle = QuantizationHandle(model, quantizer, injection_point, ste, decisions, wrapped)
    handle._groups = list({id(g): g for g in groups.values()}.values())
    handle._prefill = pre
    return handle


# ---- AQN in the training forward (actor mode) ---------------------------------------------


class NoiseHandle:
    """What `attach_noise` returns: `remove()` detaches the noise, `modules` lists where it goes."""

    def __init__(self, noise, entries: Dict[str, Tuple[torch.nn.Module, str]]) -> None:
        self.noise = noise
        self._entries = entries

    @property
    def modules(self) -> List[str]:
        return list(self._entries)

    def remove(self) -> None:
        for module, how in self._entries.values():
            if how == "flag":
                module.__dict__.pop("_aqn_rs_noise", None)
            elif "forward" in module.__dict__:
                del module.__dict__["forward"]
            module.__dict__.pop("_aqn_rs_noise_handle", None)
        self._entries.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _swap_forward(module, name: str, noise):
    """Forward that runs the module's own forward with `weight + noise` in place of the weight
    Parameter for the duration of the call (the Parameter object and its data are untouched;
    the swap is undone in `finally`, so also on exceptions and under no_grad)."""
    orig = module.forward

    def forward(self, *args, **kwargs):
        w = self._parameters["weight"]
        wn = noise.actor_weight(name, w, training=self.training)
        if wn is w:
            return orig(*args, **kwargs)
        self._parameters["weight"] = wn
        try:
            return orig(*args, **kwargs)
        finally:
            self._parameters["weight"] = w

    return types.MethodType(forward, module)


def attach_noise(model: torch.nn.Module, noise) -> NoiseHandle:
    """Add AQN noise to the selected weights in the training forward (actor mode).

    The noise of the current step (`noise.set_step(optimizer_step)`) is added out of place:
    on RMSNorm gains (QeRL's choice) the module runs with `gain + noise`; on a Linear already
    fake-quantized by `quantize_model` the noise is added to the quantized weight (`Q(w) + n`,
    what a rollout engine computes after a fake-quantized weight sync and in-place noise).
    Master weights are never written; modules in eval mode (`model.eval()`) draw no noise.

    Args:
        model: the policy model.
        noise: an `aqn_rs.AqnNoise` with `apply_to` "actor" or "both".

    Returns:
        A `NoiseHandle` (`remove()`, `modules`).
    """
    if not isinstance(noise, AqnNoise):
        raise TypeError(f"noise must be an aqn_rs.AqnNoise, got {type(noise).__name__}")
    if not noise.applies_to("actor"):
        raise ValueError(
            f"AqnNoise(apply_to={noise.apply_to!r}) adds no noise in the training forward; use "
            "apply_to='actor' or 'both', or noise.apply_(rollout_model) for a rollout model"
        )
    entries: Dict[str, Tuple[torch.nn.Module, str]] = {}
    for name, module in model.named_modules():
        if not name or not noise.selects(name, module):
            continue
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if "_aqn_rs_noise_handle" in module.__dict__:
            raise ValueError(f"module {name!r} already has AQN noise attached; remove() it first")
        if "_aqn_rs_handle" in module.__dict__:
            module.__dict__["_aqn_rs_noise"] = (noise, name)
            entries[name] = (module, "flag")
        else:
            if "forward" in module.__dict__:
                raise ValueError(f"module {name!r} already has a per-instance forward; cannot attach noise")
            module.forward = _swap_forward(module, name, noise)
            entries[name] = (module, "forward")
        module.__dict__["_aqn_rs_noise_handle"] = True
    if not entries:
        raise ValueError(f"{noise!r} selects no module of this model (check layer_types/include/exclude)")
    return NoiseHandle(noise, entries)
