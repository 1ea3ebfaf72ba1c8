"""aqn-rs as a verl plugin: W4A16 fake quant and AQN in verl's GRPO/PPO runs, without a fork.

Load it in every verl process with two settings (docs/guides/VERL.md has a copy-paste command)::

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

The package, one concern a module (each imports only the ones listed above it):

* `config`: the plugin's names in verl's config and environment, the two blocks' defaults and
  checks (`parse_config`, `PluginConfig`), the copy forwarded to the workers. Torch-free.
* `names`: HF and vLLM module names: which Linear modules get fake quant (`select_linear`) and
  how a fused or tensor-parallel vLLM weight maps onto the unfused HF weights (`vllm_layout`).
* `sync`: the fake-quantized weight sync (`quant_sync`) and its error statistics, published
  through Ray's key-value store for the trainer.
* `actor`: `ActorState`, the hooks on the actor's HF model and its weight-sync stream.
* `rollout`: AQN on the vLLM workers' models (`vllm_worker_apply`, `vllm_worker_restore`).
* `trainer`: `TrainerState` (the process's `_TRAINER`), the logged metrics and the RPCs to the
  vLLM replicas.
* `patches`: the wrappers installed on verl's classes, `PATCH_POINTS` and `check_patch_points`.
* `finder`: installing the patch points now or, through a meta-path finder, when verl imports
  the module concerned; `patched_points`.
* `__main__`: `python -m aqn_rs.integrations.verl [--check]`.

What code outside the package used from the single module `verl.py` (`__all__`, the public
names it defined, the private helpers the tests and scripts call) is importable from here as
before; `main` moved to `__main__`. The state rebound at run time is not: it has one owner to
read and set it in (`trainer._TRAINER`, `patches._ACTOR_PENDING`, `sync._STATS_BATCH_BYTES`),
and a copy here would go stale.
"""

from __future__ import annotations

# The `x as x` imports re-export names the single module had outside __all__ (helpers that
# tests/integration/test_verl_plugin.py, scripts/verl_gpu_check.py and scripts/verl_stack.sh
# call, and the shared names tests/unit/test_constants.py checks), so that
# `aqn_rs.integrations.verl.x` still works.
from ...constants import VLLM_FUSED as VLLM_FUSED
from ...errors import VerlPluginError
from ...selection import is_adapter as is_adapter
from ...selection import normalize_name as normalize_name
from ...selection import vllm_alias as vllm_alias
from .actor import ActorState as ActorState
from .config import CHECKED_VERL, PluginConfig, parse_config
from .config import DEFAULT_EXCLUDE as DEFAULT_EXCLUDE
from .config import ENV_MODULES as ENV_MODULES
from .config import FORWARD_KEY as FORWARD_KEY
from .config import MIN_VERL as MIN_VERL
from .config import NOISE_BLOCK as NOISE_BLOCK
from .config import NOISE_DEFAULTS as NOISE_DEFAULTS
from .config import PLUGIN as PLUGIN
from .config import QUANT_BLOCK as QUANT_BLOCK
from .config import QUANT_DEFAULTS as QUANT_DEFAULTS
from .config import _config_from_forwarded as _config_from_forwarded
from .config import config_from_trainer as config_from_trainer
from .finder import _apply as _apply
from .finder import _install, patched_points
from .names import select_linear as select_linear
from .names import vllm_layout as vllm_layout
from .patches import _VLLM_UTILS as _VLLM_UTILS
from .patches import PATCH_POINTS, PatchPoint, check_patch_points
from .patches import _aqn_rs_apply as _aqn_rs_apply
from .patches import _aqn_rs_probe as _aqn_rs_probe
from .patches import _aqn_rs_restore as _aqn_rs_restore
from .patches import _check_actor_settings as _check_actor_settings
from .patches import _module_file as _module_file
from .patches import _verl_version as _verl_version
from .patches import _wrap_build_fsdp_module as _wrap_build_fsdp_module
from .patches import _wrap_get_per_tensor_param as _wrap_get_per_tensor_param
from .patches import _wrap_init_model as _wrap_init_model
from .patches import _wrap_manager_update_weights as _wrap_manager_update_weights
from .patches import _wrap_refuse_with_quant as _wrap_refuse_with_quant
from .patches import _wrap_tracking_log as _wrap_tracking_log
from .patches import _wrap_validate as _wrap_validate
from .patches import _wrap_worker_update_weights as _wrap_worker_update_weights
from .rollout import _vllm_noise_class as _vllm_noise_class
from .rollout import vllm_worker_apply, vllm_worker_restore
from .sync import _stats_key as _stats_key
from .sync import quant_sync
from .trainer import TrainerState as TrainerState
from .trainer import _rpc_error as _rpc_error
from .trainer import _trainer_setup as _trainer_setup

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

# Module state rebound at run time, by the module that owns it. A copy here would go stale
# (and setting one here would change nothing), so these names say where to find them instead.
# (A ModuleType subclass could forward them both ways, but Ray's cloudpickle pickles a module by
# reference only when it is a plain module, and Ray closures capture this one.)
_STATE = {"_TRAINER": "trainer", "_ACTOR_PENDING": "patches", "_STATS_BATCH_BYTES": "sync"}


def __getattr__(name: str):
    if name in _STATE:
        raise AttributeError(f"{__name__}.{name} is state of {__name__}.{_STATE[name]}: read and set it there")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install()
