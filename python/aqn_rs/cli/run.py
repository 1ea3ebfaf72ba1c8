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
import pathlib
import sys
from typing import List, Optional

from ..experiments import outputs, verl_engine
from ..experiments.env import parse_sigmas
from ..experiments.errors import ExperimentError
from ..experiments.local_launch import describe, execute, prepare

COMMANDS = ("run", "sweep", "compare")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="a preset name (baseline, mxfp4-only, 1A, 1C, 1D, 1E, nvfp4, nvfp4-aqn) or a .yaml path")
    p.add_argument("--engine", choices=["local", "verl", "auto"], default="auto",
                   help="local: TRL GRPOTrainer on this machine; verl: verl's main_ppo "
                        "(Ray + FSDP + vLLM, docs/guides/VERL.md); "
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
        print(describe(cfg), flush=True)
        if args.dry_run:
            return 0
        s = execute(cfg)
        print(outputs.summary_line(cfg, s))
        return 0
    if cmd == "sweep":
        from ..experiments.presets import load_preset, sigma_ratio, sweep_point

        sigmas = parse_sigmas(args.sigma)
        base = load_preset(args.preset, args.overrides)
        ratio = sigma_ratio(base, args.preset)
        cfgs = []
        for s in sigmas:
            name, ov = sweep_point(args.name or base["name"], s, ratio)
            cfgs.append(prepare(args, ov, name))
        for c in cfgs:
            print(describe(c), flush=True)
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
    """Stand-alone entry (`python -m aqn_rs.experiments.cli run ...`, which scripts use where
    `aqn-rs` is not installed)."""
    ap = argparse.ArgumentParser(prog="aqn-rs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_cli(sub)
    return run_cli(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
