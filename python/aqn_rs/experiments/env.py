"""What a run finds on the machine and reads from the command line, shared by the local engine's
and the verl engine's commands (so neither imports the other's CLI for it)."""

from __future__ import annotations

from typing import Any, List, Optional

from .errors import ExperimentError

__all__ = ["parse_gpus", "parse_sigmas", "visible_gpus"]


def visible_gpus() -> int:
    """The CUDA devices torch sees; 0 without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(text: Any) -> Optional[int]:
    """`--gpus N|auto`: the number as given (each engine checks its own range), or None for
    `auto` and for the option left unset."""
    if text in (None, "auto"):
        return None
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ExperimentError(f"--gpus must be a number or auto, got {text!r}") from None


def parse_sigmas(text: str) -> List[float]:
    """`--sigma 0.01,0.005`: the positive numbers of a comma-separated list."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"--sigma expects comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise ExperimentError(f"--sigma expects positive numbers, got {text!r}")
    return vals
