"""The scanner's command line: `aqn-rs scan` (wired by aqn_rs.cli) and
scripts/srdd_quant_scanner.py, which share the options and `run_cli`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..constants import DEFAULT_EXCLUDE, SCALE_MODES
from ..errors import ScanError
from ..scan import (
    DTYPES,
    QUANT_TYPES,
    compare_scans,
    format_report,
    load_results,
    plot_results,
    scan,
    write_results,
)


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
            "and the end-to-end NLL change. docs/guides/SCANNER.md defines every number."
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
