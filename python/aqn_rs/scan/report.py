"""What a scan's results become: the summary, the comparison of two scans, the JSON file, the
terminal report and the plot."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from .._plot import pyplot
from ..errors import ScanError
from .metrics import PROJ_ORDER, SCHEMA, SCHEMA_VERSION, _num, gain_curves

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


