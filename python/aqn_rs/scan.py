"""The SRDD scanner: layer-by-layer diagnosis of what MXFP4 / NVFP4 fake quantization does to a
checkpoint's weights (and, with calibration data, to the layers' outputs and the model's NLL).

Usage::

    aqn-rs scan --model PATH --quant-type all --output scan.json --plot scan.png
    python scripts/srdd_quant_scanner.py --model_path PATH --quant_type mxfp4 --output scan.json

    from aqn_rs.scan import scan, write_results
    results = scan("path/to/model", "all")

Inputs (`resolve_model`): a transformers model folder (safetensors, single or sharded with an
index), a single `.safetensors` file, a verl checkpoint (`global_step_N`, its `actor/` or
`actor/huggingface`), one of our run folders (`runs/NAME`: its `checkpoints/final`), a `.gguf`
file (read through transformers) or `embedded` (the experiments' SmolLM2-135M).

Weights are read one tensor at a time with plain file reads at the offsets of the safetensors
header (not through a memory map, whose touched pages would stay resident and count against
the process), so a weights-only scan holds about one tensor at a time. GGUF files are the
exception: transformers dequantizes the whole model when it reads one.

Per layer and format (docs/SCANNER.md defines every number): SQNR, relative error, max abs
error, deadzone and saturation fractions, the E2M1 code histogram, block-scale statistics and
the gain scan. On the CPU the reductions run in the Rust core (`aqn_core::scan`, one pass, no
quantized copy, bit-deterministic); on CUDA they are torch reductions over the outputs of our
CUDA `quantize` / `fake_quant` kernels (`torch_raw_stats`), equal to the CPU numbers in every
count and to ~1e-12 in the sums.

The result is a JSON-serialisable dict with a versioned schema (`SCHEMA`, `SCHEMA_VERSION`);
`write_results`, `load_results`, `compare_scans`, `format_report` and `plot_results` work on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import _aqn_rs, _cuda
from ._plot import pyplot
from .constants import DEFAULT_EXCLUDE, E2M1_MAX, MXFP4_BLOCK, NVFP4_BLOCK, SAFETENSORS_DTYPES, SCALE_MODES
from .errors import ExperimentError, ScanError
from .experiments.data import builtin_problems
from .models import converted_folder
from .models import resolve_model as resolve_experiment_model
from .quantizers import Mxfp4Quantizer, Nvfp4Quantizer, _check_input, _is_torch_tensor, _rs_view
from .selection import ModuleSelector, class_name_of

SCHEMA = "aqn-rs.scan"
SCHEMA_VERSION = 1
QUANT_TYPES = ("mxfp4", "nvfp4", "all")
DTYPES = ("keep", "bfloat16", "float16", "float32")

# An element whose scaled value |x / d| exceeds E2M1's largest magnitude is clipped.
F4_E2M1_MAX = E2M1_MAX
# A probe counts as "in the deadzone" / "saturated" at a rung when at least this fraction of
# the blocks zero / clip it: the median block's threshold (docs/SCANNER.md, "Gain scan").
EDGE_FRACTION = 0.5

# Projection types by the module's last name component (transformers and vLLM spellings).
PROJ_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "qkv_proj": "qkv", "gate_up_proj": "gate_up",
    "lm_head": "lm_head", "embed_tokens": "embed",
}
PROJ_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up", "embed", "lm_head")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_FSDP_SHARD = re.compile(r"^model_world_size_\d+_rank_\d+\.pt$")


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """One quantization format a scan measures.

    Attributes:
        key: the key of this format in the results ("mxfp4-floor", "nvfp4").
        format: "mxfp4" or "nvfp4".
        scale_mode: MXFP4 scale mode (None for NVFP4).
    """

    key: str
    format: str
    scale_mode: Optional[str] = None

    @property
    def block(self) -> int:
        return MXFP4_BLOCK if self.format == "mxfp4" else NVFP4_BLOCK

    def quantizer(self):
        return Mxfp4Quantizer(self.scale_mode) if self.format == "mxfp4" else Nvfp4Quantizer()

    def describe(self) -> Dict[str, Any]:
        return {"format": self.format, "scale_mode": self.scale_mode, "block": self.block}


def format_specs(quant_type: str = "all", scale_modes: Union[str, Sequence[str]] = "floor") -> List[FormatSpec]:
    """The formats of a scan: `quant_type` "mxfp4", "nvfp4" or "all"; MXFP4 once per scale mode.

    Raises:
        ScanError: an unknown quant type or scale mode.
    """
    if quant_type not in QUANT_TYPES:
        raise ScanError(f"unknown quant type {quant_type!r}; expected one of {', '.join(QUANT_TYPES)}")
    modes = [scale_modes] if isinstance(scale_modes, str) else list(scale_modes or ["floor"])
    for m in modes:
        if m not in SCALE_MODES:
            raise ScanError(f"unknown MXFP4 scale mode {m!r}; expected one of {', '.join(SCALE_MODES)}")
    specs = []
    if quant_type in ("mxfp4", "all"):
        specs += [FormatSpec(f"mxfp4-{m}", "mxfp4", m) for m in dict.fromkeys(modes)]
    if quant_type in ("nvfp4", "all"):
        specs.append(FormatSpec("nvfp4", "nvfp4", None))
    return specs


def gain_ladder() -> List[float]:
    """Probe magnitudes of the gain scan, relative to each block's amax: 2^-8 .. 1 in steps of
    2^(1/4) (f32 values, defined by the Rust core)."""
    return [float(v) for v in _aqn_rs.scan_gain_ladder()]


# ---------------------------------------------------------------------------------------------
# Raw statistics of one tensor: Rust on the CPU, torch reductions on any device
# ---------------------------------------------------------------------------------------------

_RAW_KEYS = (
    "numel", "blocks", "nonfinite_blocks", "nonfinite_elements", "zero_blocks", "zeros",
    "sum_x2", "sum_err2", "max_abs_err", "amax", "deadzone", "saturated", "codes",
    "scale_bytes", "dec_min", "dec_max", "dec_sum", "gain_blocks", "response_sum",
    "probe_dead", "probe_clipped", "global_scale",
)


def rust_raw_stats(x, spec: FormatSpec, amax: Optional[float] = None) -> Dict[str, Any]:
    """Raw sums and counts of one CPU tensor (torch f32/bf16/f16 or numpy f32/f16) from the Rust
    core: one pass, no quantized copy, GIL released, bit-identical for any thread count.

    Args:
        x: the tensor, contiguous, at least 1-d (blocks run along the last dimension).
        spec: the format.
        amax: NVFP4 only: the tensor amax that sets the global scale (a fused group's max).

    Returns:
        dict with the keys of `aqn_core::scan::TensorScan` plus `global_scale` (NVFP4).
    """
    kind, tag = _check_input(x)
    if kind == "torch-cuda":
        raise ValueError("rust_raw_stats takes a CPU tensor; use torch_raw_stats for CUDA tensors")
    return dict(_aqn_rs.scan_tensor(_rs_view(x, tag), tag, spec.format, spec.scale_mode or "floor",
                                    None if amax is None else float(amax)))


def _pow2_t(k):
    """Exact f32 2**k for an integer tensor k in [-149, 127], from bits (no pow/log rounding)."""
    import torch

    k = k.to(torch.int32)
    normal = (k.clamp(-126, 127) + 127) << 23
    subnormal = torch.ones_like(k) << (k.clamp(-149, -127) + 149)
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def torch_raw_stats(x, spec: FormatSpec, amax: Any = None, chunk_elems: int = 1 << 24) -> Dict[str, Any]:
    """The same raw sums and counts as `rust_raw_stats`, as torch reductions over the outputs of
    our `quantize` (codes, scale bytes, global scale) and `fake_quant` on `x`'s device: the CUDA
    path of the scanner (the quantization itself runs in our CUDA kernels). Counts equal the
    Rust core's exactly; f64 sums differ only by summation order (~1e-12 relative).

    Args:
        x: torch tensor (CPU or CUDA; f32, bf16, f16), contiguous, at least 1-d.
        spec: the format.
        amax: NVFP4 only: the tensor amax that sets the global scale (float or 0-d tensor).
        chunk_elems: rows are reduced in chunks of about this many elements (bounds the
            temporaries on the device).
    """
    import torch

    from . import reference

    dev = x.device
    q = spec.quantizer()
    if spec.format == "nvfp4":
        qt = q.quantize(x, amax)
        fq = q.fake_quant(x, amax)
        gs = torch.as_tensor(qt.global_scale, dtype=torch.float32, device=dev).reshape(())
    else:
        qt = q.quantize(x)
        fq = q.fake_quant(x)
        gs = None
    k = int(x.shape[-1]) if x.dim() else 0
    n = x.numel()
    raw: Dict[str, Any] = {key: 0 for key in _RAW_KEYS}
    raw.update(codes=[0] * 16, scale_bytes=[0] * 256, dec_min=math.inf, dec_max=0.0,
               response_sum=[0.0] * len(gain_ladder()), global_scale=None,
               probe_dead=[0] * len(gain_ladder()), probe_clipped=[0] * len(gain_ladder()))
    if gs is not None:
        raw["global_scale"] = float(gs)
    if n == 0:
        return raw
    B = spec.block
    rows = n // k
    nb = -(-k // B)
    pad = nb * B - k
    x2 = x.reshape(rows, k)
    q2 = fq.reshape(rows, k)
    scales = qt.scales.reshape(rows, nb)
    packed = qt.codes.reshape(rows, -1)
    ladder = torch.tensor(gain_ladder(), dtype=torch.float32, device=dev)
    real = (torch.arange(nb * B, device=dev) < k).view(nb, B)

    f64 = dict(dtype=torch.float64, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    acc = {
        "sum_x2": torch.zeros((), **f64), "sum_err2": torch.zeros((), **f64),
        "max_abs_err": torch.zeros((), **f64), "dec_sum": torch.zeros((), **f64),
        "amax": torch.zeros((), dtype=torch.float32, device=dev),
        "dec_min": torch.full((), math.inf, dtype=torch.float32, device=dev),
        "dec_max": torch.zeros((), dtype=torch.float32, device=dev),
        "codes": torch.zeros(17, **i64), "scale_bytes": torch.zeros(256, **i64),
        "response_sum": torch.zeros(len(ladder), **f64),
        "probe_dead": torch.zeros(len(ladder), **i64), "probe_clipped": torch.zeros(len(ladder), **i64),
    }
    for key in ("nonfinite_blocks", "nonfinite_elements", "zero_blocks", "zeros", "deadzone",
                "saturated", "gain_blocks"):
        acc[key] = torch.zeros((), **i64)
    step = max(1, chunk_elems // max(k, 1))
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    for r0 in range(0, rows, step):
        xs = x2[r0:r0 + step].to(torch.float32)
        qs = q2[r0:r0 + step].to(torch.float32)
        sb = scales[r0:r0 + step]
        pk = packed[r0:r0 + step]
        rc = xs.shape[0]
        codes = torch.stack([pk & 0xF, pk >> 4], dim=-1).reshape(rc, -1)[:, :k]
        if pad:
            xs = torch.nn.functional.pad(xs, (0, pad))
            qs = torch.nn.functional.pad(qs, (0, pad))
            codes = torch.nn.functional.pad(codes, (0, pad))
        xb, qb, cb = xs.view(rc, nb, B), qs.view(rc, nb, B), codes.view(rc, nb, B)
        if spec.format == "mxfp4":
            nonfin = sb == 0xFF
            e = sb.to(torch.int32) - 127
            dec = _pow2_t(e)
            enc = _pow2_t(-e)
            y = xb * enc.unsqueeze(-1)
        else:
            nonfin = sb == 0x7F
            dec = sb.view(torch.float8_e4m3fn).to(torch.float32) / gs
            y = xb / dec.unsqueeze(-1)
        fin = ~nonfin
        valid = fin.unsqueeze(-1) & real
        xd, qd = xb.double(), qb.double()
        err = xd - qd
        zd = torch.zeros((), **f64)
        acc["sum_x2"] += torch.where(valid, xd * xd, zd).sum()
        acc["sum_err2"] += torch.where(valid, err * err, zd).sum()
        acc["max_abs_err"] = torch.maximum(acc["max_abs_err"], torch.where(valid, err.abs(), zd).max())
        acc["zeros"] += ((xb == 0) & valid).sum()
        acc["deadzone"] += ((xb != 0) & (qb == 0) & valid).sum()
        acc["saturated"] += ((y.abs() > F4_E2M1_MAX) & valid).sum()
        acc["codes"] += torch.bincount(torch.where(valid, cb.to(torch.int64), 16).flatten(), minlength=17)
        acc["scale_bytes"] += torch.bincount(sb.flatten().to(torch.int64), minlength=256)
        acc["nonfinite_blocks"] += nonfin.sum()
        acc["nonfinite_elements"] += (nonfin.unsqueeze(-1) & real).sum()
        bamax = torch.where(valid, xb.abs(), zero).amax(dim=-1)
        acc["amax"] = torch.maximum(acc["amax"], torch.where(fin, bamax, zero).max())
        acc["dec_min"] = torch.minimum(acc["dec_min"], torch.where(fin, dec, math.inf).min())
        acc["dec_max"] = torch.maximum(acc["dec_max"], torch.where(fin, dec, zero).max())
        acc["dec_sum"] += torch.where(fin, dec.double(), zd).sum()
        acc["zero_blocks"] += (fin & (bamax == 0)).sum()
        # gain scan: probes r * amax_b with the block's scale held fixed
        g = fin & (bamax > 0)
        a = torch.where(g, bamax, 1.0).unsqueeze(-1)
        p = a * ladder
        yy = p * enc.unsqueeze(-1) if spec.format == "mxfp4" else p / dec.unsqueeze(-1)
        qq = reference.e2m1_decode(reference.e2m1_encode(yy)) * dec.unsqueeze(-1)
        gm = g.unsqueeze(-1)
        acc["response_sum"] += torch.where(gm, qq.double() / a.double(), zd).sum(dim=(0, 1))
        acc["probe_dead"] += (gm & (qq == 0)).sum(dim=(0, 1))
        acc["probe_clipped"] += (gm & (yy.abs() > F4_E2M1_MAX)).sum(dim=(0, 1))
        acc["gain_blocks"] += g.sum()
    raw.update(numel=n, blocks=rows * nb)
    for key, v in acc.items():
        if key == "codes":
            raw[key] = [int(c) for c in v[:16].tolist()]
        elif v.dim():
            raw[key] = v.tolist()
        elif v.dtype == torch.int64:
            raw[key] = int(v)
        else:
            raw[key] = float(v)
    return raw


def _num(v: Optional[float], digits: int = 6) -> Optional[float]:
    """A JSON-safe float (None for NaN/Inf), rounded to `digits` significant digits."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _crossing(ladder: Sequence[float], frac: Sequence[float], j: int) -> float:
    """Where `frac` crosses EDGE_FRACTION between rungs j and j+1, interpolated in log r."""
    a, b = frac[j], frac[j + 1]
    t = (a - EDGE_FRACTION) / (a - b) if a != b else 0.0
    return ladder[j] * (ladder[j + 1] / ladder[j]) ** t


def _edges(ladder: Sequence[float], dead: Sequence[float], clip: Sequence[float]) -> Dict[str, Optional[float]]:
    """Thresholds of the gain scan (docs/SCANNER.md): the deadzone edge is where the fraction of
    blocks that zero the probe falls through EDGE_FRACTION (the median block's deadzone), the
    saturation edge where the fraction that clip it rises through it, the onset where the first
    block clips. Edges are interpolated between rungs in log r; None when never crossed."""
    n = len(ladder)
    dz = None
    if dead[0] >= EDGE_FRACTION:
        j = max(i for i in range(n) if dead[i] >= EDGE_FRACTION)
        dz = ladder[j] if j == n - 1 else _crossing(ladder, dead, j)
    sat = None
    if clip[-1] >= EDGE_FRACTION:
        j = min(i for i in range(n) if clip[i] >= EDGE_FRACTION)
        sat = ladder[0] if j == 0 else _crossing(ladder, clip, j - 1)
    onset = next((r for r, f in zip(ladder, clip) if f > 0), None)
    return {"deadzone_edge": dz, "saturation_edge": sat, "saturation_onset": onset}


def gain_curves(response_sum: Sequence[float], probe_dead: Sequence[int], probe_clipped: Sequence[int],
                blocks: int, ladder: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """Mean response, gain (its slope between rungs), dead/clip fractions and the thresholds
    from pooled gain-scan sums (docs/SCANNER.md, "Gain scan")."""
    ladder = list(ladder or gain_ladder())
    if blocks <= 0:
        return {"blocks": 0, "response": None, "gain": None, "dead_frac": None, "clip_frac": None,
                "deadzone_edge": None, "saturation_edge": None, "saturation_onset": None,
                "saturating_blocks_frac": None}
    resp = [s / blocks for s in response_sum]
    gain = [(resp[j + 1] - resp[j]) / (ladder[j + 1] - ladder[j]) for j in range(len(ladder) - 1)]
    dead = [c / blocks for c in probe_dead]
    clip = [c / blocks for c in probe_clipped]
    out = {"blocks": int(blocks), "response": resp, "gain": gain, "dead_frac": dead, "clip_frac": clip}
    out.update(_edges(ladder, dead, clip))
    out["saturating_blocks_frac"] = clip[-1]  # the probe at r = 1 is the block's own amax
    return out


def metrics_from_raw(raw: Dict[str, Any], spec: FormatSpec, curves: bool = True) -> Dict[str, Any]:
    """The per-layer metrics of one format from raw sums and counts (docs/SCANNER.md, "Metrics").

    Args:
        raw: from `rust_raw_stats` or `torch_raw_stats`.
        spec: the format.
        curves: keep the gain-scan curves (else only its thresholds).
    """
    n_fin = raw["numel"] - raw["nonfinite_elements"]
    sx, se = raw["sum_x2"], raw["sum_err2"]
    sqnr = 10 * math.log10(sx / se) if se > 0 and sx > 0 else None
    fin_blocks = raw["blocks"] - raw["nonfinite_blocks"]
    hist = {str(b): int(c) for b, c in enumerate(raw["scale_bytes"]) if c}
    g = gain_curves(raw["response_sum"], raw["probe_dead"], raw["probe_clipped"], raw["gain_blocks"])
    for key in ("response", "gain", "dead_frac", "clip_frac"):
        if not curves:
            g.pop(key)
        elif g[key] is not None:
            g[key] = [_num(v) for v in g[key]]
    return {
        "numel": int(raw["numel"]),
        "sqnr_db": _num(sqnr, 8),
        "rel_err": _num(math.sqrt(se / sx), 8) if sx > 0 else None,
        "mse": _num(se / n_fin, 8) if n_fin else None,
        "max_abs_err": _num(raw["max_abs_err"], 8),
        "amax": _num(raw["amax"], 8),
        "deadzone_frac": _num(raw["deadzone"] / n_fin, 8) if n_fin else None,
        "deadzone_frac_of_nonzero": _num(raw["deadzone"] / (n_fin - raw["zeros"]), 8) if n_fin > raw["zeros"] else None,
        "saturation_frac": _num(raw["saturated"] / n_fin, 8) if n_fin else None,
        "counts": {
            "deadzone": int(raw["deadzone"]), "saturated": int(raw["saturated"]),
            "zeros": int(raw["zeros"]), "nonfinite_elements": int(raw["nonfinite_elements"]),
        },
        "sums": {"sum_x2": float(sx), "sum_err2": float(se)},
        "code_hist": [int(c) for c in raw["codes"]],
        "scales": {
            "blocks": int(raw["blocks"]),
            "nonfinite_blocks": int(raw["nonfinite_blocks"]),
            "zero_blocks": int(raw["zero_blocks"]),
            "byte_hist": hist,
            "dec_min": _num(raw["dec_min"], 8) if fin_blocks else None,
            "dec_max": _num(raw["dec_max"], 8) if fin_blocks else None,
            "dec_mean": _num(raw["dec_sum"] / fin_blocks, 8) if fin_blocks else None,
            "global_scale": raw.get("global_scale"),
        },
        "gain": g,
    }


def tensor_raw_stats(x, spec: FormatSpec, amax: Any = None) -> Dict[str, Any]:
    """Raw sums and counts of one tensor: the Rust core for CPU tensors and numpy arrays, torch
    reductions over our CUDA kernels' outputs for CUDA tensors."""
    if _is_torch_tensor(x) and x.device.type == "cuda":
        return torch_raw_stats(x, spec, amax)
    if _is_torch_tensor(amax):
        amax = float(amax)
    return rust_raw_stats(x, spec, amax)


def tensor_metrics(x, spec: FormatSpec, amax: Any = None, curves: bool = True) -> Dict[str, Any]:
    """Per-format metrics of one tensor (`metrics_from_raw(tensor_raw_stats(...))`)."""
    return metrics_from_raw(tensor_raw_stats(x, spec, amax), spec, curves)


# ---------------------------------------------------------------------------------------------
# Model sources
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSource:
    """Where a scan reads its weights from (`resolve_model`).

    Attributes:
        kind: "safetensors-folder", "safetensors-file", "verl", "run", "embedded" or "gguf".
        path: what the caller passed.
        folder: the transformers folder (config.json) the weights belong to, if any.
        files: the safetensors files (empty for GGUF).
        gguf: the GGUF file (kind "gguf").
        note: how the path was resolved, for the report.
    """

    kind: str
    path: str
    folder: Optional[Path]
    files: List[Path]
    gguf: Optional[Path] = None
    note: str = ""

    def describe(self) -> Dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind,
            "folder": str(self.folder) if self.folder else None,
            "files": [str(f) for f in self.files], "gguf": str(self.gguf) if self.gguf else None,
            "note": self.note,
        }


def _merge_command(actor: Path) -> str:
    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} "
            f"--target_dir {actor / 'huggingface'}")


