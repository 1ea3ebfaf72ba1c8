"""The `aqn-rs` command line.

Subcommands:
    demo   quantize realistic weight-like tensors with every format and scale mode and print
           the measured error table and CPU/GPU throughput (the main job until the training
           runs land).
    info   print what this build contains (version, CUDA kernels, archs, threads).
    export write a compressed-tensors NVFP4/MXFP4 checkpoint that vLLM loads.
    scan   SRDD: layer-wise diagnosis of quantization damage in a checkpoint (JSON, PNG).
    run    one of the research plan's runs (a preset) on the local engine (TRL GRPO) or verl.
    sweep  the same preset over several sigma_start values, into one table.
    compare the results table (markdown + PNG) of several runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ..quantizers import build_info
from . import demo, run, scan


def main(argv: Optional[List[str]] = None) -> int:
    """The `aqn-rs` command (also `python -m aqn_rs`): parse `argv`, run it, return the exit status."""
    ap = argparse.ArgumentParser(prog="aqn-rs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo.add_cli(sub)
    sub.add_parser("info", help="what this build contains")
    try:  # export imports torch at module level; torch is an optional dependency
        from . import export
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        export = None
        sub.add_parser("export", help="write a packed FP4 checkpoint (needs torch)").add_argument("rest", nargs="*")
    if export is not None:
        export.add_cli(sub)
    scan.add_cli(sub)
    run.add_cli(sub)
    args = ap.parse_args(argv)

    if args.cmd == "export":
        if export is None:
            print("aqn-rs: error: export needs torch: pip install torch", file=sys.stderr)
            return 2
        return export.run_cli(args)
    if args.cmd == "scan":
        return scan.run_cli(args)
    if args.cmd in run.COMMANDS:
        return run.run_cli(args)
    if args.cmd == "info":
        print(json.dumps(build_info(), indent=2))
        return 0
    if args.cmd == "demo":
        return demo.run_cli(args, ap.error)
    return 1
