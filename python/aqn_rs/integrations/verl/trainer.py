"""The trainer side: the process's one `TrainerState` (`_TRAINER`: the validated blocks, the
schedule, the noise step the replicas hold), set up once the trainer knows its step count; the
metrics it adds to each logged step; and the RPCs that put a step's noise on the vLLM replicas
after a weight sync.

`_TRAINER` is rebound here at run time: read and set it as `trainer._TRAINER`, never through a
copy imported elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from typing import Any, Dict, Iterable, List, Optional

from ...errors import VerlPluginError
from .. import verl_probe
from .config import ENV_MODULES, FORWARD_KEY, PLUGIN, PluginConfig, config_from_trainer
from .sync import _read_stats

# The plugin's one logger, named after the package that verl imports.
logger = logging.getLogger(PLUGIN)


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


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


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
