"""aqn-rs as a verl plugin: W4A16 fake quant and AQN in verl's GRPO/PPO runs, without a fork.

Load it in every verl process with two settings (docs/VERL.md has a copy-paste command)::

    actor_rollout_ref.model.external_lib=aqn_rs.integrations.verl
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=aqn_rs.integrations.verl

`VERL_USE_EXTERNAL_MODULES` makes every `import verl` import this module: the trainer
(TaskRunner), the FSDP actor workers and the vLLM worker processes that verl's rollout servers
spawn. `external_lib` is verl's documented hook for model-side plugins and imports it again
(a no-op) when the actor's model config is built.

It reads two blocks of the trainer config::

    +trainer.quantization.format=mxfp4        # none | mxfp4 | nvfp4 (+ scale_mode, exclude, ...)
    +trainer.noise_injection.enabled=True     # the research plan's AQN block (+ sigma_start, ...)

and, in each process, patches only what exists in the installed verl (0.8.0 - 0.9.1 checked,
`PATCH_POINTS`), on import of the verl module concerned; a missing patch point is an error
that names the point and the verl version.

What runs where:

* trainer process (`RayPPOTrainer` / V1 `PPOTrainer`): validates the blocks, forwards them with
  the run's total step count to the workers (`actor_rollout_ref.aqn_rs`), after every weight
  sync tells each vLLM replica to apply the AQN noise of that global step
  (`CheckpointEngineManager.update_weights`), takes the noise off for validation
  (`_validate`), and adds `aqn/sigma`, `aqn/stage` and `quant/*` to what verl's `Tracking`
  logs.
* FSDP actor workers: before FSDP wraps the model (`FSDPEngine._build_fsdp_module`, where
  verl's own QAT hooks in) the selected Linear layers get W4A16 fake quant with the
  straight-through estimator (`aqn_rs.quantize_model`) and, with `apply_to` actor/both, AQN in
  the actor's forwards (`aqn_rs.attach_noise`); the weight-sync generator
  (`FSDPEngine.get_per_tensor_param`) yields fake-quantized weights, computed in the actor's
  compute dtype with the fused q/k/v and gate/up amax for NVFP4, so vLLM runs on exactly the
  weights the actor's forward uses.
* vLLM worker processes: `vLLMColocateWorkerExtension` gains `aqn_rs_apply(step, ...)` and
  `aqn_rs_restore()`, which add / remove the step's noise in place on the rollout model's
  RMSNorm (or Linear) weights with `AqnNoise.apply_` / `restore_` (clean weights cached, noise
  never accumulates). The noise is keyed by (seed, global step, module name), so every rollout
  worker and the actor draw the same noise without sending tensors; on vLLM's fused
  `qkv_proj` / `gate_up_proj` (and tensor-parallel shards) the noise is assembled from the
  draws of the unfused q/k/v (gate/up) weights, the draws the actor makes.

Step convention: the weights synced at the end of global step s (verl passes s to
`update_weights`) carry the noise of step s and generate the rollouts of step s + 1; the actor
uses the same noise for that step's log-prob recompute and update. The sigma schedule's
`total_steps` is verl's total number of global steps (one noise draw per weight sync).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..._aqn_rs import SigmaScheduler
from ...aqn import AqnNoise, _channel_rms, gaussian_noise
from ...constants import APPLY_TO, SCALE_MODES, STE_MODES, TRAIN_FORMATS, VLLM_FUSED
from ...constants import DEFAULT_EXCLUDE as _DEFAULT_EXCLUDE
from ...errors import VerlPluginError
from ...quantizers import Mxfp4Quantizer, Nvfp4Quantizer
from ...selection import ModuleSelector, canonical_name, class_name_of, is_adapter, normalize_name, vllm_alias
from .. import verl_probe

logger = logging.getLogger(__name__)

PLUGIN = "aqn_rs.integrations.verl"
# verl releases whose sources the patch points were checked against (engine workers era).
MIN_VERL = (0, 8, 0)
CHECKED_VERL = ("0.8.0", "0.9.0", "0.9.1")
ENV_MODULES = "VERL_USE_EXTERNAL_MODULES"
# Where the trainer forwards the plugin config inside `actor_rollout_ref` (the only config
# subtree the actor workers receive).
FORWARD_KEY = "aqn_rs"

__all__ = [
    "CHECKED_VERL",
    "PATCH_POINTS",
    "PatchPoint",
    "PluginConfig",
    "VerlPluginError",
    "check_patch_points",
    "parse_config",
    "patched_points",
    "quant_sync",
    "vllm_worker_apply",
    "vllm_worker_restore",
]


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

QUANT_BLOCK = "trainer.quantization"
NOISE_BLOCK = "trainer.noise_injection"
# A list, as the config a user writes in YAML has it.
DEFAULT_EXCLUDE = list(_DEFAULT_EXCLUDE)
QUANT_DEFAULTS: Dict[str, Any] = {
    "format": "none",  # none | mxfp4 | nvfp4
    "scale_mode": "floor",  # MXFP4 only (docs/FORMATS.md)
    "injection_point": "weight",  # W4A16; vLLM computes on dense weights, so weight only
    "layer_types": ["linear"],
    "exclude": DEFAULT_EXCLUDE,
    "include": None,
    "ste": "identity",  # identity | clipped
    "fuse_global_scales": True,  # NVFP4: q/k/v and gate/up share one amax, as vLLM fuses them
}
NOISE_DEFAULTS: Dict[str, Any] = {
    "enabled": False,
    "sigma_start": None,
    "sigma_end": None,
    "num_stages": None,
    "layer_types": ["rmsnorm"],
    "decay": "exponential",
    "zero_first_stage": True,
    "apply_to": "both",  # the presets' choice: the actor trains on the policy the rollout samples
    "relative": False,
    "seed": 0,
    "exclude": DEFAULT_EXCLUDE,
    "include": None,
}
_FORMATS = TRAIN_FORMATS
_STE_MODES = STE_MODES


def _plain(x: Any) -> Any:
    """A DictConfig / ListConfig / mapping / sequence as plain dicts, lists and scalars."""
    if x is None or isinstance(x, (str, bytes, bool, int, float)):
        return x
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:
        pass
    if isinstance(x, Mapping) or (hasattr(x, "keys") and hasattr(x, "__getitem__")):
        return {str(k): _plain(x[k]) for k in x.keys()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _strings(v: Any, key: str, allow_none: bool = False) -> Optional[List[str]]:
    if v is None and allow_none:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise VerlPluginError(f"{key} must be a list of strings, got {v!r}")
    return list(v)


def _exclude(v: Any, key: str) -> List[str]:
    """`exclude` patterns; null means the defaults (lm_head, embed_tokens), [] means none."""
    return list(DEFAULT_EXCLUDE) if v is None else _strings(v, key)


def _merge(block: Any, defaults: Dict[str, Any], where: str) -> Dict[str, Any]:
    block = _plain(block)
    if block is None:
        return dict(defaults)
    if not isinstance(block, dict):
        raise VerlPluginError(f"{where} must be a mapping, got {type(block).__name__}")
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise VerlPluginError(
            f"{where}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(defaults))}"
        )
    out = dict(defaults)
    out.update(block)
    return out


def _as_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise VerlPluginError(f"{key} must be true or false, got {v!r}")


def _check_quant(block: Any) -> Optional[Dict[str, Any]]:
    q = _merge(block, QUANT_DEFAULTS, QUANT_BLOCK)
    if q["format"] not in _FORMATS:
        raise VerlPluginError(f"{QUANT_BLOCK}.format must be one of {_FORMATS}, got {q['format']!r}")
    if q["format"] == "none":
        return None
    if q["scale_mode"] not in SCALE_MODES:
        raise VerlPluginError(f"{QUANT_BLOCK}.scale_mode must be one of {SCALE_MODES}, got {q['scale_mode']!r}")
    if q["injection_point"] != "weight":
        raise VerlPluginError(
            f"{QUANT_BLOCK}.injection_point={q['injection_point']!r}: the verl plugin does W4A16 only "
            "('weight'): vLLM computes with the dense weights it is sent, so activation fake quant "
            "in the actor would train a model the rollout does not run"
        )
    lt = _strings(q["layer_types"], f"{QUANT_BLOCK}.layer_types")
    if lt != ["linear"]:
        raise VerlPluginError(f"{QUANT_BLOCK}.layer_types must be ['linear'] (Linear weights, W4A16), got {lt}")
    q["layer_types"] = lt
    q["exclude"] = _exclude(q["exclude"], f"{QUANT_BLOCK}.exclude")
    q["include"] = _strings(q["include"], f"{QUANT_BLOCK}.include", allow_none=True)
    if q["ste"] not in _STE_MODES:
        raise VerlPluginError(f"{QUANT_BLOCK}.ste must be one of {_STE_MODES}, got {q['ste']!r}")
    q["fuse_global_scales"] = _as_bool(q["fuse_global_scales"], f"{QUANT_BLOCK}.fuse_global_scales")
    if q["format"] == "nvfp4":
        q["scale_mode"] = "floor"  # NVFP4 has one scale rule
    return q


def _check_noise(block: Any) -> Optional[Dict[str, Any]]:
    n = _merge(block, NOISE_DEFAULTS, NOISE_BLOCK)
    n["enabled"] = _as_bool(n["enabled"], f"{NOISE_BLOCK}.enabled")
    if not n["enabled"]:
        return None
    for k in ("sigma_start", "sigma_end", "num_stages"):
        if n[k] is None:
            raise VerlPluginError(f"{NOISE_BLOCK}.{k} is required when {NOISE_BLOCK}.enabled is true")
    lt = _strings(n["layer_types"], f"{NOISE_BLOCK}.layer_types")
    if not lt or any(t not in ("rmsnorm", "linear") for t in lt):
        raise VerlPluginError(f"{NOISE_BLOCK}.layer_types must be a non-empty list of 'rmsnorm' / 'linear', got {lt}")
    n["layer_types"] = lt
    if n["apply_to"] not in APPLY_TO:
        raise VerlPluginError(f"{NOISE_BLOCK}.apply_to must be one of {APPLY_TO}, got {n['apply_to']!r}")
    n["relative"] = _as_bool(n["relative"], f"{NOISE_BLOCK}.relative")
    n["zero_first_stage"] = _as_bool(n["zero_first_stage"], f"{NOISE_BLOCK}.zero_first_stage")
    if isinstance(n["seed"], bool) or not isinstance(n["seed"], int) or not 0 <= n["seed"] < 2**64:
        raise VerlPluginError(f"{NOISE_BLOCK}.seed must be an integer in [0, 2**64), got {n['seed']!r}")
    n["exclude"] = _exclude(n["exclude"], f"{NOISE_BLOCK}.exclude")
    n["include"] = _strings(n["include"], f"{NOISE_BLOCK}.include", allow_none=True)
    try:  # the schedule's own checks (sigma ranges, stages), with the key path in the message
        SigmaScheduler.from_config(n, 1000)
    except (ValueError, TypeError) as e:
        raise VerlPluginError(f"{NOISE_BLOCK}: {e}") from None
    return n


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    """The validated plugin blocks: `quantization` is None for an unquantized run, `noise`
    None when AQN is off; `total_steps` is the schedule's length (verl's global steps)."""

    quantization: Optional[Dict[str, Any]]
    noise: Optional[Dict[str, Any]]
    total_steps: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.quantization is not None or self.noise is not None

    @property
    def actor_noise(self) -> bool:
        return self.noise is not None and self.noise["apply_to"] in ("actor", "both")

    @property
    def rollout_noise(self) -> bool:
        return self.noise is not None and self.noise["apply_to"] in ("rollout", "both")

    def forwarded(self) -> Dict[str, Any]:
        """What the trainer puts under `actor_rollout_ref.aqn_rs` for the workers."""
        return {"quantization": self.quantization, "noise_injection": self.noise, "total_steps": self.total_steps}

    def scheduler(self):
        """The `SigmaScheduler` of the noise block over `total_steps` (None without AQN)."""
        if self.noise is None:
            return None
        if not self.total_steps:
            raise VerlPluginError("the AQN schedule needs the run's total step count (total_steps)")
        return SigmaScheduler.from_config(self.noise, int(self.total_steps))


def parse_config(quantization: Any = None, noise_injection: Any = None, total_steps: Optional[int] = None) -> PluginConfig:
    """Validate the plugin's two blocks (plain dicts or OmegaConf nodes; None = absent).

    Args:
        quantization: `trainer.quantization`: format (none/mxfp4/nvfp4), scale_mode,
            injection_point (weight), layer_types ([linear]), exclude, include, ste,
            fuse_global_scales.
        noise_injection: `trainer.noise_injection`: the plan's block (enabled, sigma_start,
            sigma_end, num_stages, layer_types) plus decay, zero_first_stage, apply_to,
            relative, seed, exclude, include.
        total_steps: the schedule's length, when known.

    Returns:
        A `PluginConfig`.

    Raises:
        VerlPluginError: naming the first unknown key or bad value (`trainer.noise_injection.x`).
    """
    return PluginConfig(_check_quant(quantization), _check_noise(noise_injection),
                        None if total_steps is None else int(total_steps))


def config_from_trainer(config: Any) -> PluginConfig:
    """The plugin blocks of a full verl config (`trainer.quantization`, `trainer.noise_injection`)."""
    trainer = config.get("trainer") if hasattr(config, "get") else None
    trainer = trainer if trainer is not None else {}
    return parse_config(trainer.get("quantization"), trainer.get("noise_injection"))


def _config_from_forwarded(node: Any) -> Optional[PluginConfig]:
    node = _plain(node)
    if node is None:
        return None
    if not isinstance(node, dict):
        raise VerlPluginError(f"actor_rollout_ref.{FORWARD_KEY} must be a mapping, got {type(node).__name__}")
    return parse_config(node.get("quantization"), node.get("noise_injection"), node.get("total_steps"))


# ---------------------------------------------------------------------------------------------
# Names: HF (actor, weight sync) and vLLM (rollout) modules
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Actor side: hooks on the FSDP actor and the fake-quantized weight sync
# ---------------------------------------------------------------------------------------------


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


# Weights per batch of quant_sync's error norms (see there).
_STATS_BATCH_BYTES = 256 << 20


def quant_sync(
    named_tensors: Iterable[Tuple[str, Any]],
    quantizer: Any,
    modules: Iterable[str],
    groups: Optional[Mapping[str, Tuple[str, ...]]] = None,
    param_dtype: Any = None,
    on_done: Optional[Callable[[Dict[str, float]], None]] = None,
) -> Iterator[Tuple[str, Any]]:
    """Fake-quantize the selected Linear weights of a `(name, tensor)` weight-sync stream.

    Args:
        named_tensors: verl's stream (HF names, full tensors, any device).
        quantizer: an `Mxfp4Quantizer` / `Nvfp4Quantizer`.
        modules: the quantized module names (normalized, see `normalize_name`); `X.weight` of
            each is replaced by its fake quant, everything else passes through unchanged.
        groups: module -> its fused group (NVFP4 q/k/v, gate/up): the members are held until
            the group is complete and quantized with `amax = max` of the members' amax.
        param_dtype: the actor's compute dtype (FSDP mixed precision `param_dtype`): weights
            are cast to it before the fake quant, as the actor's forward sees them, so the
            rollout gets bit for bit the weights the actor computes with.
        on_done: called at the end of the stream with the error statistics
            (`rel_error` = ||w - q(w)|| / ||w|| over all quantized weights, `max_rel_error`,
            `sqnr_db`, `tensors`) and `fake_quant_s`: the wall time the stream spent in this
            function's own work (casts, amax, fake quant, error sums; the last step waits for the
            GPU), i.e. what the plugin adds to verl's weight sync.

    Yields:
        `(name, tensor)` in the input's order (group members once their group is complete),
        under the input's names.

    Raises:
        VerlPluginError: at the end of the stream if a selected module's weight never came
            (the stream's names do not match the model's: nothing would be quantized).
    """
    import torch

    expected = set(modules)
    groups = dict(groups or {})
    pending: Dict[Tuple[str, ...], Dict[str, Tuple[str, Any]]] = {}
    seen: set = set()
    errs: List[Any] = []  # ||w - q(w)|| per tensor (f32, on the tensors' device)
    refs: List[Any] = []  # ||w|| per tensor
    # The error norms are taken a batch of tensors at a time with torch's multi-tensor
    # (`_foreach_*`) kernels: per tensor, casts to f32, a subtraction and two sums were ~10
    # launches and ~90% of this function's time on a 1.5B model (docs/BENCHMARKS.md). `w - q`
    # is exact in the weights' own dtype (q is w rounded to a coarser grid, so q/2 <= w <= 2q,
    # or q == 0: Sterbenz), and the norms accumulate in f32. A batch holds at most
    # _STATS_BATCH_BYTES of weights, which bounds the memory the statistics keep alive.
    batch_w: List[Any] = []
    batch_q: List[Any] = []
    batch_bytes = [0]
    spent = [0.0]
    nvfp4 = quantizer.format == "nvfp4"

    def stats_flush():
        if not batch_w:
            return
        with torch.no_grad():
            errs.extend(torch._foreach_norm(torch._foreach_sub(batch_w, batch_q), 2, dtype=torch.float32))
            refs.extend(torch._foreach_norm(batch_w, 2, dtype=torch.float32))
        batch_w.clear()
        batch_q.clear()
        batch_bytes[0] = 0

    def fq(w, amax=None):
        t0 = time.perf_counter()
        w = w.detach()
        if param_dtype is not None and w.dtype != param_dtype:
            w = w.to(param_dtype)
        w = w.contiguous()
        qw = quantizer.fake_quant(w, amax=amax) if nvfp4 else quantizer.fake_quant(w)
        if batch_w and (batch_w[0].device != w.device or batch_w[0].dtype != w.dtype):
            stats_flush()  # a multi-tensor batch is of one device and dtype
        batch_w.append(w)
        batch_q.append(qw)
        batch_bytes[0] += w.numel() * w.element_size()
        if batch_bytes[0] >= _STATS_BATCH_BYTES:
            stats_flush()
        spent[0] += time.perf_counter() - t0
        return qw

    def flush(members: Dict[str, Tuple[str, Any]]) -> Iterator[Tuple[str, Any]]:
        t0 = time.perf_counter()
        ws = {m: (n, t.detach().to(param_dtype) if param_dtype is not None else t.detach())
              for m, (n, t) in members.items()}
        amax = None
        if nvfp4 and len(ws) > 1:
            ts = [t for _, t in ws.values()]
            with torch.no_grad():
                if all(t.is_cuda for t in ts) and len({(t.device, t.dtype) for t in ts}) == 1:
                    # one call: an amax pass per member, one fold, the first member left in L2
                    amax = quantizer.amax_many([t.contiguous() for t in ts])
                else:
                    amax = torch.stack([t.abs().amax().float() for t in ts]).amax()
        spent[0] += time.perf_counter() - t0
        for m, (n, t) in ws.items():
            yield n, fq(t, amax)

    for name, t in named_tensors:
        key = normalize_name(name)
        mod, _, leaf = key.rpartition(".")
        if leaf != "weight" or mod not in expected:
            yield name, t
            continue
        seen.add(mod)
        group = groups.get(mod)
        if group is None or len(group) < 2:
            yield name, fq(t)
            continue
        bucket = pending.setdefault(group, {})
        bucket[mod] = (name, t)
        if len(bucket) == len(group):
            yield from flush(pending.pop(group))
    for group in list(pending):
        yield from flush(pending.pop(group))
    missing = sorted(expected - seen)
    if missing:
        raise VerlPluginError(
            f"the weight sync sent no weight for {len(missing)} of {len(expected)} fake-quantized modules "
            f"(first: {missing[0]}.weight): the sync's names do not match the actor model's, so the "
            "rollout would run unquantized weights"
        )
    t0 = time.perf_counter()
    stats_flush()
    stats: Dict[str, float] = {"tensors": float(len(errs))}
    if errs:
        e = torch.stack([x.to(errs[0].device) for x in errs]).square()
        r = torch.stack([x.to(errs[0].device) for x in refs]).square()
        tot_e, tot_r = float(e.sum()), float(r.sum())
        per = (e / r.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        stats["rel_error"] = math.sqrt(tot_e / tot_r) if tot_r > 0 else 0.0
        stats["max_rel_error"] = float(per.max())
        stats["sqnr_db"] = 10 * math.log10(tot_r / tot_e) if tot_e > 0 else float("inf")
    stats["fake_quant_s"] = spent[0] + time.perf_counter() - t0
    if on_done is not None:
        on_done(stats)


def _stats_key() -> Optional[bytes]:
    ray = sys.modules.get("ray")
    try:  # only inside a Ray job: get_runtime_context() would start a local Ray instance
        if ray is None or not ray.is_initialized():
            return None
        return f"aqn_rs/quant_stats/{ray.get_runtime_context().get_job_id()}".encode()
    except Exception:
        return None


def _publish_stats(stats: Dict[str, float]) -> None:
    """Rank 0 of the actor puts the last sync's statistics in Ray's cluster key-value store,
    where the trainer reads them when it logs the step."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        key = _stats_key()
        if key is None:
            return
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            internal_kv._internal_kv_put(key, json.dumps(stats).encode(), overwrite=True)
    except Exception as e:  # statistics are best effort; training goes on
        logger.warning("aqn_rs: could not publish quantization statistics: %s", e)


