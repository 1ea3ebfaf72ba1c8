"""The package's errors: one root, `AqnError`, so `except aqn_rs.AqnError` catches every error
aqn-rs raises on purpose (bad types and values of the array API stay TypeError / ValueError).

Each error keeps the builtin base it had before it had a root (ScanError is a ValueError,
VerlPluginError a RuntimeError), so `except ValueError` around a scan still works; the checkpoint
reader's errors keep the ones its callers raised before there was one reader (CheckpointError is
a ValueError, CheckpointNotFoundError also a FileNotFoundError).

The root is the Rust core's `AqnError` where the binding defines one, so that errors raised in
Rust and in Python share it; a core built without it gets a plain Python root.
"""

from __future__ import annotations

try:
    from ._aqn_rs import AqnError
except ImportError:  # a core that does not export AqnError

    class AqnError(Exception):  # type: ignore[no-redef]
        """Base class of aqn-rs errors that are neither a bad type nor a bad value."""


__all__ = ["AqnError", "CheckpointError", "CheckpointNotFoundError", "ExperimentError", "ScanError", "VerlPluginError"]


class CheckpointError(AqnError, ValueError):
    """A checkpoint cannot be read (`aqn_rs.checkpoint`): a file that is not safetensors or is
    cut short, a bad index, an unsupported dtype, a quantized checkpoint where a dense one is
    needed, a format that is not read. The message names the file and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """What a checkpoint needs is not there: no weights in the folder, no config.json."""


class ScanError(AqnError, ValueError):
    """A scan cannot run: a bad path, a folder without weights, an FSDP shard folder, a bad
    option. The message says what was found and what to do."""


class ExperimentError(AqnError):
    """A run cannot start (unknown preset, unreadable data, missing model package, too few
    GPUs, bad option). The message says what was wrong and what to do."""


class VerlPluginError(AqnError, RuntimeError):
    """The plugin cannot do what its config asks: a bad key or value, an unsupported verl
    version or setting, or a process that did not import the plugin. The message names the
    key, version or setting and what to do."""
