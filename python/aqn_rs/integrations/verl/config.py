"""The plugin's configuration: its names in verl's config and environment, the two blocks it
reads (`trainer.quantization`, `trainer.noise_injection`) with their defaults and checks, and the
copy the trainer forwards to the workers (`actor_rollout_ref.aqn_rs`). Torch-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

from ..._aqn_rs import SigmaScheduler
from ...constants import APPLY_TO, SCALE_MODES, STE_MODES, TRAIN_FORMATS
from ...constants import DEFAULT_EXCLUDE as _DEFAULT_EXCLUDE
from ...errors import VerlPluginError

PLUGIN = "aqn_rs.integrations.verl"
# verl releases whose sources the patch points were checked against (engine workers era).
MIN_VERL = (0, 8, 0)
CHECKED_VERL = ("0.8.0", "0.9.0", "0.9.1")
ENV_MODULES = "VERL_USE_EXTERNAL_MODULES"
# Where the trainer forwards the plugin config inside `actor_rollout_ref` (the only config
# subtree the actor workers receive).
FORWARD_KEY = "aqn_rs"


QUANT_BLOCK = "trainer.quantization"
NOISE_BLOCK = "trainer.noise_injection"
# A list, as the config a user writes in YAML has it.
DEFAULT_EXCLUDE = list(_DEFAULT_EXCLUDE)
QUANT_DEFAULTS: Dict[str, Any] = {
    "format": "none",  # none | mxfp4 | nvfp4
    "scale_mode": "floor",  # MXFP4 only (docs/reference/FORMATS.md)
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
