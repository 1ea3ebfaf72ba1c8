#!/usr/bin/env python3
"""The research plan's SRDD quantization scanner, with the plan's command line:

    python scripts/srdd_quant_scanner.py --model_path PATH --quant_type mxfp4 --output results.json

It runs the same scan as `aqn-rs scan` (python/aqn_rs/scan/; every `aqn-rs scan` option is
here with underscores: --plot, --compare, --device, --exclude, --scale_mode, --calib,
--calib_samples, ...). docs/guides/SCANNER.md defines the numbers and the JSON schema.
"""

import sys

from aqn_rs.cli.scan import plan_main

if __name__ == "__main__":
    sys.exit(plan_main())
