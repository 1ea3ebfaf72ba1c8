"""`aqn-rs run | sweep | compare`: the research plan's runs from one command.

    aqn-rs run PRESET [--engine local|verl|auto] [--gpus N|auto] [--model PATH] [--data PATH]
                      [--steps N] [--output DIR] [--name NAME] [--set KEY=VALUE ...] [--dry-run]
    aqn-rs sweep PRESET --sigma 0.001,0.005,0.01 [same options]
    aqn-rs compare runs/a runs/b ... [--output DIR] [--name NAME]

Every check that can fail (preset, GPUs, model package, data, engine) runs before the model
is loaded, and a failure prints one `aqn-rs: error: ...` line and exits with status 2.
`aqn_rs.cli` wires these in with `add_cli(subparsers)` and `run_cli(args)`.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional

from ..models import resolve_model
from . import data as data_mod
from . import outputs, verl_engine
from .env import parse_sigmas, visible_gpus
from .errors import ExperimentError

COMMANDS = ("run", "sweep", "compare")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="a preset name (baseline, mxfp4-only, 1A, 1C, 1D, 1E, nvfp4, nvfp4-aqn) or a .yaml path")
    p.add_argument("--engine", choices=["local", "verl", "auto"], default="auto",
                   help="local: TRL GRPOTrainer on this machine; verl: verl's main_ppo (Ray + FSDP + vLLM, docs/VERL.md); "
                        "auto: local (a verl cluster cannot be detected from here)")
    p.add_argument("--gpus", default="auto", help="GPUs to use: a number (0 = CPU) or auto (all visible, else CPU)")
    p.add_argument("--model", default=None, help="transformers model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None,
                   help="GSM8K jsonl folder (train.jsonl, test.jsonl) or file, or 'builtin' (the built-in arithmetic task; "
                        "the default of the local engine; the verl engine's default is the Hub's openai/gsm8k)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the preset and the CPU profile)")
    p.add_argument("--output", default="runs", help="folder that holds the run folders (default: runs)")
    p.add_argument("--name", default=None, help="run folder name (default: the preset's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset key, e.g. --set training.learning_rate=3e-5 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the resolved config; train nothing")


def add_cli(subparsers) -> None:
    """Add the `run`, `sweep` and `compare` subcommands to an argparse subparsers object."""
    r = subparsers.add_parser("run", help="run one of the research plan's presets (GRPO on GSM8K-format data)")
    _add_run_options(r)
    s = subparsers.add_parser("sweep", help="run a preset over several AQN sigma_start values, then compare")
    _add_run_options(s)
    s.add_argument("--sigma", required=True, help="comma-separated sigma_start values, e.g. 0.001,0.005,0.01")
    c = subparsers.add_parser("compare", help="the plan's results table (markdown + PNG) of finished runs")
    c.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    c.add_argument("--output", default="runs", help="folder for <name>.md and <name>.png (default: runs)")
    c.add_argument("--name", default="compare", help="file name stem (default: compare)")


def resolve_gpus(text: Any) -> int:
    """`auto` -> every visible GPU (0 without CUDA); N -> N, checked against what is present."""
    present = visible_gpus()
    if text in (None, "auto"):
        return present
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ExperimentError(f"--gpus must be a number or auto, got {text!r}") from None
    if n < 0:
        raise ExperimentError(f"--gpus must be >= 0, got {n}")
    if n > present:
        raise ExperimentError(f"--gpus {n} asked but {present} GPU(s) present on this machine"
                              + (" (CUDA not available; use --gpus 0 for the CPU)" if present == 0 else ""))
    return n


def prepare(args, extra_overrides: Optional[List[str]] = None, name: Optional[str] = None) -> Dict[str, Any]:
    """Every check, cheapest first; returns the resolved config (with its `run` block)."""
    from . import presets
    if args.data == data_mod.BUILTIN:  # the local engine's default, named
        args.data = None
    overrides = list(args.overrides or []) + list(extra_overrides or [])
    if args.steps is not None:
        if args.steps < 1:
            raise ExperimentError(f"--steps must be >= 1, got {args.steps}")
        overrides += [f"training.steps={args.steps}", f"training.cpu.steps={args.steps}"]
    cfg = presets.load_preset(args.preset, overrides)
    # `--engine verl` never reaches here (_run hands it to verl_engine); auto runs locally, since
    # the verl engine needs a Ray cluster with vLLM that it cannot detect from here.
    engine = "local"
    gpus = resolve_gpus(args.gpus)
    t = presets.effective_training(cfg, gpus > 0)

    def check_data() -> None:
        if args.data is not None:
            data_mod.load_data(args.data, eval_size=int(t["eval_size"]))  # readable and well-formed
        else:
            data_mod.parse_mix((cfg.get("data") or {}).get("builtin_mix"))

    # A path the user named is checked before a default is looked up, so that the first error
    # is about what was typed, whatever is installed: a data path given with the default model
    # is read first.
    data_first = args.data is not None and args.model in (None, "", "embedded")
    if data_first:
        check_data()
    folder, gguf, model_desc = resolve_model(args.model)
    if not data_first:
        check_data()
    _check_engine_packages(gpus)
    run_name = name or args.name or cfg["name"]
    cfg["run"] = {
        "preset": args.preset,
        "engine": engine,
        "gpus": gpus,
        "model": str(pathlib.Path(args.model).resolve()) if args.model not in (None, "embedded") else None,
        "model_description": model_desc,
        "data": str(pathlib.Path(args.data).resolve()) if args.data else None,
        "output": str(pathlib.Path(args.output).resolve() / run_name),
        "overrides": overrides,
    }
    cfg["name"] = run_name
    return cfg


def _check_engine_packages(gpus: int) -> None:
    import importlib.util

    missing = [p for p in ("torch", "transformers", "trl", "datasets") if importlib.util.find_spec(p) is None]
    if gpus > 1 and importlib.util.find_spec("accelerate") is None:
        missing.append("accelerate")
    if missing:
        raise ExperimentError(f"the local engine needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _fresh_run_dir(path: pathlib.Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "summary.json", "curves.png"):
        (path / f).unlink(missing_ok=True)
    shutil.rmtree(path / "checkpoints", ignore_errors=True)
    shutil.rmtree(path / "trainer", ignore_errors=True)


def execute(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Run a prepared config: in this process, or under `accelerate launch` for several GPUs."""
    import yaml

    run_dir = pathlib.Path(cfg["run"]["output"])
    _fresh_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    gpus = int(cfg["run"]["gpus"])
    visible = visible_gpus()
    env = dict(os.environ)
    if 0 < gpus < visible:
        # Use the first `gpus` devices only (Trainer would wrap one process in DataParallel).
        ids = [x for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()] or [str(i) for i in range(visible)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:gpus])
    if "WORLD_SIZE" not in os.environ and (gpus > 1 or 0 < gpus < visible):
        if gpus > 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--multi_gpu",
                   "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                   "-m", "aqn_rs.experiments.local", str(run_dir)]
        else:
            cmd = [sys.executable, "-m", "aqn_rs.experiments.local", str(run_dir)]
        print(f"[aqn-rs] CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} " + " ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise ExperimentError(f"the {gpus}-GPU run exited with status {rc} (see the output above)")
        import json

        return json.loads((run_dir / "summary.json").read_text())
    from .local import run_local

    return run_local(cfg, run_dir)


def _describe(cfg: Dict[str, Any]) -> str:
    import yaml

    from .presets import describe, effective_training

    q, n = describe(cfg)
    t = effective_training(cfg, cfg["run"]["gpus"] > 0)
    return (f"preset {cfg['run']['preset']} -> {cfg['run']['output']}\n"
            f"  quantization: {q}; AQN: {n}\n"
            f"  engine {cfg['run']['engine']}, {'%d GPU(s)' % cfg['run']['gpus'] if cfg['run']['gpus'] else 'CPU'}, "
            f"model: {cfg['run']['model_description']}, data: {cfg['run']['data'] or 'built-in arithmetic task'}\n"
            f"  training: {yaml.safe_dump(t, default_flow_style=True, sort_keys=False).strip()}")


def run_cli(args) -> int:
    """Run a parsed `run`, `sweep` or `compare` command; returns the exit status."""
    try:
        return _run(args)
    except ExperimentError as e:
        print(f"aqn-rs: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    cmd = getattr(args, "cmd", None) or getattr(args, "command", None)
    if getattr(args, "engine", None) == "verl" and cmd in ("run", "sweep"):
        return verl_engine.run_cli(args)
    if cmd == "compare":
        res = outputs.compare(args.runs, pathlib.Path(args.output), args.name)
        print(res["table"], end="")
        print(f"wrote {res['markdown']}" + (f" and {res['png']}" if res["png"] else ""))
        return 0
    if cmd == "run":
        cfg = prepare(args)
        print(_describe(cfg), flush=True)
        if args.dry_run:
            return 0
        s = execute(cfg)
        print(f"{cfg['name']}: strict {100 * (s.get('val_strict_initial') or 0):.1f}% -> "
              f"{100 * (s.get('val_strict_final') or 0):.1f}%, collapse verdict {s.get('collapse', {}).get('verdict')}; "
              f"files in {cfg['run']['output']}")
        return 0
    if cmd == "sweep":
        from .presets import load_preset

        sigmas = parse_sigmas(args.sigma)
        base = load_preset(args.preset, args.overrides)
        n = base["noise_injection"]
        if not n.get("enabled"):
            raise ExperimentError(f"preset {args.preset} has no AQN block (noise_injection.enabled is false): nothing to sweep")
        ratio = float(n["sigma_end"]) / float(n["sigma_start"]) if n["sigma_start"] else 1.0
        cfgs = []
        for s in sigmas:
            name = f"{args.name or base['name']}-sigma{s:g}"
            cfgs.append(prepare(args, [f"noise_injection.sigma_start={s!r}", f"noise_injection.sigma_end={s * ratio!r}"], name))
        for c in cfgs:
            print(_describe(c), flush=True)
        if args.dry_run:
            return 0
        for c in cfgs:
            execute(copy.deepcopy(c))
        res = outputs.compare([c["run"]["output"] for c in cfgs], pathlib.Path(args.output), f"sweep-{base['name']}")
        print(res["table"], end="")
        print(f"wrote {res['markdown']}")
        return 0
    raise ExperimentError(f"unknown command {cmd!r}; expected one of {COMMANDS}")


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry (`python -m aqn_rs.experiments.cli run ...`)."""
    ap = argparse.ArgumentParser(prog="aqn-rs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_cli(sub)
    return run_cli(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