def _safetensors_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ScanError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        files = [folder / f for f in sorted(set(wm.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ScanError(f"{index} names shards that are missing: {missing[:4]}")
        return files
    return sorted(folder.glob("*.safetensors"))


def _has_fsdp_shards(folder: Path) -> bool:
    return folder.is_dir() and any(_FSDP_SHARD.match(p.name) or p.suffix == ".distcp" for p in folder.iterdir())


def _latest(paths: Iterable[Path], pattern: str) -> Optional[Path]:
    rx = re.compile(pattern)
    found = [(int(m.group(1)), p) for p in paths if p.is_dir() and (m := rx.fullmatch(p.name))]
    return max(found)[1] if found else None


def resolve_model(path: Union[str, os.PathLike]) -> ModelSource:
    """Find the weights a scan reads for `path` (see the module docstring for what is accepted).

    Raises:
        ScanError: the path does not exist, holds no weights, holds only verl FSDP shards (the
            message has the `verl.model_merger` command), or holds a format that is not read.
    """
    spath = str(path)
    if spath == "embedded":
        try:
            folder, gguf, desc = resolve_experiment_model(None)
            conv = Path(converted_folder(folder, gguf, log=lambda m: print(m, file=sys.stderr)))
        except ExperimentError as e:
            raise ScanError(str(e)) from None
        return ModelSource("embedded", spath, conv, _safetensors_files(conv), note=f"{desc}, cached as {conv}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ScanError(f"model path {p} does not exist (expected a transformers model folder, a "
                        ".safetensors or .gguf file, a verl global_step_N folder, or 'embedded')")
    if p.is_file():
        name = p.name
        if name.endswith(".safetensors.index.json"):
            p = p.parent
        elif p.suffix == ".safetensors":
            folder = p.parent if (p.parent / "config.json").is_file() else None
            return ModelSource("safetensors-file", spath, folder, [p])
        elif p.suffix == ".gguf":
            return ModelSource("gguf", spath, p.parent, [], gguf=p, note="read through transformers")
        elif _FSDP_SHARD.match(name):
            raise ScanError(f"{p} is one verl FSDP shard; merge the shards into a HuggingFace folder "
                            f"first:\n  {_merge_command(p.parent)}\nthen scan {p.parent / 'huggingface'}")
        else:
            raise ScanError(f"{p}: unsupported weight file (expected .safetensors, a "
                            ".safetensors.index.json or .gguf; re-save PyTorch .bin/.pt weights with "
                            "save_pretrained(..., safe_serialization=True))")
    note = ""
    # one of our run folders: runs/NAME/checkpoints/{final,step-N}
    ck = p / "checkpoints"
    if ck.is_dir() and not _safetensors_files(p):
        pick = ck / "final" if (ck / "final").is_dir() else _latest(ck.iterdir(), r"step-(\d+)")
        if pick is None:
            raise ScanError(f"{p} is a run folder but {ck} has no final or step-N checkpoint yet")
        note = f"run folder: scanning {pick.relative_to(p)}"
        p = pick
        kind = "run"
    else:
        kind = "safetensors-folder"
    # verl: a trainer's default_local_dir with global_step_N folders, global_step_N, or actor/
    if not _safetensors_files(p):
        latest = _latest(p.iterdir(), r"global_step_(\d+)")
        if latest is not None:
            note = f"verl checkpoints: scanning the latest, {latest.name}"
            p = latest
        if (p / "actor").is_dir():
            p = p / "actor"
        hf = p / "huggingface"
        if hf.is_dir() and _safetensors_files(hf):
            note = (note + "; " if note else "") + f"verl checkpoint: {hf}"
            return ModelSource("verl", spath, hf, _safetensors_files(hf), note=note)
        if _has_fsdp_shards(p):
            raise ScanError(
                f"{p} holds verl FSDP shards (model_world_size_W_rank_R.pt / *.distcp) and no merged "
                "HuggingFace weights; merge them first:\n"
                f"  {_merge_command(p)}\nthen scan {p} again (its huggingface/ folder is then used)")
    files = _safetensors_files(p)
    if files:
        folder = p if (p / "config.json").is_file() else None
        return ModelSource(kind, spath, folder, files, note=note)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", spath, p, [], gguf=ggufs[0], note="read through transformers")
    if len(ggufs) > 1:
        raise ScanError(f"{p} holds several GGUF files ({', '.join(g.name for g in ggufs[:4])}); pass one of them")
    if any(p.glob("*.bin")) or any(p.glob("*.pt")):
        raise ScanError(f"{p} holds PyTorch .bin/.pt weights; only safetensors (and GGUF) are read: "
                        "re-save with save_pretrained(..., safe_serialization=True)")
    raise ScanError(f"no model weights in {p}: expected *.safetensors (or model.safetensors.index.json), "
                    "a .gguf file, a verl global_step_N/actor folder or a run folder with checkpoints/")


_ST_NAMES = SAFETENSORS_DTYPES


class SafetensorsReader:
    """Tensors of safetensors files, read one at a time with plain reads at the header's
    offsets (no memory map: touched pages of a map stay resident, so a scan through one would
    grow to the size of the checkpoint). `names`, `meta(name)` and `get(name)` are what
    `aqn_rs.export._module_classes_of_folder` expects.

    `get` returns a fresh tensor; `read` reads into one reusable buffer (sized by `reserve`)
    and returns a view of it that is valid until the next `read`: the scanner's loop, whose
    peak memory is then the largest tensor, without the allocator's fragmentation from a
    fresh large buffer per tensor.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self._where: Dict[str, Tuple[Path, int, str, Tuple[int, ...], int]] = {}
        self.names: List[str] = []
        self.metadata: Dict[str, str] = {}
        self._buf = None
        for f in files:
            with open(f, "rb") as fh:
                head = fh.read(8)
                if len(head) != 8:
                    raise ScanError(f"{f} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > 100_000_000:
                    raise ScanError(f"{f} is not a safetensors file (header length {n})")
                try:
                    header = json.loads(fh.read(n))
                except ValueError as e:
                    raise ScanError(f"{f} is not a safetensors file (bad header: {e})") from None
            if not self.metadata:
                self.metadata = dict(header.get("__metadata__") or {})
            for name, info in header.items():
                if name == "__metadata__" or name in self._where:
                    continue
                s, e = info["data_offsets"]
                self._where[name] = (f, 8 + n + int(s), info["dtype"], tuple(info["shape"]), int(e) - int(s))
                self.names.append(name)

    def meta(self, name: str):
        import torch

        _, _, dt, shape, _ = self._where[name]
        if dt not in _ST_NAMES:
            raise ScanError(f"{name}: unsupported safetensors dtype {dt}")
        return getattr(torch, _ST_NAMES[dt]), shape

    def nbytes(self, name: str) -> int:
        return self._where[name][4]

    def reserve(self, nbytes: int) -> None:
        """Make `read`'s buffer hold at least `nbytes` (call once with the largest tensor)."""
        import torch

        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            self._buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def _read_into(self, name: str, buf):
        f, off, _, shape, nbytes = self._where[name]
        dtype, _ = self.meta(name)
        if nbytes:
            mv = memoryview(buf.numpy())[:nbytes]
            with open(f, "rb", buffering=0) as fh:
                fh.seek(off)
                got = 0
                while got < nbytes:  # one read() is capped near 2 GiB on Linux
                    r = fh.readinto(mv[got:])
                    if not r:
                        raise ScanError(f"{f}: unexpected end of file reading {name}")
                    got += r
        return buf[:nbytes].view(dtype).reshape(shape)

    def get(self, name: str):
        """`name` as a new tensor."""
        import torch

        return self._read_into(name, torch.empty(max(self.nbytes(name), 1), dtype=torch.uint8))

    def read(self, name: str):
        """`name` as a view of the reusable buffer (valid until the next `read`)."""
        self.reserve(self.nbytes(name))
        return self._read_into(name, self._buf)

    def close(self) -> None:
        self._buf = None


class _StateDictReader:
    """An in-memory state dict behind the reader interface (GGUF models)."""

    def __init__(self, tensors: Dict[str, Any]) -> None:
        self._t = tensors
        self.names = list(tensors)
        self.metadata: Dict[str, str] = {}

    def meta(self, name):
        t = self._t[name]
        return t.dtype, tuple(t.shape)

    def get(self, name):
        return self._t[name]

    read = get

    def reserve(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        self._t.clear()


def _load_gguf(src: ModelSource):
    """(reader, classes) of a GGUF file through transformers (which dequantizes every tensor)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ScanError(f"reading {src.gguf} needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.gguf.parent), gguf_file=src.gguf.name, dtype=torch.float32)
    classes = {n: class_name_of(m) for n, m in model.named_modules() if n}
    sd, seen = {}, set()
    for n, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:  # a tied lm_head is the embedding: listed once, as transformers saves it
            seen.add(key)
            sd[n] = t.detach()
    del model
    return _StateDictReader(sd), classes


def _heuristic_classes(reader) -> Dict[str, str]:
    classes = {}
    for n in reader.names:
        mod, _, leaf = n.rpartition(".")
        low = mod.lower()
        if leaf != "weight" or len(reader.meta(n)[1]) != 2:
            continue
        if "embed" in low or low.endswith(("wte", "wpe")):
            classes[mod] = "Embedding"
        elif "norm" not in low:
            classes[mod] = "Linear"
    return classes


def _open_source(src: ModelSource):
    """(reader, module classes) for a resolved source."""
    if src.kind == "gguf":
        return _load_gguf(src)
    reader = SafetensorsReader(src.files)
    if src.folder is None or not (src.folder / "config.json").is_file():
        return reader, _heuristic_classes(reader)
    from .export import _module_classes_of_folder

    try:
        classes = _module_classes_of_folder(src.folder, reader)
    except ValueError as e:
        if "quantization_config" in str(e):
            raise ScanError(f"{src.folder} is an already-quantized checkpoint (config.json has a "
                            "quantization_config): its Linear weights are packed, not dense; scan the "
                            "dense checkpoint it was made from") from None
        raise
    return reader, classes


# ---------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------


def proj_type(module_name: str) -> str:
    """q/k/v/o/gate/up/down (and qkv, gate_up, embed, lm_head) from a module name; else its
    last component."""
    leaf = module_name.rpartition(".")[2]
    return PROJ_TYPES.get(leaf, leaf)


def layer_index(module_name: str) -> Optional[int]:
    """The transformer block index in a module name (`model.layers.12.mlp.up_proj` -> 12)."""
    m = _LAYER_INDEX.search(module_name)
    return int(m.group(1)) if m else None


class _Progress:
    """tqdm if it is installed, else a one-line counter on stderr."""

    def __init__(self, total: int, enabled: bool, desc: str = "scan", unit: str = "layer") -> None:
        self.total, self.enabled, self.n, self._bar = total, enabled, 0, None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._desc = desc

    def update(self, label: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label[-40:], refresh=False)
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last > 0.5 or self.n == self.total:
            self._last = now
            width = 30
            fill = int(width * self.n / max(self.total, 1))
            end = "\n" if self.n == self.total else ""
            print(f"\r{self._desc} [{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} {label[-40:]:<40}",
                  end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ScanError(f"unknown device {device!r}; expected cpu or cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ScanError("--device cuda: torch sees no CUDA device here; use --device cpu")
        if not _cuda.available():
            raise ScanError("--device cuda: this aqn-rs build has no usable CUDA kernels "
                            "(aqn_rs.build_info()); reinstall with the kernels or use --device cpu")
    return device


def _prep(t, dtype: str, device: str):
    """The tensor the quantizer sees: floating (f32/bf16/f16), cast to `dtype` unless "keep",
    contiguous, on `device`."""
    import torch

    if device != "cpu":
        t = t.to(device)
    if dtype != "keep":
        t = t.to(getattr(torch, dtype))
    elif t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    return t.contiguous()


def _plan_layers(reader, classes, selector, skip_excluded: bool):
    """Layers to scan, in module order: (module, tensor, selected, rule, layer type) and the
    modules skipped with a reason."""
    typed = ModuleSelector(exclude=(), layer_types=("linear", "embedding"))
    names = set(reader.names)
    layers, skipped = [], []
    for mod, cls in classes.items():
        ok, _ = typed.decide(mod, cls)
        if not ok:
            continue
        ltype = ModuleSelector.layer_type(cls)
        tname = f"{mod}.weight"
        if tname not in names:
            skipped.append({"name": mod, "reason": "no weight tensor of its own (tied or absent)"})
            continue
        dt, shape = reader.meta(tname)
        if len(shape) != 2 or not dt.is_floating_point:
            skipped.append({"name": mod, "reason": f"weight is {dt} {list(shape)}, not a 2-D float matrix"})
            continue
        selected, rule = selector.decide(mod, cls)
        if not selected and skip_excluded:
            skipped.append({"name": mod, "reason": f"excluded ({rule})"})
            continue
        layers.append((mod, tname, selected, rule, ltype, shape, dt))
    return layers, skipped


def _group_amaxes(reader, layers, specs, fuse: bool, dtype: str, device: str, timing: Dict[str, float]) -> Dict[str, float]:
    """NVFP4: the shared tensor amax of each vLLM-fused group (q/k/v, gate/up) among the
    selected Linear layers, as training (`quantize_model`) and export use. One extra read of
    each member, one tensor at a time."""
    if not fuse or not any(s.format == "nvfp4" for s in specs):
        return {}
    from .export import fused_weight_groups

    chosen = {mod: tname for mod, tname, sel, _, lt, _, _ in layers if sel and lt == "linear"}
    out: Dict[str, float] = {}
    q = Nvfp4Quantizer()
    for members in fused_weight_groups(chosen):
        amaxes = []
        for m in members:
            t0 = time.perf_counter()
            t = reader.read(chosen[m])
            t1 = time.perf_counter()
            x = _prep(t, dtype, device)
            amaxes.append(float(q.amax(x)))
            del x, t
            timing["read_s"] += t1 - t0
            timing["compute_s"] += time.perf_counter() - t1
        a = math.nan if any(math.isnan(v) for v in amaxes) else max(amaxes)
        out.update({m: a for m in members})
    return out


def scan(
    model: Union[str, os.PathLike],
    quant_type: str = "all",
    *,
    scale_mode: Union[str, Sequence[str]] = "floor",
    exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE,
    include: Optional[Sequence[str]] = None,
    device: str = "cpu",
    dtype: str = "keep",
    fuse_global_scales: bool = True,
    skip_excluded: bool = False,
    curves: bool = True,
    calib: Optional[str] = None,
    calib_samples: int = 32,
    calib_batch_size: int = 8,
    calib_max_length: int = 512,
    top: int = 10,
    progress: bool = True,
) -> Dict[str, Any]:
    """Scan a checkpoint layer by layer.

    Args:
        model: a checkpoint path (see `resolve_model`) or "embedded".
        quant_type: "mxfp4", "nvfp4" or "all".
        scale_mode: MXFP4 scale mode(s): one name or a list (each is one format in the results).
        exclude: module patterns kept dense in training (names, globs, `re:`); they are still
            measured, marked `excluded`, and left out of the summary. Default lm_head,
            embed_tokens.
        include: if given, only modules matching these patterns count as quantized.
        device: "cpu" (Rust core) or "cuda" (our kernels + torch reductions).
        dtype: "keep" (quantize each weight in its stored dtype), or "bfloat16"/"float16"/
            "float32" (cast first, e.g. to see the bf16 weights training fake-quantizes).
        fuse_global_scales: NVFP4: q/k/v and gate/up share one global scale (max of their amax)
            as in training and vLLM.
        skip_excluded: do not measure excluded layers at all.
        curves: keep the per-layer gain-scan curves in the results (the summary always has the
            pooled ones).
        calib: calibration data (a jsonl/txt file, or "builtin") for the per-layer output error
            and the end-to-end NLL change; None for a weights-only scan.
        calib_samples, calib_batch_size, calib_max_length: how much calibration data.
        top: how many worst layers the summary lists.
        progress: show a progress bar on stderr.

    Returns:
        The results dict (schema `SCHEMA` version `SCHEMA_VERSION`, docs/SCANNER.md).
    """
    import torch

    t_start = time.perf_counter()
    specs = format_specs(quant_type, scale_mode)
    if dtype not in DTYPES:
        raise ScanError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    device = _check_device(device)
    try:
        selector = ModuleSelector(include=tuple(include) if include is not None else None,
                                  exclude=tuple(exclude or ()), layer_types=("linear", "embedding"))
    except ValueError as e:
        raise ScanError(f"bad include/exclude pattern: {e}") from None
    src = resolve_model(model)
    t_open = time.perf_counter()
    reader, classes = _open_source(src)
    t_open = time.perf_counter() - t_open
    layers, skipped = _plan_layers(reader, classes, selector, skip_excluded)
    if not layers:
        raise ScanError(f"{src.path}: no Linear or Embedding layer with a 2-D float weight was found "
                        f"(module classes seen: {sorted(set(classes.values()))[:12]})")

    timing = {"open_s": t_open, "read_s": 0.0, "compute_s": 0.0}
    if hasattr(reader, "nbytes"):
        reader.reserve(max(reader.nbytes(tname) for _, tname, *_ in layers))
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    group_amax = _group_amaxes(reader, layers, specs, fuse_global_scales, dtype, device, timing)
    n_rungs = len(gain_ladder())
    pooled = {s.key: {"response_sum": [0.0] * n_rungs, "probe_dead": [0] * n_rungs,
                      "probe_clipped": [0] * n_rungs, "blocks": 0} for s in specs}

    bar = _Progress(len(layers), progress)
    rows = []
    try:
        for mod, tname, selected, rule, ltype, shape, sdt in layers:
            t0 = time.perf_counter()
            t = reader.read(tname)
            t1 = time.perf_counter()
            x = _prep(t, dtype, device)
            del t
            entry = {
                "name": mod, "tensor": tname, "type": ltype, "proj": proj_type(mod),
                "layer_index": layer_index(mod), "shape": [int(s) for s in shape],
                "dtype": str(sdt).removeprefix("torch."), "quantized_dtype": str(x.dtype).removeprefix("torch."),
                "excluded": not selected, "rule": rule, "metrics": {},
            }
            for spec in specs:
                amax = group_amax.get(mod) if spec.format == "nvfp4" else None
                raw = tensor_raw_stats(x, spec, amax)
                m = metrics_from_raw(raw, spec, curves)
                if selected:
                    pg = pooled[spec.key]
                    for k in ("response_sum", "probe_dead", "probe_clipped"):
                        pg[k] = [a + b for a, b in zip(pg[k], raw[k])]
                    pg["blocks"] += raw["gain_blocks"]
                if amax is not None:
                    m["scales"]["group_amax"] = _num(amax, 8)
                entry["metrics"][spec.key] = m
            del x
            sync()
            t2 = time.perf_counter()
            timing["read_s"] += t1 - t0
            timing["compute_s"] += t2 - t1
            rows.append(entry)
            bar.update(mod)
    finally:
        bar.close()
        reader.close()

    results: Dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "aqn_rs_version": _aqn_rs.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": src.describe(),
        "settings": {
            "quant_type": quant_type,
            "formats": {s.key: s.describe() for s in specs},
            "exclude": list(exclude or ()), "include": list(include) if include is not None else None,
            "device": device, "dtype": dtype, "fuse_global_scales": bool(fuse_global_scales),
            "gain_ladder": gain_ladder(), "edge_fraction": EDGE_FRACTION,
            "threads": int(_aqn_rs.cpu_threads()),
        },
        "layers": rows,
        "skipped": skipped,
        "timing": timing,
    }
    if calib is not None:
        t0 = time.perf_counter()
        results["calib"] = run_calibration(src, results, specs, calib, calib_samples, calib_batch_size,
                                           calib_max_length, device, selector_args=(include, exclude),
                                           fuse=fuse_global_scales, progress=progress)
        timing["calib_s"] = time.perf_counter() - t0
    results["summary"] = summarize(results, top=top, pooled_gain=pooled)
    timing["total_s"] = time.perf_counter() - t_start
    return results


# ---------------------------------------------------------------------------------------------
# Calibration: per-layer output error on real activations, end-to-end NLL change
# ---------------------------------------------------------------------------------------------


def calibration_texts(calib: str, n: int) -> Tuple[List[str], str]:
    """The first `n` calibration texts and a description.

    `calib` is "builtin" (the experiments' built-in GSM8K-style problems, test split), a
    `.jsonl` file (records with question+answer (GSM8K), prompt+response/completion, text, or
    messages), or a text file (paragraphs separated by blank lines, else one sample a line).
    """
    if n <= 0:
        raise ScanError(f"--calib-samples must be positive, got {n}")
    if calib == "builtin":
        recs = builtin_problems("test", n)
        return [f"{r['question']}\n{r['answer']}" for r in recs], f"builtin problems (test split, {n})"
    p = Path(calib).expanduser()
    if not p.is_file():
        raise ScanError(f"calibration file {p} does not exist (pass a .jsonl/.txt file or 'builtin')")
    texts: List[str] = []
    if p.suffix in (".jsonl", ".json"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ScanError(f"{p} line {i} is not JSON: {e}") from None
            if isinstance(r, str):
                texts.append(r)
            elif isinstance(r, dict) and "question" in r:
                texts.append(f"{r['question']}\n{r.get('answer', '')}".rstrip())
            elif isinstance(r, dict) and "prompt" in r:
                texts.append(f"{r['prompt']}{r.get('response', r.get('completion', ''))}")
            elif isinstance(r, dict) and "text" in r:
                texts.append(str(r["text"]))
            elif isinstance(r, dict) and isinstance(r.get("messages"), list):
                texts.append("\n".join(str(m.get("content", "")) for m in r["messages"] if isinstance(m, dict)))
            else:
                raise ScanError(f"{p} line {i}: expected question/answer, prompt/response, text or messages")
            if len(texts) >= n:
                break
    else:
        body = p.read_text()
        parts = [s.strip() for s in re.split(r"\n\s*\n", body)] if "\n\n" in body else body.splitlines()
        texts = [s for s in parts if s.strip()][:n]
    if not texts:
        raise ScanError(f"calibration file {p} has no samples")
    return texts, f"{p} (first {len(texts)})"


def run_calibration(src: ModelSource, results: Dict[str, Any], specs: Sequence[FormatSpec], calib: str,
                    samples: int, batch_size: int, max_length: int, device: str,
                    selector_args=(None, DEFAULT_EXCLUDE), fuse: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Load the model, run the calibration texts teacher-forced, and record (a) per scanned
    layer and format the error of the layer's output when only its weight is fake-quantized
    (its clean input, `F.linear(x, Q(W))` vs `F.linear(x, W)`), into each layer's
    `metrics[fmt]["output"]`, and (b) the mean NLL per token of the clean model and of the
    model with every selected layer fake-quantized (`quantize_model`). Returns the `calib` block.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hooks import quantize_model

    if src.folder is None or (src.kind != "gguf" and not (src.folder / "config.json").is_file()):
        raise ScanError(f"--calib runs the model, which needs a config.json next to the weights ({src.path})")
    texts, desc = calibration_texts(calib, samples)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kw = {"gguf_file": src.gguf.name} if src.gguf else {}
    if not src.gguf and not any((src.folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ScanError(f"--calib needs the model's tokenizer next to its config (tokenizer.json or "
                        f"tokenizer_config.json in {src.folder}); copy it there from the base model")
    try:
        tok = AutoTokenizer.from_pretrained(str(src.folder), **kw)
    except (OSError, ValueError) as e:
        raise ScanError(f"--calib: cannot load the tokenizer of {src.folder}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=dtype, **kw).to(device).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF-loaded: dequantized already
        model.hf_quantizer = None
    mods = dict(model.named_modules())
    by_name = {e["name"]: e for e in results["layers"]}
    group_amax = {}
    if fuse and any(s.format == "nvfp4" for s in specs):
        from .export import fused_weight_groups

        chosen = [e["name"] for e in results["layers"] if not e["excluded"] and e["type"] == "linear" and e["name"] in mods]
        for members in fused_weight_groups(chosen):
            a = max(float(Nvfp4Quantizer().amax(mods[m].weight.detach().contiguous())) for m in members)
            group_amax.update({m: a for m in members})
    acc = {(n, s.key): [0.0, 0.0, 0] for n in by_name for s in specs}
    state: Dict[str, Any] = {"mask": None}

    def hook(name):
        def fn(module, args, output):
            w = module.weight.detach().contiguous()
            mask = state["mask"]
            y = output.detach()[mask].float()
            sy = float(torch.sum(y * y, dtype=torch.float64))
            for s in specs:
                q = s.quantizer()
                wq = q.fake_quant(w, group_amax.get(name)) if s.format == "nvfp4" else q.fake_quant(w)
                if isinstance(module, torch.nn.Embedding):
                    yq = F.embedding(args[0], wq)
                else:
                    yq = F.linear(args[0], wq, module.bias)
                err = yq.detach()[mask].float() - y
                a = acc[(name, s.key)]
                a[0] += sy
                a[1] += float(torch.sum(err * err, dtype=torch.float64))
                a[2] += int(mask.sum())
        return fn

    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        batches.append({k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")})

    def nll_pass(label: str) -> Tuple[float, int]:
        total, count = 0.0, 0
        bar = _Progress(len(batches), progress, desc=f"calib {label}", unit="batch")
        with torch.no_grad():
            for b in batches:
                state["mask"] = b["attention_mask"].bool()
                logits = model(**b).logits
                labels = b["input_ids"].masked_fill(~state["mask"], -100)
                total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100, reduction="sum"))
                count += int((labels[:, 1:] != -100).sum())
                bar.update(label)
        bar.close()
        return total, count

    handles = [mods[n].register_forward_hook(hook(n)) for n in by_name if n in mods]
    try:
        base_sum, tokens = nll_pass("clean")
    finally:
        for h in handles:
            h.remove()
    base = base_sum / max(tokens, 1)
    for (name, key), (sy, se, ntok) in acc.items():
        if ntok == 0:
            continue
        by_name[name]["metrics"][key]["output"] = {
            "sqnr_db": _num(10 * math.log10(sy / se), 8) if se > 0 and sy > 0 else None,
            "rel_err": _num(math.sqrt(se / sy), 8) if sy > 0 else None,
            "sum_y2": sy, "sum_err2": se, "tokens": ntok,
        }
    include, exclude = selector_args
    nll: Dict[str, Any] = {"clean": base}
    for s in specs:
        h = quantize_model(model, s.quantizer(), exclude=exclude, include=include,
                           layer_types=("linear", "embedding"), fuse_global_scales=fuse, cache=False)
        try:
            qs, _ = nll_pass(s.key)
        finally:
            h.remove()
        qn = qs / max(tokens, 1)
        nll[s.key] = {"nll": qn, "delta": qn - base, "ppl_ratio": math.exp(qn - base)}
    return {"source": desc, "samples": len(texts), "tokens": tokens, "batch_size": batch_size,
            "max_length": max_length, "model_dtype": str(dtype).removeprefix("torch."), "nll": nll}


# ---------------------------------------------------------------------------------------------
# Summary and comparison
# ---------------------------------------------------------------------------------------------


def _pool(entries: Sequence[Dict[str, Any]], key: str) -> Dict[str, Any]:
    """Pooled metrics of several layers for one format (sums and counts added)."""
    ms = [e["metrics"][key] for e in entries if key in e["metrics"]]
    if not ms:
        return {}
    sx = sum(m["sums"]["sum_x2"] for m in ms)
    se = sum(m["sums"]["sum_err2"] for m in ms)
    n = sum(m["numel"] - m["counts"]["nonfinite_elements"] for m in ms)
    sq = [m["sqnr_db"] for m in ms if m["sqnr_db"] is not None]
    out = {
        "layers": len(ms),
        "numel": sum(m["numel"] for m in ms),
        "sqnr_db": _num(10 * math.log10(sx / se), 8) if se > 0 and sx > 0 else None,
        "rel_err": _num(math.sqrt(se / sx), 8) if sx > 0 else None,
        "mean_layer_sqnr_db": _num(sum(sq) / len(sq), 8) if sq else None,
        "min_layer_sqnr_db": _num(min(sq), 8) if sq else None,
        "deadzone_frac": _num(sum(m["counts"]["deadzone"] for m in ms) / n, 8) if n else None,
        "saturation_frac": _num(sum(m["counts"]["saturated"] for m in ms) / n, 8) if n else None,
        "max_abs_err": max((m["max_abs_err"] or 0.0) for m in ms),
    }
    outs = [m["output"] for m in ms if "output" in m]
    if outs:
        oy, oe = sum(o["sum_y2"] for o in outs), sum(o["sum_err2"] for o in outs)
        out["output_sqnr_db"] = _num(10 * math.log10(oy / oe), 8) if oe > 0 and oy > 0 else None
    return out


def _pool_gain(entries: Sequence[Dict[str, Any]], key: str, ladder: Sequence[float]) -> Dict[str, Any]:
    """Pooled gain scan (block-weighted) of several layers; needs the per-layer curves."""
    gs = [e["metrics"][key]["gain"] for e in entries if key in e["metrics"]]
    gs = [g for g in gs if g.get("blocks") and g.get("response") is not None]
    if not gs:
        return {}
    blocks = sum(g["blocks"] for g in gs)
    resp = [sum(g["response"][j] * g["blocks"] for g in gs) for j in range(len(ladder))]
    dead = [sum(g["dead_frac"][j] * g["blocks"] for g in gs) for j in range(len(ladder))]
    clip = [sum(g["clip_frac"][j] * g["blocks"] for g in gs) for j in range(len(ladder))]
    out = gain_curves(resp, dead, clip, blocks, ladder)
    for k in ("response", "gain", "dead_frac", "clip_frac"):
        out[k] = [_num(v) for v in out[k]]
    return out


def summarize(results: Dict[str, Any], top: int = 10, pooled_gain: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Per format: totals over the quantized (non-excluded) layers, per projection type, the
    `top` worst layers by SQNR, the pooled gain scan; plus the excluded layers' totals.

    `pooled_gain` ({key: summed raw gain-scan arrays and blocks}, as `scan` accumulates them)
    gives the exact pooled gain scan; without it, it is pooled from the per-layer curves."""
    layers = results["layers"]
    ladder = results["settings"]["gain_ladder"]
    inc = [e for e in layers if not e["excluded"]]
    exc = [e for e in layers if e["excluded"]]
    out: Dict[str, Any] = {"layers": len(layers), "quantized_layers": len(inc), "excluded_layers": [e["name"] for e in exc],
                           "formats": {}}
    for key in results["settings"]["formats"]:
        procs = sorted({e["proj"] for e in inc}, key=lambda p: (PROJ_ORDER.index(p) if p in PROJ_ORDER else 99, p))
        ranked = sorted((e for e in inc if key in e["metrics"]),
                        key=lambda e: (e["metrics"][key]["sqnr_db"] is None, e["metrics"][key]["sqnr_db"] or 0.0))
        worst = [{"name": e["name"], "proj": e["proj"], "sqnr_db": e["metrics"][key]["sqnr_db"],
                  "rel_err": e["metrics"][key]["rel_err"], "deadzone_frac": e["metrics"][key]["deadzone_frac"],
                  "saturation_frac": e["metrics"][key]["saturation_frac"]} for e in ranked[:top]]
        f: Dict[str, Any] = {
            "totals": _pool(inc, key),
            "by_proj": {p: _pool([e for e in inc if e["proj"] == p], key) for p in procs},
            "worst_layers": worst,
            "gain": _pool_gain(inc, key, ladder),
        }
        if pooled_gain and key in pooled_gain:
            pg = pooled_gain[key]
            g = gain_curves(pg["response_sum"], pg["probe_dead"], pg["probe_clipped"], pg["blocks"], ladder)
            for k in ("response", "gain", "dead_frac", "clip_frac"):
                if g[k] is not None:
                    g[k] = [_num(v) for v in g[k]]
            f["gain"] = g
        if exc:
            f["excluded_totals"] = _pool(exc, key)
        calib = results.get("calib")
        if calib and key in calib.get("nll", {}):
            f["nll_delta"] = calib["nll"][key]["delta"]
        out["formats"][key] = f
    return out


def compare_scans(results: Dict[str, Any], other: Dict[str, Any], other_path: Optional[str] = None) -> Dict[str, Any]:
    """Per-layer and aggregate deltas `results - other` for every format both scans have (e.g.
    an AQN-trained checkpoint against a plain one). Positive `delta_sqnr_db` means `results` is
    quantized more faithfully.

    Returns:
        `{"other": ..., "formats": {key: {"totals": ..., "by_proj": ..., "layers": [...]}},
        "only_here": [...], "only_other": [...], "warnings": [...]}`.
    """
    here = {e["name"]: e for e in results["layers"]}
    there = {e["name"]: e for e in other["layers"]}
    common = [n for n in here if n in there]
    warnings_ = []
    for k in ("dtype", "fuse_global_scales"):
        a, b = results["settings"].get(k), other["settings"].get(k)
        if a != b:
            warnings_.append(f"settings differ: {k} = {a!r} here, {b!r} in the other scan")
    out: Dict[str, Any] = {
        "other": other_path, "other_model": other.get("model", {}).get("path"),
        "matched_layers": len(common),
        "only_here": [n for n in here if n not in there], "only_other": [n for n in there if n not in here],
        "warnings": warnings_, "formats": {},
    }
    for key in results["settings"]["formats"]:
        if key not in other["settings"]["formats"]:
            continue
        rows = []
        for n in common:
            a, b = here[n]["metrics"].get(key), there[n]["metrics"].get(key)
            if a is None or b is None:
                continue
            row = {"name": n, "proj": here[n]["proj"], "excluded": here[n]["excluded"],
                   "sqnr_db": a["sqnr_db"], "other_sqnr_db": b["sqnr_db"]}
            for m in ("sqnr_db", "rel_err", "deadzone_frac", "saturation_frac"):
                row[f"delta_{m}"] = _num(a[m] - b[m], 8) if a[m] is not None and b[m] is not None else None
            if "output" in a and "output" in b and a["output"]["sqnr_db"] is not None and b["output"]["sqnr_db"] is not None:
                row["delta_output_sqnr_db"] = _num(a["output"]["sqnr_db"] - b["output"]["sqnr_db"], 8)
            rows.append(row)
        inc_here = [here[n] for n in common if not here[n]["excluded"]]
        inc_there = [there[n] for n in common if not here[n]["excluded"]]

        def totals(ea, eb):
            pa, pb = _pool(ea, key), _pool(eb, key)
            t = {"sqnr_db": pa.get("sqnr_db"), "other_sqnr_db": pb.get("sqnr_db")}
            if t["sqnr_db"] is not None and t["other_sqnr_db"] is not None:
                d = t["sqnr_db"] - t["other_sqnr_db"]
                t["delta_sqnr_db"] = _num(d, 8)
                t["sqnr_change_pct"] = _num(100 * d / abs(t["other_sqnr_db"]), 6) if t["other_sqnr_db"] else None
                t["noise_power_change_pct"] = _num(100 * (10 ** (-d / 10) - 1), 6)
            for m in ("deadzone_frac", "saturation_frac", "rel_err"):
                if pa.get(m) is not None and pb.get(m) is not None:
                    t[f"delta_{m}"] = _num(pa[m] - pb[m], 8)
            return t

        tot = totals(inc_here, inc_there)
        ds = [r["delta_sqnr_db"] for r in rows if not r["excluded"] and r["delta_sqnr_db"] is not None]
        tot["layers_better"] = sum(d > 0 for d in ds)
        tot["layers_worse"] = sum(d < 0 for d in ds)
        tot["mean_layer_delta_sqnr_db"] = _num(sum(ds) / len(ds), 8) if ds else None
        procs = sorted({e["proj"] for e in inc_here}, key=lambda p: (PROJ_ORDER.index(p) if p in PROJ_ORDER else 99, p))
        by_proj = {p: totals([e for e in inc_here if e["proj"] == p], [e for e in inc_there if e["proj"] == p]) for p in procs}
        rc, oc = results.get("calib"), other.get("calib")
        if rc and oc and key in rc["nll"] and key in oc["nll"]:
            tot["delta_nll_delta"] = rc["nll"][key]["delta"] - oc["nll"][key]["delta"]
        out["formats"][key] = {"totals": tot, "by_proj": by_proj, "layers": rows}
    return out


# ---------------------------------------------------------------------------------------------
# Output: JSON, terminal report, plot
# ---------------------------------------------------------------------------------------------


def _scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list, tuple))


def _dump(v: Any, indent: int = 0) -> str:
    """JSON with one item per line, except lists of scalars and small dicts of scalars (and of
    short scalar lists), which stay on one line: a 200-layer scan stays readable and small."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(v, dict):
        if not v:
            return "{}"
        if all(_scalar(x) or (isinstance(x, (list, tuple)) and len(x) <= 16 and all(map(_scalar, x)))
               for x in v.values()) and len(v) <= 40:
            return "{" + ", ".join(f"{json.dumps(str(k))}: {_dump(x)}" for k, x in v.items()) + "}"
        items = [f"{pad1}{json.dumps(str(k))}: {_dump(x, indent + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, (list, tuple)):
        if all(not isinstance(x, (dict, list, tuple)) for x in v):
            return "[" + ", ".join(_dump(x) for x in v) + "]"
        return "[\n" + ",\n".join(pad1 + _dump(x, indent + 1) for x in v) + "\n" + pad + "]"
    if isinstance(v, float) and not math.isfinite(v):
        return "null"
    return json.dumps(v)


def write_results(results: Dict[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write results as JSON (compact lists; written to a temporary file, then renamed)."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(_dump(results) + "\n")
    os.replace(tmp, p)
    return p


def load_results(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a scan JSON written by `write_results`, checking its schema and version."""
    p = Path(path)
    if not p.is_file():
        raise ScanError(f"scan results {p} do not exist")
    try:
        r = json.loads(p.read_text())
    except ValueError as e:
        raise ScanError(f"{p} is not JSON: {e}") from None
    if not isinstance(r, dict) or r.get("schema") != SCHEMA:
        raise ScanError(f"{p} is not an aqn-rs scan (schema {r.get('schema') if isinstance(r, dict) else None!r})")
    if r.get("schema_version") != SCHEMA_VERSION:
        raise ScanError(f"{p} has scan schema version {r.get('schema_version')}; this aqn-rs reads version "
                        f"{SCHEMA_VERSION}: rescan the model")
    return r


def _f(v: Optional[float], fmt: str = ".2f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def format_report(results: Dict[str, Any], top: int = 5) -> str:
    """The terminal report: totals per format, per projection type, worst layers, calibration
    and comparison results."""
    s = results["summary"]
    keys = list(results["settings"]["formats"])
    t = results["timing"]
    lines = [
        f"aqn-rs scan of {results['model']['path']} ({results['model']['kind']}): {s['quantized_layers']} "
        f"quantized layers, {len(s['excluded_layers'])} excluded"
        + (f" ({', '.join(s['excluded_layers'][:3])}{', ...' if len(s['excluded_layers']) > 3 else ''})" if s["excluded_layers"] else "")
        + f"; {t.get('total_s', 0):.1f} s (read {t['read_s']:.1f} s, compute {t['compute_s']:.1f} s on "
        f"{results['settings']['device']})",
    ]
    if results["model"].get("note"):
        lines.append(f"  {results['model']['note']}")
    lines.append("")
    head = (f"{'format':<13}{'SQNR dB':>9}{'rel err':>9}{'deadzone':>10}{'saturated':>11}{'min layer dB':>14}"
            f"{'dead edge':>11}{'sat blocks':>12}")
    lines.append(head)
    lines.append(" " * 13 + "(dead edge: probe magnitude / block amax below which the median block returns 0; "
                 "sat blocks: blocks whose own amax is clipped)")
    for k in keys:
        f = s["formats"][k]
        tt, g = f["totals"], f.get("gain") or {}
        lines.append(f"{k:<13}{_f(tt.get('sqnr_db')):>9}{_f(tt.get('rel_err'), '.2%'):>9}"
                     f"{_f(tt.get('deadzone_frac'), '.2%'):>10}{_f(tt.get('saturation_frac'), '.3%'):>11}"
                     f"{_f(tt.get('min_layer_sqnr_db')):>14}{_f(g.get('deadzone_edge'), '.4f'):>11}"
                     f"{_f(g.get('saturating_blocks_frac'), '.1%'):>12}")
    lines.append("")
    lines.append("SQNR dB by projection (pooled)" + (" / output SQNR dB" if results.get("calib") else ""))
    procs = list(next(iter(s["formats"].values()))["by_proj"]) if s["formats"] else []
    lines.append(f"{'proj':<9}{'layers':>7}" + "".join(f"{k:>16}" for k in keys))
    for p in procs:
        cells = []
        for k in keys:
            bp = s["formats"][k]["by_proj"].get(p, {})
            c = _f(bp.get("sqnr_db"))
            if "output_sqnr_db" in bp:
                c += f" / {_f(bp.get('output_sqnr_db'))}"
            cells.append(f"{c:>16}")
        n = s["formats"][keys[0]]["by_proj"].get(p, {}).get("layers", 0)
        lines.append(f"{p:<9}{n:>7}" + "".join(cells))
    for k in keys:
        worst = s["formats"][k]["worst_layers"][:top]
        if worst:
            lines.append("")
            lines.append(f"worst layers, {k}: " + "; ".join(f"{w['name']} {_f(w['sqnr_db'])} dB" for w in worst))
    calib = results.get("calib")
    if calib:
        lines.append("")
        lines.append(f"calibration: {calib['source']}, {calib['tokens']} tokens; clean NLL {calib['nll']['clean']:.4f}")
        for k in keys:
            if k in calib["nll"]:
                c = calib["nll"][k]
                lines.append(f"  {k:<13} NLL {c['nll']:.4f}  delta {c['delta']:+.4f}  (perplexity x{c['ppl_ratio']:.3f})")
    comp = results.get("compare")
    if comp:
        lines.append("")
        lines.append(f"compared with {comp['other']} ({comp['matched_layers']} layers matched): "
                     "delta = this - other, + means less quantization damage here")
        for w in comp["warnings"]:
            lines.append(f"  warning: {w}")
        for k, c in comp["formats"].items():
            tt = c["totals"]
            lines.append(f"  {k:<13} SQNR {_f(tt.get('sqnr_db'))} vs {_f(tt.get('other_sqnr_db'))} dB: "
                         f"{_f(tt.get('delta_sqnr_db'), '+.3f')} dB ({_f(tt.get('sqnr_change_pct'), '+.2f')}%), "
                         f"noise power {_f(tt.get('noise_power_change_pct'), '+.1f')}%; layers better/worse "
                         f"{tt['layers_better']}/{tt['layers_worse']}")
            lines.append("    by proj: " + ", ".join(f"{p} {_f(v.get('delta_sqnr_db'), '+.2f')}" for p, v in c["by_proj"].items()))
    return "\n".join(lines)


def plot_results(results: Dict[str, Any], path: Union[str, os.PathLike], other: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """PNG: (1) SQNR per layer per format (excluded layers hollow on a grey band; `other`'s
    dashed), (2) deadzone and saturation fractions per layer, (3) the pooled gain scan.
    Returns None (with a note on stderr) when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        print("aqn-rs scan: matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)
        return None
    keys = list(results["settings"]["formats"])
    layers = results["layers"]
    xs = list(range(len(layers)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(3, 1, figsize=(max(10, min(28, len(layers) * 0.06 + 8)), 12),
                             gridspec_kw={"height_ratios": [3, 2, 2]})
    ax1, ax2, ax3 = axes
    excl = [i for i, e in enumerate(layers) if e["excluded"]]
    for i in excl:
        for ax in (ax1, ax2):
            ax.axvspan(i - 0.5, i + 0.5, color="0.85", lw=0)
    for ci, k in enumerate(keys):
        c = colors[ci % len(colors)]
        ys = [e["metrics"].get(k, {}).get("sqnr_db") for e in layers]
        yv = [float("nan") if y is None else y for y in ys]
        ax1.plot(xs, yv, "-", color=c, lw=0.8, alpha=0.7)
        inc = [i for i in xs if not layers[i]["excluded"]]
        ax1.plot([xs[i] for i in inc], [yv[i] for i in inc], "o", ms=2.5, color=c, label=k)
        if excl:
            ax1.plot([xs[i] for i in excl], [yv[i] for i in excl], "o", ms=6, mfc="none", color=c,
                     label=f"{k} (excluded)" if ci == 0 else None)
        if other is not None:
            there = {e["name"]: e for e in other["layers"]}
            yo = [there.get(e["name"], {}).get("metrics", {}).get(k, {}).get("sqnr_db") for e in layers]
            ax1.plot(xs, [float("nan") if y is None else y for y in yo], "--", color=c, lw=0.9, alpha=0.8,
                     label=f"{k} ({Path(str(other.get('model', {}).get('path', 'other'))).name})")
        dz = [e["metrics"].get(k, {}).get("deadzone_frac") for e in layers]
        sat = [e["metrics"].get(k, {}).get("saturation_frac") for e in layers]
        ax2.plot(xs, [float("nan") if v is None else 100 * v for v in dz], "-", color=c, lw=0.9, label=f"{k} deadzone")
        ax2.plot(xs, [float("nan") if v is None else 100 * v for v in sat], ":", color=c, lw=1.2, label=f"{k} saturated")
        g = results["summary"]["formats"][k].get("gain") or {}
        if g.get("gain"):
            lad = results["settings"]["gain_ladder"]
            mids = [math.sqrt(lad[j] * lad[j + 1]) for j in range(len(lad) - 1)]
            eff = [None if v is None else v / r for v, r in zip(g["response"], lad)]
            ax3.plot(lad, [float("nan") if v is None else v for v in eff], "-o", ms=3, color=c, label=f"{k} Q(x)/x")
            ax3.plot(mids, [float("nan") if v is None else v for v in g["gain"]], "-", lw=0.6, alpha=0.5,
                     color=c, label=f"{k} dQ/dx")
            ax3.plot(lad, g["clip_frac"], ":", color=c, lw=1, label=f"{k} blocks clipping the probe")
            ax3.plot(lad, g["dead_frac"], "--", color=c, lw=1, label=f"{k} blocks zeroing the probe")
            for edge in (g.get("deadzone_edge"), g.get("saturation_edge")):
                if edge:
                    ax3.axvline(edge, color=c, lw=0.8, alpha=0.6)
    ticks = [i for i, e in enumerate(layers) if e["layer_index"] is not None and
             (i == 0 or layers[i - 1]["layer_index"] != e["layer_index"])]
    step = max(1, len(ticks) // 30)
    for ax in (ax1, ax2):
        ax.set_xticks([ticks[j] for j in range(0, len(ticks), step)])
        ax.set_xticklabels([str(layers[ticks[j]]["layer_index"]) for j in range(0, len(ticks), step)], fontsize=7)
        ax.set_xlim(-1, len(layers))
        ax.grid(alpha=0.3)
    ax1.set_ylabel("weight SQNR (dB)")
    model = results["model"]
    label = model["note"].split(",")[0] if model.get("kind") == "embedded" and model.get("note") else model["path"]
    ax1.set_title(f"SRDD scan: {label} — per-layer SQNR (grey band = excluded from quantization)", fontsize=10)
    ax1.legend(fontsize=7, ncol=3, loc="best", framealpha=0.6)
    ax2.set_ylabel("% of elements")
    ax2.set_xlabel("layer (module order; ticks at transformer block starts)")
    ax2.legend(fontsize=7, ncol=4)
    ax3.set_xscale("log")
    ax3.set_xlabel("probe magnitude relative to the block amax")
    ax3.set_ylabel("gain / fraction of blocks")
    ax3.axhline(1.0, color="0.5", lw=0.6)
    ax3.set_ylim(-0.05, 2.5)
    ax3.grid(alpha=0.3)
    ax3.set_title("gain scan, pooled over quantized layers: mean response Q(x)/x and slope dQ/dx of probes "
                  "x = r * block amax (deadzone: gain ~0; saturation: gain drops; vertical lines: edges)", fontsize=9)
    ax3.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# ---------------------------------------------------------------------------------------------
# Command line: `aqn-rs scan` (wired by cli.py) and scripts/srdd_quant_scanner.py
# ---------------------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser, plan_style: bool = False) -> None:
    def flag(name: str) -> str:
        return "--" + (name.replace("-", "_") if plan_style else name)

    p.add_argument(flag("model-path") if plan_style else "--model", dest="model", default=None,
                   help="checkpoint: transformers folder, .safetensors file, verl global_step_N, run folder, "
                        ".gguf, or 'embedded'")
    p.add_argument(flag("quant-type"), dest="quant_type", choices=QUANT_TYPES, default="all",
                   help="format(s) to measure (default all)")
    p.add_argument(flag("output"), dest="output", default=None, help="write the results JSON here")
    p.add_argument(flag("plot"), dest="plot", default=None, help="write a PNG plot here")
    p.add_argument(flag("compare"), dest="compare", nargs="+", default=None, metavar="SCAN.json",
                   help="with --model: per-layer deltas against this earlier scan; without: compare two scans")
    p.add_argument(flag("device"), dest="device", default="cpu", help="cpu (Rust core) or cuda (default cpu)")
    p.add_argument(flag("exclude"), dest="exclude", nargs="*", default=list(DEFAULT_EXCLUDE), metavar="PATTERN",
                   help="modules kept dense in training (measured, marked, left out of the summary); "
                        "default: lm_head embed_tokens")
    p.add_argument(flag("include"), dest="include", nargs="*", default=None, metavar="PATTERN",
                   help="only these modules count as quantized")
    p.add_argument(flag("scale-mode"), dest="scale_mode", nargs="+", choices=SCALE_MODES, default=["floor"],
                   help="MXFP4 scale mode(s), each measured as its own format (default floor)")
    p.add_argument(flag("dtype"), dest="dtype", choices=DTYPES, default="keep",
                   help="cast weights before quantizing (default keep the stored dtype)")
    p.add_argument(flag("no-fuse-global-scales"), dest="no_fuse_global_scales", action="store_true",
                   help="NVFP4: one global scale per tensor (training and vLLM share one per q/k/v and gate/up)")
    p.add_argument(flag("skip-excluded"), dest="skip_excluded", action="store_true",
                   help="do not measure excluded layers")
    p.add_argument(flag("no-curves"), dest="no_curves", action="store_true",
                   help="drop the per-layer gain-scan curves from the JSON (thresholds and pooled curves stay)")
    p.add_argument(flag("calib"), dest="calib", default=None, metavar="FILE",
                   help="calibration data (.jsonl GSM8K-style or text, or 'builtin'): per-layer output error "
                        "and the end-to-end NLL change")
    p.add_argument(flag("calib-samples"), dest="calib_samples", type=int, default=32)
    p.add_argument(flag("calib-batch-size"), dest="calib_batch_size", type=int, default=8)
    p.add_argument(flag("calib-max-length"), dest="calib_max_length", type=int, default=512)
    p.add_argument(flag("top"), dest="top", type=int, default=10, help="worst layers listed (default 10)")
    p.add_argument(flag("quiet"), dest="quiet", action="store_true", help="no progress bar and no report")


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the `scan` subcommand to an argparse subparsers object; `run_cli` runs it."""
    p = subparsers.add_parser(
        "scan",
        help="SRDD scan: layer-by-layer quantization damage of a checkpoint (JSON, table, plot)",
        description=(
            "Measure, layer by layer, what MXFP4/NVFP4 fake quantization does to a checkpoint's "
            "weights: SQNR, relative and max error, deadzone and saturation fractions, code and "
            "block-scale histograms, and the gain scan; with --calib also each layer's output error "
            "and the end-to-end NLL change. docs/SCANNER.md defines every number."
        ),
    )
    _add_arguments(p)
    return p


def run_cli(args: argparse.Namespace, prog: str = "aqn-rs scan") -> int:
    """Run the scan command from parsed arguments; returns the exit status (2 on a usage error)."""
    try:
        if args.model is None:
            if not args.compare or len(args.compare) != 2:
                raise ScanError("pass --model PATH to scan, or --compare A.json B.json to compare two scans")
            results = load_results(args.compare[0])
            other = load_results(args.compare[1])
            results["compare"] = compare_scans(results, other, args.compare[1])
        else:
            if args.compare and len(args.compare) != 1:
                raise ScanError("with --model, --compare takes one earlier scan")
            other = load_results(args.compare[0]) if args.compare else None
            results = scan(
                args.model, args.quant_type, scale_mode=args.scale_mode, exclude=args.exclude,
                include=args.include, device=args.device, dtype=args.dtype,
                fuse_global_scales=not args.no_fuse_global_scales, skip_excluded=args.skip_excluded,
                curves=not args.no_curves, calib=args.calib, calib_samples=args.calib_samples,
                calib_batch_size=args.calib_batch_size, calib_max_length=args.calib_max_length,
                top=args.top, progress=not args.quiet,
            )
            if other is not None:
                results["compare"] = compare_scans(results, other, args.compare[0])
    except (ScanError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        write_results(results, args.output)
    if args.plot:
        plot_results(results, args.plot, other)
    if not args.quiet:
        print(format_report(results, top=min(args.top, 5)))
        if args.output:
            print(f"\nresults: {args.output}" + (f", plot: {args.plot}" if args.plot else ""))
    return 0


def plan_main(argv: Optional[Sequence[str]] = None) -> int:
    """`scripts/srdd_quant_scanner.py`: the research plan's flags (`--model_path`,
    `--quant_type`, `--output`, ...) on the same scan."""
    p = argparse.ArgumentParser(prog="srdd_quant_scanner.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p, plan_style=True)
    return run_cli(p.parse_args(argv), prog="srdd_quant_scanner.py")


__all__ = [
    "DEFAULT_EXCLUDE", "FormatSpec", "ModelSource", "QUANT_TYPES", "SCHEMA", "SCHEMA_VERSION",
    "SafetensorsReader", "ScanError", "add_cli", "calibration_texts", "compare_scans", "format_report",
    "format_specs", "gain_curves", "gain_ladder", "layer_index", "load_results", "metrics_from_raw",
    "plan_main", "plot_results", "proj_type", "resolve_model", "run_calibration", "run_cli",
    "rust_raw_stats", "scan", "summarize", "tensor_metrics", "tensor_raw_stats", "torch_raw_stats", "write_results",
]