def _read_stats() -> Optional[Dict[str, float]]:
    try:
        key = _stats_key()
        if key is None:
            return None
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return None
        raw = internal_kv._internal_kv_get(key)
        return None if raw is None else json.loads(raw)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Rollout side: AQN on the vLLM model
# ---------------------------------------------------------------------------------------------


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


def _vllm_noise_class():
    class VllmNoise(AqnNoise):
        """`AqnNoise` on a vLLM model: fused and tensor-parallel Linear weights get the rows
        (columns) of the noise the actor draws for the unfused HF weights."""

        def bind(self, model: Any) -> None:
            self._layouts: Dict[str, Optional[_Layout]] = {}
            for name, module in model.named_modules():
                w = getattr(module, "weight", None)
                if name and hasattr(w, "dim") and self.selects(name, module):
                    self._layouts[canonical_name(name)] = vllm_layout(canonical_name(name), module, w)

        def _member_selected(self, member: str) -> bool:
            return self.selector.decide(member, "Linear")[0]

        def selects(self, name: str, module: Any) -> bool:
            members = VLLM_FUSED.get(name.rpartition(".")[2])
            if members is None or "linear" not in self.selector.layer_types:
                return super().selects(name, module)
            if not self.selector.decide(name, class_name_of(module))[0]:
                return False
            parent = name.rpartition(".")[0]
            return any(self._member_selected(f"{parent}.{m}" if parent else m) for m in members)

        def noise_for(self, name, weight, step=None):
            import torch

            lay = getattr(self, "_layouts", {}).get(name)
            if lay is None:
                return super().noise_for(name, weight, step)
            step = self.step if step is None else int(step)
            sigma = self.sigma(step)
            with torch.no_grad():
                if sigma == 0.0:
                    return torch.zeros_like(weight, memory_format=torch.contiguous_format)
                parts = []
                for member, row0, n in lay.rows:
                    width = lay.cols[1] if lay.cols else lay.full_cols
                    if not self._member_selected(member):
                        parts.append(torch.zeros((n, width), dtype=torch.float32, device=weight.device))
                        continue
                    z = gaussian_noise((n, lay.full_cols), self.seed, step, canonical_name(member), sigma,
                                       dtype=torch.float32, device=weight.device, offset=row0 * lay.full_cols)
                    if lay.cols is not None:
                        z = z[:, lay.cols[0]: lay.cols[0] + lay.cols[1]]
                    parts.append(z)
                z = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
                if self.relative:
                    if lay.cols is not None and lay.cols[1] != lay.full_cols:
                        raise VerlPluginError(
                            f"{NOISE_BLOCK}.relative with Linear noise on the column-sharded {name} "
                            "(tensor parallelism): its per-row RMS spans other ranks; use "
                            "actor_rollout_ref.rollout.tensor_model_parallel_size=1 or relative=false"
                        )
                    z = z * _channel_rms(weight)
                return z.contiguous().to(weight.dtype)

    return VllmNoise


