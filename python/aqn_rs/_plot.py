"""pyplot for the package's PNG plots (the scanner's report, the experiments' curves), on the
bottom floor so that neither imports the other for it. matplotlib is optional: without it the
callers skip their plots with a note."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["pyplot"]


def pyplot() -> Optional[Any]:
    """matplotlib.pyplot on the Agg backend (files only, no display), or None without matplotlib.
    The scanner's and the experiments' plots both go through here."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None
