"""`aqn-rs export`: the command line of `aqn_rs.export` (a packed FP4 checkpoint in the
compressed-tensors format, which vLLM loads)."""

from __future__ import annotations

import argparse
import sys

from ..constants import DEFAULT_EXCLUDE, DTYPE_TAGS, FORMATS, SCALE_MODES
from ..export import _export


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the `export` subcommand to an `argparse` subparsers object; `run_cli` runs it."""
    p = subparsers.add_parser(
        "export",
        help="write a packed FP4 checkpoint (compressed-tensors format) that vLLM loads",
        description=(
            "Pack the Linear weights of a safetensors checkpoint folder into NVFP4 or MXFP4 "
            "(compressed-tensors nvfp4-pack-quantized / mxfp4-pack-quantized), copy the rest "
            "(bf16 by default) and the tokenizer, and write config.json's quantization_config. "
            "Serve the result with `vllm serve OUT_DIR`."
        ),
    )
    p.add_argument("model", help="checkpoint folder (config.json + *.safetensors)")
    p.add_argument("out_dir", help="folder to create")
    p.add_argument("--format", choices=FORMATS, default="nvfp4")
    p.add_argument("--scale-mode", choices=SCALE_MODES, default=None, help="MXFP4 scale mode (default floor)")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE), metavar="PATTERN",
                   help="modules kept dense: names, globs, re:regex (default: lm_head embed_tokens)")
    p.add_argument("--include", nargs="*", default=None, metavar="PATTERN",
                   help="pack only Linear modules matching these patterns")
    p.add_argument("--max-shard-size", default="5GB", help="bytes per shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--dtype", choices=sorted(DTYPE_TAGS) + ["keep"], default="bfloat16",
                   help="dtype of unpacked tensors and of weights before quantization (default bfloat16)")
    p.add_argument("--no-fuse-global-scales", action="store_true",
                   help="NVFP4: one global scale per tensor even for q/k/v and gate/up (vLLM needs them fused)")
    p.add_argument("--device", default=None, help="quantize on this device, e.g. cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run `aqn-rs export` from parsed arguments; returns the exit status."""
    try:
        report = _export(
            args.model, args.out_dir, args.format, args.scale_mode, args.exclude, args.include,
            args.max_shard_size, args.overwrite, None, args.dtype, not args.no_fuse_global_scales,
            args.device,
        )
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"aqn-rs export: error: {e}", file=sys.stderr)
        return 2
    print(report.format_summary())
    return 0