_VLLM_STATE: Dict[int, Dict[str, Any]] = {}
_VLLM_LOCK = threading.Lock()


def _worker_models(worker: Any) -> List[Any]:
    it = getattr(worker, "_iter_all_models", None)
    if callable(it):
        return list(it())
    return [worker.model_runner.model]


def vllm_worker_apply(worker: Any, step: int, noise_injection: Mapping[str, Any], total_steps: int) -> int:
    """`vLLMColocateWorkerExtension.aqn_rs_apply`: put the noise of global step `step` on the
    worker's rollout model(s) in place (clean weights cached; a weight written by a sync since
    is taken as the new clean weight). Returns the number of tensors noised."""
    cfg = parse_config(None, noise_injection, total_steps)
    if cfg.noise is None:
        return 0
    key = json.dumps(cfg.forwarded(), sort_keys=True)
    with _VLLM_LOCK:
        st = _VLLM_STATE.get(id(worker))
        models = _worker_models(worker)
        if st is None or st["key"] != key or len(st["noises"]) != len(models):
            if st is not None:  # config changed: put the old clean weights back first
                for noise, model in zip(st["noises"], models):
                    noise.restore_(model)
            cls = _vllm_noise_class()
            st = {"key": key, "noises": [cls.from_config(cfg.noise, int(total_steps), apply_to="rollout")
                                         for _ in models]}
            _VLLM_STATE[id(worker)] = st
        count = 0
        for noise, model in zip(st["noises"], models):
            noise.bind(model)
            count += noise.apply_(model, int(step))
        return count


