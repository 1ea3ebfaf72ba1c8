"""The scanner's formats and per-tensor numbers: the format specs, the gain ladder, and the raw
statistics of one tensor (Rust on the CPU, torch reductions on any device) turned into metrics."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Union

from .. import _aqn_rs
from ..constants import E2M1_MAX, MXFP4_BLOCK, NVFP4_BLOCK, SCALE_MODES
from ..errors import ScanError
from ..quantizers import Mxfp4Quantizer, Nvfp4Quantizer, _check_input, _is_torch_tensor, _rs_view

SCHEMA = "aqn-rs.scan"
SCHEMA_VERSION = 1
QUANT_TYPES = ("mxfp4", "nvfp4", "all")
DTYPES = ("keep", "bfloat16", "float16", "float32")

# An element whose scaled value |x / d| exceeds E2M1's largest magnitude is clipped.
F4_E2M1_MAX = E2M1_MAX
# A probe counts as "in the deadzone" / "saturated" at a rung when at least this fraction of
# the blocks zero / clip it: the median block's threshold (docs/guides/SCANNER.md, "Gain scan").
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

    from .. import reference

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
    """Thresholds of the gain scan (docs/guides/SCANNER.md): the deadzone edge is where the fraction
    of blocks that zero the probe falls through EDGE_FRACTION (the median block's deadzone), the
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
    from pooled gain-scan sums (docs/guides/SCANNER.md, "Gain scan")."""
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
    """The per-layer metrics of one format from raw sums and counts
    (docs/guides/SCANNER.md, "Metrics").

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


