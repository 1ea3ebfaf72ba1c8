"""Preset files: load, merge with `_defaults.yaml`, override, validate.

A preset is one declarative YAML file in `aqn_rs/presets/` (shipped as package data): the
quantization block (format, scale mode, injection point, exclusions, STE), the plan's
`trainer.noise_injection` block, and optional overrides of the shared defaults. A path to a
YAML file works wherever a preset name does.

`load_preset(name)` returns the merged, validated dict; `quantizer_from(cfg)` and
`noise_kwargs(cfg)` map it onto the package's objects, so the tests can check a preset means
what its file says.
"""

from __future__ import annotations

import copy
import importlib.resources
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..constants import APPLY_TO, DECAYS, DEFAULT_EXCLUDE, INJECTION_POINTS, SCALE_MODES, STE_MODES, TRAIN_FORMATS
from ..quantizers import Mxfp4Quantizer, Nvfp4Quantizer
from .errors import ExperimentError

FORMATS = TRAIN_FORMATS
NOISE_LAYERS = ("linear", "rmsnorm")
MODES = ("full", "lora")

# The plan's presets, in the order of its table (docs/guides/EXPERIMENTS.md, "Presets").
PRESETS = ("baseline", "mxfp4-only", "1A", "1C", "1D", "1E", "nvfp4", "nvfp4-aqn")


def _preset_dir() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("aqn_rs") / "presets"))


