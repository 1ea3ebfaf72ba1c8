"""Run outputs and the plan's tables.

A run directory `runs/<name>/` holds:

* `config.yaml`: the resolved preset plus the `run` block (engine, GPUs, model, data);
* `metrics.jsonl`: one JSON object per line: step 0 (validation before training), every
  optimizer step (reward, reward_std, entropy, kl when beta > 0, loss, grad_norm,
  learning_rate, completion length, sigma, stage, step_time, and val_* at validation steps),
  and a last line with `"final": true` (the final validation);
* `summary.json`: accuracies (initial, final, best), collapse verdict, timing, settings;
* `curves.png`: validation accuracy, entropy, reward and sigma against the step;
* `checkpoints/{step-000050,final}/`: transformers folders (config + safetensors + tokenizer).

`collapse_verdict` is the plan's success criterion: a run is stable when the policy entropy
stays <= threshold (1.0) from step 19 on. `compare` writes the plan's results table (markdown)
and a PNG of the accuracy and entropy curves of several runs.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .._plot import pyplot
from .errors import ExperimentError

# TRL log keys kept in metrics.jsonl (renamed where the plan uses another word).
_TRAIN_KEYS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "entropy": "entropy",
    "kl": "kl",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "clipped_ratio",
    "frac_reward_zero_std": "frac_reward_zero_std",
}


def pick_train_metrics(logs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, name in _TRAIN_KEYS.items():
        v = logs.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


class MetricsWriter:
    """Appends one JSON object per line and flushes, so a crashed run keeps its metrics."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, rec: Dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: pathlib.Path) -> List[Dict[str, Any]]:
    path = pathlib.Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ExperimentError(f"cannot read {path}: {e.strerror or e}") from None
    return [json.loads(x) for x in lines if x.strip()]


def collapse_verdict(records: Iterable[Dict[str, Any]], threshold: float = 1.0, from_step: int = 19) -> Dict[str, Any]:
    """The plan's collapse criterion on a metric stream.

    Args:
        records: dicts with "step" and "entropy" (records without entropy are skipped).
        threshold: entropy above this is collapse (the plan: 1.0).
        from_step: the criterion applies from this optimizer step on (the plan: 19).

    Returns:
        {"verdict": "stable" | "collapsed" | "partial" | "too-short", "first_step": step of the
        first entropy > threshold at step >= from_step (or None), "max_entropy": max entropy
        over those steps, "final_entropy", "threshold", "from_step"}. "collapsed": above the
        threshold at the end of the run; "partial": above it somewhere after from_step but
        back below by the end; "too-short": no entropy at or after from_step.
    """
    pts = [(int(r["step"]), float(r["entropy"])) for r in records
           if r.get("entropy") is not None and math.isfinite(float(r["entropy"]))]
    pts.sort()
    late = [(s, e) for s, e in pts if s >= from_step]
    out: Dict[str, Any] = {"threshold": threshold, "from_step": from_step, "first_step": None,
                           "max_entropy": None, "final_entropy": pts[-1][1] if pts else None}
    if not late:
        out["verdict"] = "too-short"
        return out
    out["max_entropy"] = max(e for _, e in late)
    above = [s for s, e in late if e > threshold]
    if not above:
        out["verdict"] = "stable"
    else:
        out["first_step"] = above[0]
        out["verdict"] = "collapsed" if late[-1][1] > threshold else "partial"
    return out


def _val_points(records: Sequence[Dict[str, Any]], key: str = "val_strict") -> List[tuple]:
    return [(int(r["step"]), float(r[key])) for r in records if r.get(key) is not None]


