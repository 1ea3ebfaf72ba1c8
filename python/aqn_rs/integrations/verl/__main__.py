"""`python -m aqn_rs.integrations.verl [--check]`: report the installed verl's patch points."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ...errors import VerlPluginError
from .patches import PATCH_POINTS, _verl_version, check_patch_points


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m aqn_rs.integrations.verl [--check]`: report the patch points of the installed verl."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m aqn_rs.integrations.verl", description=main.__doc__)
    ap.add_argument("--check", action="store_true", help="check the installed verl's patch points (default)")
    ap.parse_args(argv)
    try:
        problems = check_patch_points()
    except VerlPluginError as e:
        print(f"aqn_rs.integrations.verl: error: {e}", file=sys.stderr)
        return 2
    print(f"verl {_verl_version()}: {len(PATCH_POINTS)} patch points, {len(problems)} problem(s)")
    for p in problems:
        print(f"  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
