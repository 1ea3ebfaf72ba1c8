"""What the plugin changes in verl: the wrappers it installs on verl's classes, the table that
names each patch point with its process and reason (`PATCH_POINTS`), and the check of an
installed verl against that table, read from its sources (`check_patch_points`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import inspect
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ...errors import VerlPluginError
from .. import verl_probe
from . import trainer
from .actor import ActorState
from .config import CHECKED_VERL, FORWARD_KEY, MIN_VERL, PLUGIN, PluginConfig, _config_from_forwarded
from .rollout import _VLLM_LOCK, _worker_models, vllm_worker_apply, vllm_worker_restore
from .trainer import _arg, _noise_replicas_async, _noise_replicas_sync, _trainer_setup

# The plugin's one logger, named after the package that verl imports.
logger = logging.getLogger(PLUGIN)

# ---------------------------------------------------------------------------------------------
# The wrappers installed on verl's classes
# ---------------------------------------------------------------------------------------------
#
# The trainer's state (`trainer._TRAINER`, rebound by `_trainer_setup`) and its RPC helpers are
# read through their module: the wrappers see the current state, and helpers replaced there.

# The config `ActorRolloutRefWorker.init_model` hands to `FSDPEngine._build_fsdp_module` while
# verl builds the actor (set and read only here).
_ACTOR_PENDING: Optional[PluginConfig] = None


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
        st = trainer._TRAINER
        if st is None or not st.cfg.rollout_noise:
            return orig(self, *args, **kwargs)
        replicas = getattr(getattr(self, "checkpoint_manager", None), "replicas", None) or []
        st.validating = True
        try:
            trainer._rpc_sync(replicas, "aqn_rs_restore", {})
            trainer._clear_prefix_cache_sync(replicas)
            if st.applied_step is not None and verl_probe.probes(st.applied_step):
                trainer._rpc_sync(replicas, "aqn_rs_probe", {"tag": f"v{st.applied_step}-clean"})
            return orig(self, *args, **kwargs)
        finally:
            st.validating = False
            if st.applied_step is not None:
                trainer._rpc_sync(replicas, "aqn_rs_apply", st.rpc_kwargs(st.applied_step))
                trainer._clear_prefix_cache_sync(replicas)

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
        st = trainer._TRAINER
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
