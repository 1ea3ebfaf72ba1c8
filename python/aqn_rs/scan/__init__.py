"""The SRDD scanner: layer-by-layer diagnosis of what MXFP4 / NVFP4 fake quantization does to a
checkpoint's weights (and, with calibration data, to the layers' outputs and the model's NLL).

Usage::

    aqn-rs scan --model PATH --quant-type all --output scan.json --plot scan.png
    python scripts/srdd_quant_scanner.py --model_path PATH --quant_type mxfp4 --output scan.json

    from aqn_rs.scan import scan, write_results
    results = scan("path/to/model", "all")

Inputs (`resolve_model`): a transformers model folder (safetensors, single or sharded with an
index), a single `.safetensors` file, a verl checkpoint (`global_step_N`, its `actor/` or
`actor/huggingface`), one of our run folders (`runs/NAME`: its `checkpoints/final`), a `.gguf`
file (read through transformers) or `embedded` (the experiments' SmolLM2-135M).

Weights are read one tensor at a time with plain file reads at the offsets of the safetensors
header (not through a memory map, whose touched pages would stay resident and count against
the process), so a weights-only scan holds about one tensor at a time. GGUF files are the
exception: transformers dequantizes the whole model when it reads one.

Per layer and format (docs/guides/SCANNER.md defines every number): SQNR, relative error, max abs
error, deadzone and saturation fractions, the E2M1 code histogram, block-scale statistics and
the gain scan. On the CPU the reductions run in the Rust core (`aqn_core::scan`, one pass, no
quantized copy, bit-deterministic); on CUDA they are torch reductions over the outputs of our
CUDA `quantize` / `fake_quant` kernels (`torch_raw_stats`), equal to the CPU numbers in every
count and to ~1e-12 in the sums.

The result is a JSON-serialisable dict with a versioned schema (`SCHEMA`, `SCHEMA_VERSION`);
`write_results`, `load_results`, `compare_scans`, `format_report` and `plot_results` work on it.

The package, one concern a module (each imports only the ones above it):

* `metrics`: the format specs, the gain ladder, one tensor's raw statistics and metrics.
* `source`: `resolve_model` and `ModelSource`, where a scan reads its weights from (with the
  reader of `aqn_rs.checkpoint`, which the export reads with too).
* `layers`: the per-layer plan (projection type, layer index, device, fused groups' amax).
* `calibration`: the per-layer output error on calibration data and the NLL change.
* `report`: summary, comparison, JSON, terminal report and plot of the results.
* `driver`: `scan`, the loop over the layers.

Every name is importable from `aqn_rs.scan` as it was when the scanner was one module, but for
its command line: `aqn-rs scan` and scripts/srdd_quant_scanner.py are `aqn_rs.cli.scan`, on the
floor above the packages it runs.
"""

from __future__ import annotations

# The `x as x` imports re-export names the single-module scanner had outside __all__, so that
# `aqn_rs.scan.x` still works: the shared constants, which tests/unit/test_constants.py checks are
# the constants module's, and the gain-scan edges, which tests/integration/test_scan.py checks
# directly.
from ..checkpoint import SafetensorsReader
from ..constants import DEFAULT_EXCLUDE
from ..constants import SCALE_MODES as SCALE_MODES
from ..errors import ScanError
from .calibration import calibration_texts, run_calibration
from .driver import scan
from .layers import layer_index, proj_type
from .metrics import DTYPES as DTYPES
from .metrics import EDGE_FRACTION as EDGE_FRACTION
from .metrics import F4_E2M1_MAX as F4_E2M1_MAX
from .metrics import PROJ_ORDER as PROJ_ORDER
from .metrics import PROJ_TYPES as PROJ_TYPES
from .metrics import (
    QUANT_TYPES,
    SCHEMA,
    SCHEMA_VERSION,
    FormatSpec,
    format_specs,
    gain_curves,
    gain_ladder,
    metrics_from_raw,
    rust_raw_stats,
    tensor_metrics,
    tensor_raw_stats,
    torch_raw_stats,
)
from .metrics import _edges as _edges
from .report import compare_scans, format_report, load_results, plot_results, summarize, write_results
from .source import ModelSource, resolve_model

__all__ = [
    "DEFAULT_EXCLUDE", "FormatSpec", "ModelSource", "QUANT_TYPES", "SCHEMA", "SCHEMA_VERSION",
    "SafetensorsReader", "ScanError", "calibration_texts", "compare_scans", "format_report",
    "format_specs", "gain_curves", "gain_ladder", "layer_index", "load_results", "metrics_from_raw",
    "plot_results", "proj_type", "resolve_model", "run_calibration",
    "rust_raw_stats", "scan", "summarize", "tensor_metrics", "tensor_raw_stats", "torch_raw_stats", "write_results",
]

