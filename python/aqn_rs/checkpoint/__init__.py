"""Reading checkpoints: the one reader that the scanner (`aqn_rs.scan`) and the export
(`aqn_rs.export`) read weights with, so that both see the same tensors, dtypes, module classes
and errors (`aqn_rs.errors.CheckpointError`). It stays torch-free when it loads (torch and
transformers are imported by the functions that need them), so the scanner's CLI stays light.

* `reader`: `SafetensorsReader` (one tensor at a time, plain reads, no memory map),
  `safetensors_files`, `StateDictReader`, and the recognition of verl FSDP shards.
* `modules`: module classes (`module_classes_of_folder`, `classes_by_name`), `FolderTensors`
  (a folder's reader with its classes) and `load_gguf`.
"""

from __future__ import annotations

from .modules import FolderTensors, classes_by_name, load_gguf, module_classes_of_folder
from .reader import FSDP_SHARD, SafetensorsReader, StateDictReader, has_fsdp_shards, safetensors_files

__all__ = [
    "FSDP_SHARD", "FolderTensors", "SafetensorsReader", "StateDictReader", "classes_by_name",
    "has_fsdp_shards", "load_gguf", "module_classes_of_folder", "safetensors_files",
]
