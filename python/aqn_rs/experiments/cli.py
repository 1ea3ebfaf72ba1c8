"""`python -m aqn_rs.experiments.cli`: the path that scripts/test_*.sh, scripts/gpu_runs.sh and
scripts/verl_stack.sh run `aqn-rs run | sweep | compare` by where no `aqn-rs` is installed.

The command line is aqn_rs.cli.run and the local engine's launch aqn_rs.experiments.local_launch;
this module keeps their old names importable from here, on the command line's floor.
"""

from __future__ import annotations

import sys

from ..cli.run import COMMANDS, add_cli, main, run_cli
from .local_launch import describe, execute, prepare, resolve_gpus

__all__ = ["COMMANDS", "add_cli", "describe", "execute", "main", "prepare", "resolve_gpus", "run_cli"]

if __name__ == "__main__":
    sys.exit(main())
