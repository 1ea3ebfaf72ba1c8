"""The actor side: what the plugin installs on the actor's HF model before FSDP wraps it (W4A16
fake quant with the straight-through estimator, actor AQN), held in an `ActorState` that also
fake-quantizes the actor's weight sync into vLLM.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from ...aqn import AqnNoise
from ...errors import VerlPluginError
from ...quantizers import Mxfp4Quantizer, Nvfp4Quantizer
from ...selection import is_adapter, normalize_name
from .. import verl_probe
from .config import QUANT_BLOCK, PluginConfig
from .names import select_linear
from .sync import _publish_stats, quant_sync


def _quantizer(q: Mapping[str, Any]):
    return Mxfp4Quantizer(q["scale_mode"]) if q["format"] == "mxfp4" else Nvfp4Quantizer()


def _noise_class():
    class ActorNoise(AqnNoise):
        """AQN in the actor's forwards: also in verl's log-prob recompute, which runs the
        model in eval mode, so the old log-probs, the update and the rollout (apply_to both)
        all see the policy of the same step; module names are PEFT-normalized so the draws
        match the rollout's."""

        def actor_weight(self, name, weight, step=None, training=True):
            return super().actor_weight(name, weight, step, training=True)

        def noise_for(self, name, weight, step=None):
            return super().noise_for(normalize_name(name), weight, step)

        def selects(self, name, module):
            return not is_adapter(name) and super().selects(normalize_name(name), module)

    return ActorNoise


class ActorState:
    """What the plugin installed on one actor model: the quantization handle (or None), the
    actor noise (or None), the quantized module names and the weight-sync settings."""

    def __init__(self, model: Any, cfg: PluginConfig, param_dtype: Any = None) -> None:
        import torch

        from ...hooks import attach_noise, quantize_model

        self.cfg = cfg
        self.param_dtype = param_dtype if param_dtype is not None else torch.bfloat16
        self.handle = None
        self.noise = None
        self.quant_modules: List[str] = []
        self.groups: Dict[str, Tuple[str, ...]] = {}
        self.step: Optional[int] = None
        self.last_stats: Optional[Dict[str, float]] = None
        self._group_amaxes: List[Any] = []
        q = cfg.quantization
        if q is not None:
            chosen = select_linear(model, q["exclude"], q["include"])
            if not chosen:
                raise VerlPluginError(f"{QUANT_BLOCK} selects no Linear module of {type(model).__name__} "
                                      f"(exclude={q['exclude']}, include={q['include']})")
            self.quantizer = _quantizer(q)
            # Exact names: the selection above (with vLLM aliases) is the one rule; the cache is
            # off because FSDP re-gathers weights into reused buffers.
            self.handle = quantize_model(model, self.quantizer, injection_point="weight", exclude=(),
                                         include=tuple(chosen), layer_types=("linear",), ste=q["ste"],
                                         cache=False, fuse_global_scales=q["fuse_global_scales"])
            self.quant_modules = [normalize_name(n) for n in self.handle.modules]
            if q["fuse_global_scales"] and q["format"] == "nvfp4":
                from ...export import fused_weight_groups

                for g in fused_weight_groups(self.quant_modules):
                    self.groups.update({m: tuple(g) for m in g})
                self._group_amaxes = _group_amax_objects(self.handle)
        if cfg.actor_noise:
            self.noise = _noise_class().from_config(cfg.noise, int(cfg.total_steps), apply_to="actor")
            attach_noise(model, self.noise)

    def set_step(self, step: int) -> None:
        """The global step whose noise the actor uses (that of the last weight sync)."""
        self.step = int(step)
        if self.noise is not None:
            self.noise.set_step(self.step)

    def invalidate(self) -> None:
        """Drop cached fused-group amaxes (weights changed: optimizer step, checkpoint load).
        Under FSDP1 a re-gathered weight can keep its data_ptr and version counter."""
        for g in self._group_amaxes:
            g.key, g.value = None, None

    def wrap_sync(self, named_tensors: Iterable[Tuple[str, Any]]) -> Iterator[Tuple[str, Any]]:
        """The weight-sync stream with the quantized Linear weights fake-quantized (recorded
        for `verl_probe` when `AQN_RS_PROBE_DIR` is set)."""
        def quantize(stream):
            return quant_sync(stream, self.quantizer, self.quant_modules, groups=self.groups,
                              param_dtype=self.param_dtype, on_done=self._sync_done)

        if not verl_probe.probes(self.step):
            return quantize(named_tensors)
        meta = {"quant_modules": self.quant_modules, "groups": sorted({g for g in self.groups.values()}),
                "param_dtype": str(self.param_dtype).replace("torch.", ""), "format": self.quantizer.format,
                "scale_mode": getattr(self.quantizer, "scale_mode", "floor"), "step": self.step}
        return verl_probe.record_sync(named_tensors, self.step, quantize, meta)

    def _sync_done(self, stats: Dict[str, float]) -> None:
        stats["step"] = self.step
        self.last_stats = stats
        _publish_stats(stats)


def _group_amax_objects(handle: Any) -> List[Any]:
    """The `_GroupAmax` caches that `quantize_model` closed over in the wrapped forwards
    (a few closures deep: forward -> effective_weight -> weight_q -> group)."""
    from ... import hooks

    found: Dict[int, Any] = {}

    def walk(fn: Any, depth: int) -> None:
        fn = getattr(fn, "__func__", fn)
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                obj = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(obj, hooks._GroupAmax):
                found[id(obj)] = obj
            elif depth > 0 and inspect.isfunction(obj):
                walk(obj, depth - 1)

    for module, _ in getattr(handle, "_wrapped", {}).values():
        walk(module.__dict__.get("forward"), 4)
    return list(found.values())
