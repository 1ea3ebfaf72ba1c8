"""Where a scan reads its weights from: `resolve_model` turns a path (a model folder, a file, a
verl checkpoint, a run folder, `embedded`) into a `ModelSource`, and the readers behind it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..constants import SAFETENSORS_DTYPES
from ..errors import ExperimentError, ScanError
from ..models import converted_folder
from ..models import resolve_model as resolve_experiment_model
from ..selection import class_name_of

# verl's FSDP checkpoint shards, which hold no HuggingFace weights until merged.
_FSDP_SHARD = re.compile(r"^model_world_size_\d+_rank_\d+\.pt$")


# ---------------------------------------------------------------------------------------------
# Model sources
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSource:
    """Where a scan reads its weights from (`resolve_model`).

    Attributes:
        kind: "safetensors-folder", "safetensors-file", "verl", "run", "embedded" or "gguf".
        path: what the caller passed.
        folder: the transformers folder (config.json) the weights belong to, if any.
        files: the safetensors files (empty for GGUF).
        gguf: the GGUF file (kind "gguf").
        note: how the path was resolved, for the report.
    """

    kind: str
    path: str
    folder: Optional[Path]
    files: List[Path]
    gguf: Optional[Path] = None
    note: str = ""

    def describe(self) -> Dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind,
            "folder": str(self.folder) if self.folder else None,
            "files": [str(f) for f in self.files], "gguf": str(self.gguf) if self.gguf else None,
            "note": self.note,
        }


def _merge_command(actor: Path) -> str:
    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} "
            f"--target_dir {actor / 'huggingface'}")


def _safetensors_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ScanError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        files = [folder / f for f in sorted(set(wm.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ScanError(f"{index} names shards that are missing: {missing[:4]}")
        return files
    return sorted(folder.glob("*.safetensors"))


def _has_fsdp_shards(folder: Path) -> bool:
    return folder.is_dir() and any(_FSDP_SHARD.match(p.name) or p.suffix == ".distcp" for p in folder.iterdir())


def _latest(paths: Iterable[Path], pattern: str) -> Optional[Path]:
    rx = re.compile(pattern)
    found = [(int(m.group(1)), p) for p in paths if p.is_dir() and (m := rx.fullmatch(p.name))]
    return max(found)[1] if found else None


def resolve_model(path: Union[str, os.PathLike]) -> ModelSource:
    """Find the weights a scan reads for `path` (see the module docstring for what is accepted).

    Raises:
        ScanError: the path does not exist, holds no weights, holds only verl FSDP shards (the
            message has the `verl.model_merger` command), or holds a format that is not read.
    """
    spath = str(path)
    if spath == "embedded":
        try:
            folder, gguf, desc = resolve_experiment_model(None)
            conv = Path(converted_folder(folder, gguf, log=lambda m: print(m, file=sys.stderr)))
        except ExperimentError as e:
            raise ScanError(str(e)) from None
        return ModelSource("embedded", spath, conv, _safetensors_files(conv), note=f"{desc}, cached as {conv}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ScanError(f"model path {p} does not exist (expected a transformers model folder, a "
                        ".safetensors or .gguf file, a verl global_step_N folder, or 'embedded')")
    if p.is_file():
        name = p.name
        if name.endswith(".safetensors.index.json"):
            p = p.parent
        elif p.suffix == ".safetensors":
            folder = p.parent if (p.parent / "config.json").is_file() else None
            return ModelSource("safetensors-file", spath, folder, [p])
        elif p.suffix == ".gguf":
            return ModelSource("gguf", spath, p.parent, [], gguf=p, note="read through transformers")
        elif _FSDP_SHARD.match(name):
            raise ScanError(f"{p} is one verl FSDP shard; merge the shards into a HuggingFace folder "
                            f"first:\n  {_merge_command(p.parent)}\nthen scan {p.parent / 'huggingface'}")
        else:
            raise ScanError(f"{p}: unsupported weight file (expected .safetensors, a "
                            ".safetensors.index.json or .gguf; re-save PyTorch .bin/.pt weights with "
                            "save_pretrained(..., safe_serialization=True))")
    note = ""
    # one of our run folders: runs/NAME/checkpoints/{final,step-N}
    ck = p / "checkpoints"
    if ck.is_dir() and not _safetensors_files(p):
        pick = ck / "final" if (ck / "final").is_dir() else _latest(ck.iterdir(), r"step-(\d+)")
        if pick is None:
            raise ScanError(f"{p} is a run folder but {ck} has no final or step-N checkpoint yet")
        note = f"run folder: scanning {pick.relative_to(p)}"
        p = pick
        kind = "run"
    else:
        kind = "safetensors-folder"
    # verl: a trainer's default_local_dir with global_step_N folders, global_step_N, or actor/
    if not _safetensors_files(p):
        latest = _latest(p.iterdir(), r"global_step_(\d+)")
        if latest is not None:
            note = f"verl checkpoints: scanning the latest, {latest.name}"
            p = latest
        if (p / "actor").is_dir():
            p = p / "actor"
        hf = p / "huggingface"
        if hf.is_dir() and _safetensors_files(hf):
            note = (note + "; " if note else "") + f"verl checkpoint: {hf}"
            return ModelSource("verl", spath, hf, _safetensors_files(hf), note=note)
        if _has_fsdp_shards(p):
            raise ScanError(
                f"{p} holds verl FSDP shards (model_world_size_W_rank_R.pt / *.distcp) and no merged "
                "HuggingFace weights; merge them first:\n"
                f"  {_merge_command(p)}\nthen scan {p} again (its huggingface/ folder is then used)")
    files = _safetensors_files(p)
    if files:
        folder = p if (p / "config.json").is_file() else None
        return ModelSource(kind, spath, folder, files, note=note)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", spath, p, [], gguf=ggufs[0], note="read through transformers")
    if len(ggufs) > 1:
        raise ScanError(f"{p} holds several GGUF files ({', '.join(g.name for g in ggufs[:4])}); pass one of them")
    if any(p.glob("*.bin")) or any(p.glob("*.pt")):
        raise ScanError(f"{p} holds PyTorch .bin/.pt weights; only safetensors (and GGUF) are read: "
                        "re-save with save_pretrained(..., safe_serialization=True)")
    raise ScanError(f"no model weights in {p}: expected *.safetensors (or model.safetensors.index.json), "
                    "a .gguf file, a verl global_step_N/actor folder or a run folder with checkpoints/")


_ST_NAMES = SAFETENSORS_DTYPES


class SafetensorsReader:
    """Tensors of safetensors files, read one at a time with plain reads at the header's
    offsets (no memory map: touched pages of a map stay resident, so a scan through one would
    grow to the size of the checkpoint). `names`, `meta(name)` and `get(name)` are what
    `aqn_rs.export._module_classes_of_folder` expects.

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
                    raise ScanError(f"{f} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > 100_000_000:
                    raise ScanError(f"{f} is not a safetensors file (header length {n})")
                try:
                    header = json.loads(fh.read(n))
                except ValueError as e:
                    raise ScanError(f"{f} is not a safetensors file (bad header: {e})") from None
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
        if dt not in _ST_NAMES:
            raise ScanError(f"{name}: unsupported safetensors dtype {dt}")
        return getattr(torch, _ST_NAMES[dt]), shape

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
                        raise ScanError(f"{f}: unexpected end of file reading {name}")
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


class _StateDictReader:
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


def _load_gguf(src: ModelSource):
    """(reader, classes) of a GGUF file through transformers (which dequantizes every tensor)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ScanError(f"reading {src.gguf} needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.gguf.parent), gguf_file=src.gguf.name, dtype=torch.float32)
    classes = {n: class_name_of(m) for n, m in model.named_modules() if n}
    sd, seen = {}, set()
    for n, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:  # a tied lm_head is the embedding: listed once, as transformers saves it
            seen.add(key)
            sd[n] = t.detach()
    del model
    return _StateDictReader(sd), classes


def _heuristic_classes(reader) -> Dict[str, str]:
    classes = {}
    for n in reader.names:
        mod, _, leaf = n.rpartition(".")
        low = mod.lower()
        if leaf != "weight" or len(reader.meta(n)[1]) != 2:
            continue
        if "embed" in low or low.endswith(("wte", "wpe")):
            classes[mod] = "Embedding"
        elif "norm" not in low:
            classes[mod] = "Linear"
    return classes


def _open_source(src: ModelSource):
    """(reader, module classes) for a resolved source."""
    if src.kind == "gguf":
        return _load_gguf(src)
    reader = SafetensorsReader(src.files)
    if src.folder is None or not (src.folder / "config.json").is_file():
        return reader, _heuristic_classes(reader)
    from ..export import _module_classes_of_folder

    try:
        classes = _module_classes_of_folder(src.folder, reader)
    except ValueError as e:
        if "quantization_config" in str(e):
            raise ScanError(f"{src.folder} is an already-quantized checkpoint (config.json has a "
                            "quantization_config): its Linear weights are packed, not dense; scan the "
                            "dense checkpoint it was made from") from None
        raise
    return reader, classes


