"""The scan itself (`scan`): every selected layer's weight read once, one format after another,
into the results dict with the versioned schema."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Dict, Optional, Sequence, Union

from .. import _aqn_rs
from ..constants import DEFAULT_EXCLUDE
from ..errors import ScanError
from ..selection import ModuleSelector
from .calibration import run_calibration
from .layers import _check_device, _group_amaxes, _plan_layers, _prep, _Progress, layer_index, proj_type
from .metrics import (
    DTYPES,
    EDGE_FRACTION,
    SCHEMA,
    SCHEMA_VERSION,
    _num,
    format_specs,
    gain_ladder,
    metrics_from_raw,
    tensor_raw_stats,
)
from .report import summarize
from .source import _open_source, checkpoint_errors, resolve_model


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
        The results dict (schema `SCHEMA` version `SCHEMA_VERSION`, docs/guides/SCANNER.md).
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
    # a weight that cannot be read (cut short, an unsupported dtype) stops the scan as a ScanError
    with checkpoint_errors():
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


