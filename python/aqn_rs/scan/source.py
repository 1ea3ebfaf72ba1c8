"""Where a scan reads its weights from: `resolve_model` turns a path (a model folder, a file, a
verl checkpoint, a run folder, `embedded`) into a `ModelSource`, and the readers behind it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

from ..checkpoint import (
    FSDP_SHARD,
    SafetensorsReader,
    classes_by_name,
    has_fsdp_shards,
    load_gguf,
    module_classes_of_folder,
    safetensors_files,
)
from ..errors import CheckpointError, ExperimentError, ScanError
from ..models import converted_folder
from ..models import resolve_model as resolve_experiment_model


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






@contextlib.contextmanager
def checkpoint_errors() -> Iterator[None]:
    """The checkpoint reader's errors as ScanErrors with the same message: whatever stops a scan,
    a bad option or an unreadable file, its caller catches as one ScanError."""
    try:
        yield
    except CheckpointError as e:
        raise ScanError(str(e)) from None


def _safetensors_files(folder: Path) -> List[Path]:
    with checkpoint_errors():
        return safetensors_files(folder)


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
        elif FSDP_SHARD.match(name):
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
        if has_fsdp_shards(p):
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


def _open_source(src: ModelSource):
    """(reader, module classes) for a resolved source."""
    with checkpoint_errors():
        if src.kind == "gguf":
            return load_gguf(src.gguf)
        reader = SafetensorsReader(src.files)
        if src.folder is None or not (src.folder / "config.json").is_file():
            return reader, classes_by_name(reader)
        try:
            classes = module_classes_of_folder(src.folder, reader)
        except CheckpointError as e:
            if "quantization_config" in str(e):
                raise ScanError(f"{src.folder} is an already-quantized checkpoint (config.json has a "
                                "quantization_config): its Linear weights are packed, not dense; scan the "
                                "dense checkpoint it was made from") from None
            raise
    return reader, classes