def vllm_worker_restore(worker: Any) -> int:
    """`vLLMColocateWorkerExtension.aqn_rs_restore`: the clean weights back (validation)."""
    with _VLLM_LOCK:
        st = _VLLM_STATE.get(id(worker))
        if st is None:
            return 0
        return sum(noise.restore_(model) for noise, model in zip(st["noises"], _worker_models(worker)))


# ---------------------------------------------------------------------------------------------
# Trainer side
# ---------------------------------------------------------------------------------------------


class TrainerState:
    """The trainer process's view: the config, the noise step the rollout replicas hold, and
    whether a validation is running (no noise then)."""

    def __init__(self, cfg: PluginConfig) -> None:
        self.cfg = cfg
        self.sched = cfg.scheduler()
        self.validating = False
        self.applied_step: Optional[int] = None

    def rpc_kwargs(self, step: int) -> Dict[str, Any]:
        return {"step": int(step), "noise_injection": self.cfg.noise, "total_steps": int(self.cfg.total_steps)}

    def metrics(self, step: int) -> Dict[str, float]:
        """What the plugin adds to the metrics logged at global step `step`: the sigma and stage
        of the noise that generated this step's rollouts (that of step - 1), and the last
        weight sync's quantization error."""
        out: Dict[str, float] = {}
        if self.sched is not None and step >= 1:
            out["aqn/sigma"] = float(self.sched.sigma(step - 1))
            out["aqn/stage"] = float(self.sched.stage(step - 1))
        if self.cfg.quantization is not None:
            stats = _read_stats()
            if stats:
                for k in ("rel_error", "max_rel_error", "sqnr_db", "tensors", "fake_quant_s"):
                    if isinstance(stats.get(k), (int, float)) and math.isfinite(stats[k]):
                        out[f"quant/{k}"] = float(stats[k])
        return out


