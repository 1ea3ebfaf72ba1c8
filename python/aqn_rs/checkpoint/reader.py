"""Safetensors checkpoints read one tensor at a time: `SafetensorsReader` (plain reads at the
header's offsets, no memory map), the files of a folder (`safetensors_files`), an in-memory state
dict behind the same interface (`StateDictReader`), and verl's FSDP shards, which are not read
but recognised (`has_fsdp_shards`), so that the caller can say how to merge them."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..constants import SAFETENSORS_DTYPES
from ..errors import CheckpointError

# verl's FSDP checkpoint shards, which hold no HuggingFace weights until they are merged.
FSDP_SHARD = re.compile(r"^model_world_size_\d+_rank_\d+\.pt$")


def safetensors_files(folder: Path) -> List[Path]:
    """The safetensors files of a folder: those its index names (all of which must exist), else
    every `*.safetensors` in it, sorted; empty when it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        files = [folder / f for f in sorted(set(wm.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing[:4]}")
        return files
    return sorted(folder.glob("*.safetensors"))


def has_fsdp_shards(folder: Path) -> bool:
    """Whether `folder` holds verl FSDP shards (`model_world_size_W_rank_R.pt`) or torch.distributed
    checkpoint files (`*.distcp`)."""
    return folder.is_dir() and any(FSDP_SHARD.match(p.name) or p.suffix == ".distcp" for p in folder.iterdir())


class SafetensorsReader:
    """Tensors of safetensors files, read one at a time with plain reads at the header's
    offsets (no memory map: touched pages of a map stay resident, so a scan through one would
    grow to the size of the checkpoint). `names`, `meta(name)` and `get(name)` are what
    `module_classes_of_folder` and the export read.

    `get` returns a fresh tensor; `read` reads into one reusable buffer (sized by `reserve`)
    and returns a view of it that is valid until the next `read`: the scanner's loop, whose
    peak memory is then the largest tensor, without the allocator's fragmentation from a
    fresh large buffer per tensor.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self._where: Dict[str, Tuple[Path, int, str, Tuple[int, ...], int]] = {}
        self.names: List[str] = []
        self.metadata: Dict[str, str] = {}
        self._buf = None
        for f in files:
            with open(f, "rb") as fh:
                head = fh.read(8)
                if len(head) != 8:
                    raise CheckpointError(f"{f} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > 100_000_000:
                    raise CheckpointError(f"{f} is not a safetensors file (header length {n})")
                try:
                    header = json.loads(fh.read(n))
                except ValueError as e:
                    raise CheckpointError(f"{f} is not a safetensors file (bad header: {e})") from None
            if not self.metadata:
                self.metadata = dict(header.get("__metadata__") or {})
            for name, info in header.items():
                if name == "__metadata__" or name in self._where:
                    continue
                s, e = info["data_offsets"]
                self._where[name] = (f, 8 + n + int(s), info["dtype"], tuple(info["shape"]), int(e) - int(s))
                self.names.append(name)

    def meta(self, name: str):
        import torch

        _, _, dt, shape, _ = self._where[name]
        if dt not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: unsupported safetensors dtype {dt}")
        return getattr(torch, SAFETENSORS_DTYPES[dt]), shape

    def nbytes(self, name: str) -> int:
        return self._where[name][4]

    def reserve(self, nbytes: int) -> None:
        """Make `read`'s buffer hold at least `nbytes` (call once with the largest tensor)."""
        import torch

        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            self._buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def _read_into(self, name: str, buf):
        f, off, _, shape, nbytes = self._where[name]
        dtype, _ = self.meta(name)
        if nbytes:
            mv = memoryview(buf.numpy())[:nbytes]
            with open(f, "rb", buffering=0) as fh:
                fh.seek(off)
                got = 0
                while got < nbytes:  # one read() is capped near 2 GiB on Linux
                    r = fh.readinto(mv[got:])
                    if not r:
                        raise CheckpointError(f"{f}: unexpected end of file reading {name}")
                    got += r
        return buf[:nbytes].view(dtype).reshape(shape)

    def get(self, name: str):
        """`name` as a new tensor."""
        import torch

        return self._read_into(name, torch.empty(max(self.nbytes(name), 1), dtype=torch.uint8))

    def read(self, name: str):
        """`name` as a view of the reusable buffer (valid until the next `read`)."""
        self.reserve(self.nbytes(name))
        return self._read_into(name, self._buf)

    def close(self) -> None:
        self._buf = None


class StateDictReader:
    """An in-memory state dict behind the reader interface (GGUF models)."""

    def __init__(self, tensors: Dict[str, Any]) -> None:
        self._t = tensors
        self.names = list(tensors)
        self.metadata: Dict[str, str] = {}

    def meta(self, name):
        t = self._t[name]
        return t.dtype, tuple(t.shape)

    def get(self, name):
        return self._t[name]

    read = get

    def reserve(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        self._t.clear()