def available() -> List[str]:
    """Names of the presets shipped with the package (files in aqn_rs/presets/)."""
    return sorted(p.stem for p in _preset_dir().glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: pathlib.Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ExperimentError(f"cannot read preset file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ExperimentError(f"preset file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExperimentError(f"preset file {path} must hold a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """`over` on top of `base`, recursing into mappings (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_path(name: str) -> pathlib.Path:
    """The file of a preset name (case-insensitive) or of a YAML path; ExperimentError if none."""
    p = pathlib.Path(name)
    if p.suffix in (".yaml", ".yml") and (p.exists() or "/" in name):
        if not p.exists():
            raise ExperimentError(f"preset file {name} does not exist")
        return p
    names = available()
    by_lower = {n.lower(): n for n in names}
    hit = by_lower.get(name.lower())
    if hit is None:
        raise ExperimentError(f"unknown preset {name!r}; available: {', '.join(names)} (or a path to a .yaml file)")
    return _preset_dir() / f"{hit}.yaml"


def parse_override(text: str) -> Tuple[List[str], Any]:
    """`training.learning_rate=3e-5` -> (['training', 'learning_rate'], 3e-05) (value parsed as YAML)."""
    if "=" not in text:
        raise ExperimentError(f"--set expects KEY=VALUE (e.g. training.learning_rate=3e-5), got {text!r}")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ExperimentError(f"--set has an empty key in {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):
        try:  # YAML 1.1 reads "3e-5" (no dot) as a string
            parsed = float(parsed)
        except ValueError:
            pass
    return parts, parsed


def apply_override(cfg: Dict[str, Any], parts: Sequence[str], value: Any) -> None:
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ExperimentError(f"--set {'.'.join(parts)}: {p!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def load_preset(name: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The merged, validated config of a preset name or YAML path.

    Args:
        name: a shipped preset (`baseline`, `1D`, ...) or a path to a YAML file.
        overrides: `KEY=VALUE` strings applied last (`noise_injection.sigma_start=0.01`).

    Returns:
        dict with keys name, description, plan_result, quantization, noise_injection, training,
        collapse, reward, data, model.

    Raises:
        ExperimentError: unknown preset, unreadable file, or an invalid value.
    """
    path = resolve_path(name)
    defaults = _read_yaml(_preset_dir() / "_defaults.yaml")
    cfg = deep_merge(defaults, _read_yaml(path))
    cfg.setdefault("name", path.stem)
    for o in overrides:
        apply_override(cfg, *parse_override(o))
    validate(cfg)
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ExperimentError(msg)


def _num(block: Dict[str, Any], key: str, where: str, lo: float = 0.0, integer: bool = False) -> None:
    v = block.get(key)
    if isinstance(v, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            v = block[key] = float(v)
        except ValueError:
            pass
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if integer:
        ok = ok and float(v).is_integer()
    _need(ok and v >= lo, f"{where}.{key} must be a {'whole ' if integer else ''}number >= {lo:g}, got {v!r}")


def validate(cfg: Dict[str, Any]) -> None:
    """Check every key the engines read; raise ExperimentError naming the first bad one."""
    name = cfg.get("name")
    _need(isinstance(name, str) and name != "", "preset needs a non-empty 'name'")
    q = cfg.get("quantization") or {}
    _need(isinstance(q, dict), "quantization must be a mapping")
    fmt = q.setdefault("format", "none")
    _need(fmt in FORMATS, f"quantization.format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "none":
        q.setdefault("injection_point", "weight")
        q.setdefault("layer_types", ["linear"])
        q.setdefault("exclude", list(DEFAULT_EXCLUDE))
        q.setdefault("ste", "identity")
        if fmt == "mxfp4":
            q.setdefault("scale_mode", "floor")
            _need(q["scale_mode"] in SCALE_MODES, f"quantization.scale_mode must be one of {SCALE_MODES}, got {q['scale_mode']!r}")
        _need(q["injection_point"] in INJECTION_POINTS,
              f"quantization.injection_point must be one of {INJECTION_POINTS}, got {q['injection_point']!r}")
        _need(q["ste"] in STE_MODES, f"quantization.ste must be identity or clipped, got {q['ste']!r}")
        _need(isinstance(q["exclude"], list), "quantization.exclude must be a list of patterns")
    cfg["quantization"] = q

    n = cfg.get("noise_injection") or {"enabled": False}
    _need(isinstance(n, dict), "noise_injection must be a mapping")
    n.setdefault("enabled", False)
    if n["enabled"]:
        for k in ("sigma_start", "sigma_end"):
            _num(n, k, "noise_injection")
        _num(n, "num_stages", "noise_injection", lo=1, integer=True)
        lt = n.setdefault("layer_types", ["rmsnorm"])
        _need(isinstance(lt, list) and lt and all(t in NOISE_LAYERS for t in lt),
              f"noise_injection.layer_types must be a non-empty list of {NOISE_LAYERS}, got {lt!r}")
        n.setdefault("decay", "exponential")
        _need(n["decay"] in DECAYS, f"noise_injection.decay must be one of {DECAYS}, got {n['decay']!r}")
        n.setdefault("zero_first_stage", True)
        n.setdefault("apply_to", "both")
        _need(n["apply_to"] in APPLY_TO, f"noise_injection.apply_to must be one of {APPLY_TO}, got {n['apply_to']!r}")
        n.setdefault("relative", False)
        n.setdefault("seed", 0)
    cfg["noise_injection"] = n

    t = cfg.get("training") or {}
    _need(isinstance(t, dict), "training must be a mapping")
    _need(t.get("mode", "full") in MODES, f"training.mode must be one of {MODES}, got {t.get('mode')!r}")
    for k in ("steps", "prompts_per_step", "max_new_tokens", "eval_size"):
        _num(t, k, "training", lo=1, integer=True)
    _num(t, "generations", "training", lo=2, integer=True)  # GRPO needs a group of >= 2
    t.setdefault("sft_warmup_steps", 0)
    for k in ("eval_every", "save_every", "seed", "sft_warmup_steps"):
        _num(t, k, "training", lo=0, integer=True)
    for k in ("learning_rate", "beta", "temperature"):
        _num(t, k, "training")
    c = cfg.get("collapse") or {}
    _num(c, "entropy", "collapse")
    _num(c, "from_step", "collapse", integer=True)
    r = cfg.get("reward") or {}
    _num(r, "correct", "reward")
    _num(r, "format", "reward")


def effective_training(cfg: Dict[str, Any], on_gpu: bool) -> Dict[str, Any]:
    """The training block for this machine: on a CPU-only run the `training.cpu` values apply."""
    t = {k: v for k, v in cfg["training"].items() if k != "cpu"}
    if not on_gpu:
        t.update(cfg["training"].get("cpu") or {})
    return t


def quantizer_from(cfg: Dict[str, Any]):
    """The preset's quantizer object, or None for an unquantized run."""
    q = cfg["quantization"]
    if q["format"] == "mxfp4":
        return Mxfp4Quantizer(q.get("scale_mode", "floor"))
    if q["format"] == "nvfp4":
        return Nvfp4Quantizer()
    return None


def quantize_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Keyword arguments for `aqn_rs.quantize_model` (besides model and quantizer)."""
    q = cfg["quantization"]
    return {
        "injection_point": q["injection_point"],
        "exclude": tuple(q["exclude"]),
        "include": tuple(q["include"]) if q.get("include") else None,
        "layer_types": tuple(q["layer_types"]),
        "ste": q["ste"],
    }


def noise_kwargs(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The AQN block as `AqnNoise.from_config(block, total_steps, **kw)` reads it, or None."""
    n = cfg["noise_injection"]
    if not n.get("enabled"):
        return None
    return dict(n)


def describe(cfg: Dict[str, Any]) -> Tuple[str, str]:
    """Short text of the quantization and of the AQN setting (for tables)."""
    q = cfg["quantization"]
    if q["format"] == "none":
        qs = "none"
    else:
        ip = {"weight": "W4A16", "activation": "W16A4", "both": "W4A4"}[q["injection_point"]]
        qs = f"{ip} {q['format'].upper()}" + (f" ({q['scale_mode']})" if q["format"] == "mxfp4" and q.get("scale_mode") != "floor" else "")
    n = cfg["noise_injection"]
    if not n.get("enabled"):
        ns = "none"
    else:
        layers = "/".join({"linear": "Linear", "rmsnorm": "RMSNorm"}[t] for t in n["layer_types"])
        ns = f"{layers}, sigma {n['sigma_start']:g} -> {n['sigma_end']:g}, {n['num_stages']} stages"
        if n.get("relative"):
            ns += ", relative"
    return qs, ns


def sigma_ratio(cfg: Dict[str, Any], preset: str) -> float:
    """What every point of a sweep over sigma_start keeps: the preset's sigma_end / sigma_start
    (1 where it starts at 0). A preset without an AQN block has nothing to sweep."""
    n = cfg["noise_injection"]
    if not n.get("enabled"):
        raise ExperimentError(f"preset {preset} has no AQN block (noise_injection.enabled is false): nothing to sweep")
    return float(n["sigma_end"]) / float(n["sigma_start"]) if n["sigma_start"] else 1.0


def sweep_point(name: str, sigma: float, ratio: float) -> Tuple[str, List[str]]:
    """One point of a sigma sweep: its run name and the overrides that set sigma_start to
    `sigma` and sigma_end to `sigma * ratio` (see `sigma_ratio`)."""
    return (f"{name}-sigma{sigma:g}",
            [f"noise_injection.sigma_start={sigma!r}", f"noise_injection.sigma_end={sigma * ratio!r}"])