_TRAINER: Optional[TrainerState] = None


def _trainer_setup(trainer: Any) -> None:
    """After the trainer knows its step count: validate, forward to the workers, keep state."""
    global _TRAINER
    cfg = config_from_trainer(trainer.config)
    if not cfg.active:
        _TRAINER = None
        return
    total = getattr(trainer, "total_training_steps", None)
    if not total:
        raise VerlPluginError("the trainer has no total_training_steps yet; the AQN schedule needs it")
    cfg = dataclasses.replace(cfg, total_steps=int(total))
    arr = trainer.config.actor_rollout_ref
    strategy = str(arr.actor.get("strategy", "fsdp"))
    if (cfg.quantization is not None or cfg.actor_noise) and strategy not in ("fsdp", "fsdp2"):
        raise VerlPluginError(f"actor_rollout_ref.actor.strategy={strategy}: the aqn_rs plugin hooks the FSDP "
                              "engine only (fsdp or fsdp2)")
    rollout = str(arr.rollout.get("name", "vllm"))
    if rollout != "vllm" and (cfg.quantization is not None or cfg.rollout_noise):
        raise VerlPluginError(f"actor_rollout_ref.rollout.name={rollout}: the aqn_rs plugin drives the vLLM "
                              "rollout only (rollout.name=vllm)")
    from omegaconf import open_dict

    with open_dict(trainer.config):
        with open_dict(arr):
            arr[FORWARD_KEY] = cfg.forwarded()
    _TRAINER = TrainerState(cfg)
    verl_probe.write_meta(cfg.forwarded())
    logger.warning("aqn_rs: %s; AQN: %s; schedule over %d global steps", cfg.quantization, cfg.noise, cfg.total_steps)


def _replica_handles(replicas: Iterable[Any]) -> List[Any]:
    out = []
    for r in replicas or ():
        h = getattr(r, "server_handle", None)
        if h is None:
            servers = getattr(r, "servers", None) or []
            h = servers[0] if servers else None
        if h is not None:
            out.append(h)
    return out


def _rpc_error(method: str, e: BaseException) -> VerlPluginError:
    text = str(e)
    # vLLM 0.24's collective_rpc says "Method ... is not implemented." (serial_utils.py)
    if method in text and ("attribute" in text or "not found" in text.lower() or "not implemented" in text):
        return VerlPluginError(
            f"the vLLM workers have no {method}: they did not import {PLUGIN}. Pass "
            f"+ray_kwargs.ray_init.runtime_env.env_vars.{ENV_MODULES}={PLUGIN} so every verl "
            "process, the vLLM worker processes included, imports the plugin"
        )
    return VerlPluginError(f"aqn_rs: {method} on the vLLM replicas failed: {text.splitlines()[-1] if text else e!r}")


async def _rpc_async(replicas: Iterable[Any], method: str, kwargs: Dict[str, Any]) -> None:
    refs = [h.collective_rpc.remote(method, kwargs=kwargs) for h in _replica_handles(replicas)]
    try:
        await asyncio.gather(*refs)
    except Exception as e:
        raise _rpc_error(method, e) from e


def _rpc_sync(replicas: Iterable[Any], method: str, kwargs: Dict[str, Any]) -> None:
    import ray

    refs = [h.collective_rpc.remote(method, kwargs=kwargs) for h in _replica_handles(replicas)]
    try:
        ray.get(refs)
    except Exception as e:
        raise _rpc_error(method, e) from e


def _clear_prefix_cache_sync(replicas: Iterable[Any]) -> None:
    """Drop the servers' cached KV blocks (vLLMHttpServer.clear_kv_cache: the prefix cache).

    vLLM's prefix cache keys blocks by token ids only, so blocks computed on noisy gains would
    be reused by a validation prompt with the same chat-template prefix on clean weights, and
    the other way round after it. verl resets the cache when it wakes the engine or loads new
    weights; the plugin swaps gains without either, so it resets the cache itself."""
    handles = [h for h in _replica_handles(replicas) if hasattr(h, "clear_kv_cache")]
    if not handles:
        return
    import ray

    try:
        ray.get([h.clear_kv_cache.remote() for h in handles])
    except Exception as e:  # a server method, not a worker extension: no missing-plugin hint
        raise VerlPluginError(f"aqn_rs: clear_kv_cache on the vLLM servers failed: {e}") from e


def _after_sync_step(state: Optional[TrainerState], global_steps: Any) -> Optional[int]:
    """The step whose noise the replicas get after a sync, or None (no rollout noise,
    validating, or a sync without a step, e.g. verl's wake-up during validation)."""
    if state is None or not state.cfg.rollout_noise or state.validating or global_steps is None:
        return None
    return int(global_steps)


def _probe_tag(kind: str, args: tuple, kwargs: Dict[str, Any]) -> Optional[str]:
    """The `verl_probe` record name of the replicas' state after a sync (`kind` synced /
    noised) of a probed step, or None."""
    gs = _arg(args, kwargs, 0, "global_steps")
    if _TRAINER is None or _TRAINER.validating or not verl_probe.probes(gs):
        return None
    return f"s{int(gs)}-{kind}"


async def _noise_replicas_async(replicas: Iterable[Any], args: tuple, kwargs: Dict[str, Any]) -> None:
    """After `update_weights(global_steps)`: the replicas get that step's noise (async RPC)."""
    tag = _probe_tag("synced", args, kwargs)
    if tag:
        await _rpc_async(replicas, "aqn_rs_probe", {"tag": tag})
    step = _after_sync_step(_TRAINER, _arg(args, kwargs, 0, "global_steps"))
    if step is not None:
        await _rpc_async(replicas, "aqn_rs_apply", _TRAINER.rpc_kwargs(step))
        _TRAINER.applied_step = step
        tag = _probe_tag("noised", args, kwargs)
        if tag:
            await _rpc_async(replicas, "aqn_rs_probe", {"tag": tag})