def summarize(cfg: Dict[str, Any], records: Sequence[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """summary.json's content from the config and the metric stream."""
    from .presets import describe

    strict = _val_points(records, "val_strict")
    flex = _val_points(records, "val_flexible")
    c = cfg.get("collapse") or {}
    verdict = collapse_verdict(records, float(c.get("entropy", 1.0)), int(c.get("from_step", 19)))
    ent = [float(r["entropy"]) for r in records if r.get("entropy") is not None]
    rew = [float(r["reward"]) for r in records if r.get("reward") is not None]
    qd, nd = describe(cfg)
    s = {
        "name": cfg["name"],
        "preset": cfg.get("run", {}).get("preset", cfg["name"]),
        "description": cfg.get("description", ""),
        "plan_result": cfg.get("plan_result"),
        "quantization": qd,
        "aqn": nd,
        "steps": max((int(r["step"]) for r in records), default=0),
        "val_strict_initial": strict[0][1] if strict else None,
        "val_strict_final": strict[-1][1] if strict else None,
        "val_strict_best": max(v for _, v in strict) if strict else None,
        "val_flexible_initial": flex[0][1] if flex else None,
        "val_flexible_final": flex[-1][1] if flex else None,
        "val_strict_curve": strict,
        "entropy_initial": ent[0] if ent else None,
        "entropy_final": ent[-1] if ent else None,
        "reward_initial": rew[0] if rew else None,
        "reward_final": rew[-1] if rew else None,
        "collapse": verdict,
    }
    if s["val_strict_initial"] is not None:
        s["val_strict_gain_points"] = 100 * (s["val_strict_final"] - s["val_strict_initial"])
    s.update(extra or {})
    return s


def summary_line(cfg: Dict[str, Any], s: Dict[str, Any]) -> str:
    """The one line `aqn-rs run` prints when a run is done: strict accuracy before and after,
    the collapse verdict, where the files are."""
    return (f"{cfg['name']}: strict {100 * (s.get('val_strict_initial') or 0):.1f}% -> "
            f"{100 * (s.get('val_strict_final') or 0):.1f}%, collapse verdict {s.get('collapse', {}).get('verdict')}; "
            f"files in {cfg['run']['output']}")


def write_summary(run_dir: pathlib.Path, summary: Dict[str, Any]) -> None:
    (pathlib.Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def plot_curves(run_dir: pathlib.Path, records: Sequence[Dict[str, Any]], title: str = "") -> Optional[pathlib.Path]:
    """curves.png: validation accuracy, entropy, reward and sigma against the step (matplotlib;
    without it a note is printed and None returned)."""
    plt = pyplot()
    if plt is None:
        print("[aqn-rs] matplotlib is not installed: curves.png not written (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("val_strict", "validation accuracy (greedy)", axes[0][0]), ("entropy", "policy entropy", axes[0][1]),
              ("reward", "mean reward", axes[1][0]), ("sigma", "AQN sigma", axes[1][1])]
    for key, label, ax in panels:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if key == "val_strict":
            fl = [(r["step"], 100 * r["val_flexible"]) for r in records if r.get("val_flexible") is not None]
            if fl:
                ax.plot(*zip(*fl), "o--", label="flexible")
            if pts:
                ax.plot(*zip(*[(s, 100 * v) for s, v in pts]), "o-", label="strict")
            ax.set_ylabel("%")
            ax.legend()
        elif pts:
            ax.plot(*zip(*pts), "-")
        else:  # say why a panel is empty rather than leave blank axes
            why = "no AQN in this run" if key == "sigma" else "no data"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
        if key == "entropy":
            ax.axhline(1.0, color="red", lw=0.8, ls=":")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = pathlib.Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def load_run(run_dir: pathlib.Path) -> Dict[str, Any]:
    run_dir = pathlib.Path(run_dir)
    sp = run_dir / "summary.json"
    if not sp.is_file():
        raise ExperimentError(f"{run_dir} has no summary.json (not a finished aqn-rs run)")
    summary = json.loads(sp.read_text())
    mp = run_dir / "metrics.jsonl"
    records = read_metrics(mp) if mp.is_file() else []
    return {"dir": run_dir, "summary": summary, "records": records}


def results_table(runs: Sequence[Dict[str, Any]]) -> str:
    """The plan's results table (markdown) of loaded runs."""
    head = ("| run | quantization | AQN | steps | strict @0 | strict final | gain (pts) | flexible final "
            "| entropy final | collapse (entropy > thr at step >= k) | s/step | plan reported (Qwen2.5-1.5B, GSM8K) |")
    lines = [head, "|" + "---|" * 12]
    for r in runs:
        s = r["summary"]
        c = s.get("collapse") or {}
        verdict = c.get("verdict", "-")
        if c.get("first_step") is not None:
            verdict += f" (step {c['first_step']})"
        lines.append("| " + " | ".join([
            str(s.get("name")), str(s.get("quantization")), str(s.get("aqn")), str(s.get("steps")),
            _pct(s.get("val_strict_initial")), _pct(s.get("val_strict_final")),
            _num(s.get("val_strict_gain_points"), "+.1f"), _pct(s.get("val_flexible_final")),
            _num(s.get("entropy_final")), verdict, _num(s.get("mean_step_seconds")),
            str(s.get("plan_result") or "-")]) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(runs: Sequence[Dict[str, Any]], out: pathlib.Path) -> Optional[pathlib.Path]:
    plt = pyplot()
    if plt is None:
        print("[aqn-rs] matplotlib is not installed: no PNG written (pip install matplotlib)")
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        name = r["summary"].get("name")
        acc = [(s, 100 * v) for s, v in _val_points(r["records"])]
        if acc:
            a1.plot(*zip(*acc), "o-", label=name)
        ent = [(x["step"], x["entropy"]) for x in r["records"] if x.get("entropy") is not None]
        if ent:
            a2.plot(*zip(*ent), "-", label=name)
    a1.set_title("validation strict accuracy, % (greedy)")
    a2.set_title("policy entropy")
    a2.axhline(1.0, color="red", lw=0.8, ls=":")
    for a in (a1, a2):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def compare(run_dirs: Sequence[str], out_dir: pathlib.Path, name: str = "compare") -> Dict[str, Any]:
    """Write `<out_dir>/<name>.md` (table) and `<out_dir>/<name>.png` (curves) for finished runs.

    Returns:
        {"markdown": path, "png": path or None, "table": text}.
    """
    if not run_dirs:
        raise ExperimentError("compare needs at least one run directory (runs/<name>)")
    runs = [load_run(pathlib.Path(d)) for d in run_dirs]
    table = results_table(runs)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_compare(runs, out_dir / f"{name}.png")
    md = out_dir / f"{name}.md"
    body = f"# {name}\n\n{table}"
    if png is not None:
        body += f"\n![accuracy and entropy curves]({png.name})\n"
    md.write_text(body)
    return {"markdown": md, "png": png, "table": table}
