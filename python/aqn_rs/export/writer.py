"""The streaming safetensors writer of the export: shards written one tensor at a time (the
host never holds a whole shard), and the shard size option (`parse_size`)."""

from __future__ import annotations

import ctypes
import json
import re
import struct
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Union

from torch import Tensor

# fused_weight_groups lives with the selection rules; `aqn_rs.export.fused_weight_groups` stays.
from .formats import (
    _ST_DTYPES,
    _Out,
)


def _write_bytes(f, t: Tensor) -> None:
    """Write the raw bytes of `t` (moved to the CPU if needed). The bytes are read through the
    data pointer, not `Tensor.numpy()`, which would mark a model parameter's storage
    non-resizable for good (breaking FSDP2, see quantizers._rs_view)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    n = t.numel() * t.element_size()
    if n:
        f.write(memoryview((ctypes.c_char * n).from_address(t.data_ptr())))


class _ShardWriter:
    """Writes one safetensors file whose header is known up front, tensor by tensor in header
    order: 8-byte little-endian header length, the JSON header (padded with spaces to a multiple
    of 8, as safetensors does), then the data."""

    def __init__(self, path: Path, outs: Sequence[_Out], metadata: Mapping[str, str]) -> None:
        header: Dict[str, Any] = {"__metadata__": dict(metadata)}
        off = 0
        for o in outs:
            header[o.name] = {"dtype": _ST_DTYPES[o.dtype], "shape": list(o.shape), "data_offsets": [off, off + o.nbytes]}
            off += o.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self.path = path
        self._outs = list(outs)
        self._i = 0
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)

    @property
    def full(self) -> bool:
        return self._i == len(self._outs)

    def write(self, name: str, t: Tensor) -> None:
        o = self._outs[self._i]
        if name != o.name or t.dtype != o.dtype or tuple(t.shape) != o.shape:
            raise RuntimeError(
                f"internal error: expected {o.name} {o.dtype} {o.shape}, got {name} {t.dtype} {tuple(t.shape)}"
            )
        _write_bytes(self._f, t)
        self._i += 1

    def close(self) -> None:
        self._f.close()


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MB", "2GiB" (2^30), "100KB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad max_shard_size {size!r}; expected bytes or a size like '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n

