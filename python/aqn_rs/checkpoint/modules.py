"""Which module each tensor of a checkpoint belongs to and what class it is: from the model
transformers builds on the meta device (`module_classes_of_folder`) or from the tensor names
(`classes_by_name`); a folder's reader with its classes (`FolderTensors`); a GGUF file as a
reader with its classes (`load_gguf`, through transformers)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, Tuple

from ..errors import CheckpointError, CheckpointNotFoundError
from ..selection import class_name_of
from .reader import SafetensorsReader, StateDictReader, safetensors_files


def module_classes_of_folder(folder: Path, tensors: Any) -> Dict[str, str]:
    """Module name -> class name, from the model transformers builds on the meta device from
    `config.json` (no weights are allocated). Falls back to treating every 2-D `.weight` whose
    module name does not look like an embedding or a norm as a Linear, with a warning."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointNotFoundError(f"no config.json in {folder}; vLLM needs one next to the weights")
    cfg = json.loads(config_path.read_text())
    if "quantization_config" in cfg or "compression_config" in cfg:
        raise CheckpointError(
            f"{folder} is already a quantized checkpoint (its config.json has a "
            "quantization_config); export from the dense model, or read it with "
            "aqn_rs.export.load_compressed_checkpoint / dequantize_checkpoint"
        )
    weights = {n.rpartition(".")[0] for n in tensors.names if n.endswith(".weight")}
    classes: Dict[str, str] = {}
    try:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
        classes = {n: class_name_of(m) for n, m in model.named_modules() if n}
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to the name heuristic
        reason = f"{type(e).__name__}: {e}"
    else:
        if any(n in weights and classes[n].endswith("Linear") for n in classes):
            return classes
        reason = "its module names do not match the checkpoint's tensor names"
    warnings.warn(
        f"could not build the model of {folder} on the meta device ({reason}); treating every 2-D "
        "'.weight' whose module name has no 'embed', 'norm', 'wte' or 'wpe' in it as a Linear layer",
        stacklevel=3,
    )
    for n in tensors.names:
        mod, _, leaf = n.rpartition(".")
        low = mod.lower()
        if leaf == "weight" and len(tensors.meta(n)[1]) == 2 and not any(
            k in low for k in ("embed", "norm", "wte", "wpe")
        ):
            classes[mod] = "Linear"
    return classes


def classes_by_name(reader) -> Dict[str, str]:
    """Module classes guessed from the tensor names, for weights without a config.json: a 2-D
    `.weight` is an Embedding where the module name says so, else a Linear unless it is a norm."""
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


class FolderTensors(SafetensorsReader):
    """The tensors of a safetensors checkpoint folder (single file or sharded with an index),
    read one at a time (`SafetensorsReader`). With `classes=True` the module classes come from
    the model transformers builds on the meta device (`module_classes_of_folder`)."""

    def __init__(self, folder: Path, classes: bool = True) -> None:
        self.folder = folder
        files = safetensors_files(folder)
        if not files:
            if any(folder.glob("*.bin")):
                raise CheckpointError(
                    f"{folder} holds PyTorch .bin weights; only safetensors checkpoints are read "
                    "(load the model with transformers and pass it in memory, or re-save it with "
                    "save_pretrained(..., safe_serialization=True))"
                )
            raise CheckpointNotFoundError(f"no *.safetensors weights in {folder}")
        super().__init__(files)
        # File by file, names sorted within each file: the order safetensors' `safe_open` lists
        # them in, which the export read with before, so its plan, shards and output tensor order
        # stay what they were. The header's own order, which the scanner keeps, can differ:
        # safetensors writes it by dtype size first.
        rank = {f: i for i, f in enumerate(files)}
        self.names.sort(key=lambda n: (rank[self._where[n][0]], n))
        self.classes = module_classes_of_folder(folder, self) if classes else {}


def load_gguf(path: Path) -> Tuple[StateDictReader, Dict[str, str]]:
    """(reader, classes) of a GGUF file through transformers (which dequantizes every tensor)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"reading {path} needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    classes = {n: class_name_of(m) for n, m in model.named_modules() if n}
    sd, seen = {}, set()
    for n, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:  # a tied lm_head is the embedding: listed once, as transformers saves it
            seen.add(key)
            sd[n] = t.detach()
    del model
    return StateDictReader(sd), classes
