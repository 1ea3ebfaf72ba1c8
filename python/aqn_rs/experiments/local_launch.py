"""The local engine's run from the command line's request: every check, cheapest first, then
the resolved config (`prepare`), and the run itself (`execute`) in this process or under
`accelerate launch` for several GPUs. `aqn-rs run | sweep` (aqn_rs.cli.run) calls these."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional

from ..models import resolve_model
from . import data as data_mod
from .env import parse_gpus, visible_gpus
from .errors import ExperimentError


def resolve_gpus(text: Any) -> int:
    """`auto` -> every visible GPU (0 without CUDA); N -> N, checked against what is present."""
    present = visible_gpus()
    n = parse_gpus(text)
    if n is None:
        return present
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


def describe(cfg: Dict[str, Any]) -> str:
    """What a prepared run will do, for the terminal (printed before it starts, and by --dry-run)."""
    import yaml

    from .presets import describe as preset_describe
    from .presets import effective_training

    q, n = preset_describe(cfg)
    t = effective_training(cfg, cfg["run"]["gpus"] > 0)
    return (f"preset {cfg['run']['preset']} -> {cfg['run']['output']}\n"
            f"  quantization: {q}; AQN: {n}\n"
            f"  engine {cfg['run']['engine']}, {'%d GPU(s)' % cfg['run']['gpus'] if cfg['run']['gpus'] else 'CPU'}, "
            f"model: {cfg['run']['model_description']}, data: {cfg['run']['data'] or 'built-in arithmetic task'}\n"
            f"  training: {yaml.safe_dump(t, default_flow_style=True, sort_keys=False).strip()}")