def _noise_replicas_sync(replicas: Iterable[Any], args: tuple, kwargs: Dict[str, Any]) -> None:
    """`_noise_replicas_async` for a synchronous `update_weights`."""
    tag = _probe_tag("synced", args, kwargs)
    if tag:
        _rpc_sync(replicas, "aqn_rs_probe", {"tag": tag})
    step = _after_sync_step(_TRAINER, _arg(args, kwargs, 0, "global_steps"))
    if step is not None:
        _rpc_sync(replicas, "aqn_rs_apply", _TRAINER.rpc_kwargs(step))
        _TRAINER.applied_step = step
        tag = _probe_tag("noised", args, kwargs)
        if tag:
            _rpc_sync(replicas, "aqn_rs_probe", {"tag": tag})


# ---------------------------------------------------------------------------------------------
# The wrappers installed on verl's classes
# ---------------------------------------------------------------------------------------------

_ACTOR_PENDING: Optional[PluginConfig] = None
_MARK = "__aqn_rs_patched__"


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _wrap_init_model(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def init_model(self, *args, **kwargs):
        global _ACTOR_PENDING
        cfg = _config_from_forwarded(self.config.get(FORWARD_KEY) if hasattr(self.config, "get") else None)
        builds_actor = "actor" in str(getattr(self, "role", ""))
        needs_hooks = cfg is not None and builds_actor and (cfg.quantization is not None or cfg.actor_noise)
        if needs_hooks:
            _check_actor_settings(self.config, cfg)
        _ACTOR_PENDING = cfg if needs_hooks else None
        try:
            out = orig(self, *args, **kwargs)
        finally:
            _ACTOR_PENDING = None
        if needs_hooks:
            engine = getattr(getattr(self, "actor", None), "engine", None)
            if getattr(engine, "_aqn_rs_actor", None) is None:
                raise VerlPluginError(
                    f"the actor engine {type(engine).__name__} was built without FSDPEngine._build_fsdp_module, "
                    "so no fake quant / AQN hooks were installed (supported: actor strategy fsdp or fsdp2)"
                )
            logger.warning("aqn_rs: actor hooks installed: %d fake-quantized Linear modules, actor AQN %s",
                           len(engine._aqn_rs_actor.quant_modules), engine._aqn_rs_actor.noise is not None)
        return out

    return init_model


def _check_actor_settings(config: Any, cfg: PluginConfig) -> None:
    actor = config.get("actor") or {}
    strategy = str(actor.get("strategy", "fsdp"))
    if strategy not in ("fsdp", "fsdp2"):
        raise VerlPluginError(f"actor_rollout_ref.actor.strategy={strategy}: the aqn_rs plugin hooks the FSDP engine only")
    model = config.get("model") or {}
    lora = model.get("lora") or {}
    if cfg.quantization is not None and lora.get("merge", False):
        raise VerlPluginError(
            "actor_rollout_ref.model.lora.merge=True with fake quant: the merged weight Q(W + BA) is not what "
            "the actor computes (Q(W) + BA); sync LoRA as adapters (lora.merge=False)"
        )
    fsdp = actor.get("fsdp_config") or {}
    if cfg.actor_noise and strategy == "fsdp" and not fsdp.get("use_orig_params", False):
        raise VerlPluginError(
            "actor AQN (trainer.noise_injection.apply_to actor/both) under FSDP1 without use_orig_params: FSDP1 "
            "then keeps no weight Parameter on the modules for the noise to stand in for; use "
            "actor_rollout_ref.actor.strategy=fsdp2 (aqn-rs run does) or "
            "actor_rollout_ref.actor.fsdp_config.use_orig_params=True"
        )
    qat = actor.get("qat") or fsdp.get("qat") or {}
    if cfg.quantization is not None and qat.get("enable", False):
        raise VerlPluginError("verl's own QAT (actor_rollout_ref.actor.*.qat.enable=True) and aqn_rs fake quant "
                              "are both on; use one of them")


def _param_dtype(engine_config: Any):
    import torch

    mp = getattr(engine_config, "mixed_precision", None)
    name = mp.get("param_dtype", "bf16") if mp is not None and hasattr(mp, "get") else "bf16"
    try:
        from verl.utils.torch_dtypes import PrecisionType

        return PrecisionType.to_dtype(name)
    except Exception:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(str(name), torch.bfloat16)


def _wrap_build_fsdp_module(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _build_fsdp_module(self, module, *args, **kwargs):
        cfg = _ACTOR_PENDING
        forward_only = bool(getattr(getattr(self, "engine_config", None), "forward_only", False))
        if cfg is not None and not forward_only and getattr(self, "_aqn_rs_actor", None) is None:
            self._aqn_rs_actor = ActorState(module, cfg, _param_dtype(self.engine_config))
        return orig(self, module, *args, **kwargs)

    return _build_fsdp_module


def _wrap_get_per_tensor_param(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def get_per_tensor_param(self, *args, **kwargs):
        gen, peft_config = orig(self, *args, **kwargs)
        st = getattr(self, "_aqn_rs_actor", None)
        if st is None or st.handle is None:
            return gen, peft_config
        if peft_config is not None and _arg(args, kwargs, 1, "base_sync_done", False):
            return gen, peft_config  # LoRA adapters only; the (fake-quantized) base is in vLLM already
        return st.wrap_sync(gen), peft_config

    return get_per_tensor_param


def _wrap_refuse_with_quant(orig: Callable, what: str) -> Callable:
    @functools.wraps(orig)
    def refuse(self, *args, **kwargs):
        st = getattr(self, "_aqn_rs_actor", None)
        if st is not None and st.handle is not None:
            raise VerlPluginError(f"{what}: this weight-sync path bypasses the fake quant; use "
                                  "actor_rollout_ref.rollout.checkpoint_engine.backend=naive (the default)")
        return orig(self, *args, **kwargs)

    return refuse


def _wrap_invalidate_after(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        st = getattr(self, "_aqn_rs_actor", None)
        if st is not None:
            st.invalidate()
        return out

    return wrapper


def _wrap_worker_update_weights(orig: Callable) -> Callable:
    def set_step(self, args, kwargs):
        gs = _arg(args, kwargs, 0, "global_steps")
        engine = getattr(getattr(self, "actor", None), "engine", None)
        st = getattr(engine, "_aqn_rs_actor", None)
        if st is not None and gs is not None:
            st.set_step(int(gs))

    if inspect.iscoroutinefunction(orig):

        @functools.wraps(orig)
        async def update_weights(self, *args, **kwargs):
            set_step(self, args, kwargs)
            return await orig(self, *args, **kwargs)

    else:

        @functools.wraps(orig)
        def update_weights(self, *args, **kwargs):
            set_step(self, args, kwargs)
            return orig(self, *args, **kwargs)

    return update_weights


def _wrap_manager_update_weights(orig: Callable) -> Callable:
    """`CheckpointEngineManager.update_weights(global_steps)`: after the sync, the replicas get
    the step's noise. verl decorates it with `auto_await`, which decides from the caller's frame
    whether to return a coroutine; the wrapper is re-decorated the same way."""
    inner = getattr(orig, "__wrapped__", None)
    if inner is not None and inspect.iscoroutinefunction(inner):
        from verl.utils.ray_utils import auto_await

        async def update_weights(self, *args, **kwargs):
            out = await inner(self, *args, **kwargs)
            await _noise_replicas_async(self.replicas, args, kwargs)
            return out

        functools.update_wrapper(update_weights, inner)
        wrapped = auto_await(update_weights)
        return wrapped
    if inspect.iscoroutinefunction(orig):

        @functools.wraps(orig)
        async def update_weights_async(self, *args, **kwargs):
            out = await orig(self, *args, **kwargs)
            await _noise_replicas_async(self.replicas, args, kwargs)
            return out

        return update_weights_async

    @functools.wraps(orig)
    def update_weights_sync(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        _noise_replicas_sync(self.replicas, args, kwargs)
        return out

    return update_weights_sync


def _wrap_validate(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def _validate(self, *args, **kwargs):
        st = _TRAINER
        if st is None or not st.cfg.rollout_noise:
            return orig(self, *args, **kwargs)
        replicas = getattr(getattr(self, "checkpoint_manager", None), "replicas", None) or []
        st.validating = True
        try:
            _rpc_sync(replicas, "aqn_rs_restore", {})
            _clear_prefix_cache_sync(replicas)
            if st.applied_step is not None and verl_probe.probes(st.applied_step):
                _rpc_sync(replicas, "aqn_rs_probe", {"tag": f"v{st.applied_step}-clean"})
            return orig(self, *args, **kwargs)
        finally:
            st.validating = False
            if st.applied_step is not None:
                _rpc_sync(replicas, "aqn_rs_apply", st.rpc_kwargs(st.applied_step))
                _clear_prefix_cache_sync(replicas)

    return _validate


def _wrap_after_dataloader(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        _trainer_setup(self)
        return out

    return wrapper


def _wrap_tracking_log(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def log(self, data, step, *args, **kwargs):
        st = _TRAINER
        if st is not None and isinstance(data, dict) and "training/global_step" in data:
            try:
                extra = st.metrics(int(step))
            except Exception as e:  # logging must never stop training
                logger.warning("aqn_rs: metrics for step %s failed: %s", step, e)
                extra = {}
            if extra:
                data = {**data, **extra}
        return orig(self, data, step, *args, **kwargs)

    return log


def _aqn_rs_apply(self, step: int, noise_injection: Mapping[str, Any], total_steps: int) -> int:
    return vllm_worker_apply(self, step, noise_injection, total_steps)


def _aqn_rs_restore(self) -> int:
    return vllm_worker_restore(self)


def _aqn_rs_probe(self, tag: str) -> int:
    with _VLLM_LOCK:
        return verl_probe.worker_dump(self, tag, _worker_models(self))


def _add_worker_methods(cls: type) -> None:
    cls.aqn_rs_apply = _aqn_rs_apply
    cls.aqn_rs_restore = _aqn_rs_restore
    cls.aqn_rs_probe = _aqn_rs_probe


# ---------------------------------------------------------------------------------------------
# Patch points
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatchPoint:
    """A class attribute of verl the plugin wraps (or, with `attr` None, a class it extends).

    `group`: points of one group are all present or all absent (a verl trainer generation:
    `v0` = RayPPOTrainer, `v1` = the 0.9 PPOTrainer); at least one trainer group must exist.
    `optional`: absent in some supported versions, wrapped when present.
    """

    module: str
    cls: str
    attr: Optional[str]
    process: str
    why: str
    wrap: Optional[Callable] = None
    group: Optional[str] = None
    optional: bool = False

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.cls}" + (f".{self.attr}" if self.attr else "")


_FSDP = "verl.workers.engine.fsdp.transformer_impl"
_WORKERS = "verl.workers.engine_workers"
_V0 = "verl.trainer.ppo.ray_trainer"
_V1 = "verl.trainer.ppo.v1.trainer_base"
_VLLM_UTILS = "verl.workers.rollout.vllm_rollout.utils"

PATCH_POINTS: Tuple[PatchPoint, ...] = (
    PatchPoint(_WORKERS, "ActorRolloutRefWorker", "init_model", "actor",
               "reads the forwarded config before the actor model is built", _wrap_init_model),
    PatchPoint(_WORKERS, "ActorRolloutRefWorker", "update_weights", "actor",
               "the global step of each weight sync (the actor's noise step)", _wrap_worker_update_weights),
    PatchPoint(_FSDP, "FSDPEngine", "_build_fsdp_module", "actor",
               "W4A16 hooks and actor AQN on the HF model before FSDP wraps it", _wrap_build_fsdp_module),
    PatchPoint(_FSDP, "FSDPEngine", "get_per_tensor_param", "actor",
               "the weight-sync generator into vLLM's load_weights", _wrap_get_per_tensor_param),
    PatchPoint(_FSDP, "FSDPEngine", "optimizer_step", "actor",
               "drops cached fused-group amaxes after each optimizer step", _wrap_invalidate_after),
    PatchPoint(_FSDP, "FSDPEngine", "load_checkpoint", "actor",
               "drops cached fused-group amaxes after a checkpoint load", _wrap_invalidate_after, optional=True),
    PatchPoint(_FSDP, "FSDPEngine", "get_per_tensor_param_shard", "actor",
               "refused with fake quant (bypasses the sync wrapper)",
               lambda f: _wrap_refuse_with_quant(f, "get_per_tensor_param_shard"), optional=True),
    PatchPoint(_FSDP, "FSDPEngine", "get_per_tensor_param_delta_shard", "actor",
               "refused with fake quant (bypasses the sync wrapper)",
               lambda f: _wrap_refuse_with_quant(f, "get_per_tensor_param_delta_shard"), optional=True),
    PatchPoint("verl.checkpoint_engine.base", "CheckpointEngineManager", "update_weights", "trainer",
               "after each weight sync, every vLLM replica gets the step's AQN", _wrap_manager_update_weights),
    PatchPoint(_V0, "RayPPOTrainer", "_create_dataloader", "trainer",
               "validates the blocks, forwards them with the step count to the workers",
               _wrap_after_dataloader, group="v0"),
    PatchPoint(_V0, "RayPPOTrainer", "_validate", "trainer", "validation runs on clean rollout weights",
               _wrap_validate, group="v0"),
    PatchPoint(_V1, "PPOTrainer", "_init_dataloader", "trainer",
               "validates the blocks, forwards them with the step count to the workers",
               _wrap_after_dataloader, group="v1"),
    PatchPoint(_V1, "PPOTrainer", "_validate", "trainer", "validation runs on clean rollout weights",
               _wrap_validate, group="v1"),
    PatchPoint("verl.utils.tracking", "Tracking", "log", "trainer", "adds aqn/* and quant/* to the logged metrics",
               _wrap_tracking_log),
    PatchPoint("verl.workers.rollout.replica", "RolloutReplica", "server_handle", "trainer",
               "the vLLM server of each replica (collective_rpc target)"),
    PatchPoint("verl.workers.rollout.vllm_rollout.vllm_async_server", "vLLMHttpServer", "collective_rpc",
               "rollout", "runs aqn_rs_apply / aqn_rs_restore in the vLLM worker processes"),
    PatchPoint(_VLLM_UTILS, "vLLMColocateWorkerExtension", None, "rollout",
               "gains aqn_rs_apply / aqn_rs_restore (the vLLM worker side)", _add_worker_methods),
)


def _verl_version() -> Optional[str]:
    mod = sys.modules.get("verl")
    v = getattr(mod, "__version__", None) if mod is not None else None
    if v:
        return str(v)
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("verl")
    except PackageNotFoundError:
        return None
    except Exception:
        return None


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _missing_error(point: PatchPoint, detail: str) -> VerlPluginError:
    return VerlPluginError(
        f"verl {_verl_version() or '?'} has no {point.qualname} ({detail}), which the aqn_rs plugin "
        f"patches: {point.why}. Checked verl versions: {', '.join(CHECKED_VERL)}"
    )


def _module_file(module: str) -> Optional[str]:
    """The source file of a verl module, located from the `verl` package's folder without
    importing anything (the rollout modules import vLLM)."""
    try:
        spec = importlib.util.find_spec("verl")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    parts = module.split(".")[1:]
    for root in spec.submodule_search_locations:
        base = os.path.join(root, *parts)
        for path in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(path):
                return path
    return None


def _class_attrs(path: str, cls: str) -> Optional[set]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            names = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            return names
    return None


def check_patch_points() -> List[str]:
    """Problems with the installed verl, read from its sources (no vLLM needed): each a line
    naming the missing class or method. An empty list means every patch point exists.

    Raises:
        VerlPluginError: verl is not installed, or older than 0.8.0.
    """
    v = _verl_version()
    if v is None:
        raise VerlPluginError("verl is not installed (pip install verl; the plugin was checked against "
                              f"{', '.join(CHECKED_VERL)})")
    if _version_tuple(v) < MIN_VERL:
        raise VerlPluginError(f"verl {v} is older than 0.8.0, the first release with the engine workers the "
                              "aqn_rs plugin patches")
    problems: List[str] = []
    groups: Dict[str, List[bool]] = {}
    for p in PATCH_POINTS:
        path = _module_file(p.module)
        attrs = _class_attrs(path, p.cls) if path else None
        ok = attrs is not None and (p.attr is None or p.attr in attrs)
        if p.group is not None:
            groups.setdefault(p.group, []).append(ok)
            continue
        if not ok and not p.optional:
            what = "module" if path is None else ("class" if attrs is None else "method")
            problems.append(f"{p.qualname}: {what} not found ({p.why})")
    present = [g for g, oks in groups.items() if all(oks)]
    for g, oks in groups.items():
        if any(oks) and not all(oks):
            missing = [p.qualname for p in PATCH_POINTS if p.group == g]
            problems.append(f"trainer {g}: only part of {missing} exists")
    if not present:
        problems.append("no verl trainer with the patch points (RayPPOTrainer or v1 PPOTrainer) found")
    return problems


# -- post-import patching --------------------------------------------------------------------

_PENDING: Dict[str, List[PatchPoint]] = {}
_APPLIED: List[str] = []


def patched_points() -> List[str]:
    """Qualified names of the verl attributes patched so far in this process."""
    return list(_APPLIED)


def _apply(point: PatchPoint, module: Any) -> None:
    cls = getattr(module, point.cls, None)
    if cls is None:
        if point.optional:
            return
        raise _missing_error(point, "class not found")
    if point.attr is None:
        if point.wrap is not None and not cls.__dict__.get(_MARK):
            point.wrap(cls)
            setattr(cls, _MARK, True)
        _APPLIED.append(point.qualname)
        return
    current = inspect.getattr_static(cls, point.attr, None)
    if current is None:
        if point.optional:
            return
        raise _missing_error(point, "method not found")
    if point.wrap is None or getattr(current, _MARK, False):
        _APPLIED.append(point.qualname)
        return
    if isinstance(current, (staticmethod, classmethod, property)):
        raise _missing_error(point, f"it is a {type(current).__name__}, not a method")
    wrapped = point.wrap(current)
    setattr(wrapped, _MARK, True)
    setattr(cls, point.attr, wrapped)
    _APPLIED.append(point.qualname)


def _run_pending(name: str, module: Any) -> None:
    for point in _PENDING.pop(name, []):
        _apply(point, module)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module before anyone can use it."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec) if hasattr(self._inner, "create_module") else None

    def exec_module(self, module) -> None:
        module.__loader__ = self._inner
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        _run_pending(self._name, module)

    def __getattr__(self, item):
        return getattr(self._inner, item)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


_FINDER = _PatchingFinder()


def _install() -> None:
    """Patch what is imported already; patch the rest when verl imports it."""
    v = _verl_version()
    if v is not None and _version_tuple(v) < MIN_VERL:
        raise VerlPluginError(f"verl {v} is older than 0.8.0, the first release with the engine workers the "
                              f"aqn_rs plugin patches (checked: {', '.join(CHECKED_VERL)})")
    late = []
    for point in PATCH_POINTS:
        mod = sys.modules.get(point.module)
        spec = getattr(mod, "__spec__", None)
        if mod is not None and not getattr(spec, "_initializing", False):
            late.append(point.module)
            _apply(point, mod)
        else:
            _PENDING.setdefault(point.module, []).append(point)
    if _PENDING and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    if _WORKERS in late and PLUGIN not in os.environ.get(ENV_MODULES, "").split(","):
        ray = sys.modules.get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            raise VerlPluginError(
                f"{PLUGIN} was imported after verl's workers (through external_lib only?): set "
                f"+ray_kwargs.ray_init.runtime_env.env_vars.{ENV_MODULES}={PLUGIN} so the trainer and the vLLM "
                "worker processes import it too"
            )


_install()

