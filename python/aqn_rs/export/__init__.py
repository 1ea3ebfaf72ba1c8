"""Real FP4 checkpoints in the compressed-tensors format, which vLLM loads, and the way back.

* `export_checkpoint(model_or_path, out_dir, format="nvfp4"|"mxfp4", ...)` packs every selected
  Linear weight `X.weight` into `X.weight_packed` (uint8 `[out, in/2]`, element 2i in the low
  nibble), `X.weight_scale` (float8_e4m3fn `[out, in/16]` for NVFP4; E8M0 bytes as uint8
  `[out, in/32]` for MXFP4) and, for NVFP4, `X.weight_global_scale` (float32 `[1]`, the
  encode-direction scale: `d_block = e4m3(scale) / global_scale`). Every other tensor is copied
  (cast to `dtype`, bf16 by default). `config.json` gets the `quantization_config` that
  compressed-tensors 0.20 writes for its NVFP4A16 / MXFP4A16 presets; tokenizer and other files
  are copied. Output goes to a temporary folder next to `out_dir` that is renamed at the end,
  so a failed export leaves nothing behind.
* `load_compressed_checkpoint(path)` reads such a checkpoint (ours or one that compressed-tensors
  wrote) into `QuantizedTensor`s; `dequantize_checkpoint(path)` gives dense tensors.
* `iter_packed(named_tensors, format)` does the packing in memory for weight sync: `(name,
  tensor)` in, compressed-tensors names out, on the tensors' device.

Names, shapes and dtypes are those of compressed-tensors 0.20's `NVFP4PackedCompressor` /
`MXFP4PackedCompressor` and of vLLM's `CompressedTensorsW4A16Fp4` / `CompressedTensorsW4A16Mxfp4`
schemes (docs/guides/EXPORT.md says which versions were checked). The codes, block scales and global
scale written are exactly those `Nvfp4Quantizer` / `Mxfp4Quantizer` compute, so the weights
vLLM (and compressed-tensors' decompressor) reconstruct equal our `fake_quant` bit for bit.

vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` and keeps ONE NVFP4 global scale
per fused layer (it takes the max of the shards' scales), so the shards must share it, as
llm-compressor's `update_fused_layer_weight_global_scales` makes them do. With
`fuse_global_scales=True` (the default) the members of such a group are quantized with their
common amax (`max` of the members' amax, whose global scale is the `min` of theirs); the matching
training-side fake quant is `fake_quant(w, amax=group_amax)` (see `fused_weight_groups`).

Memory: a folder is read one tensor (or one fused group) at a time through `aqn_rs.checkpoint`'s
reader (the scanner's: plain reads at the header's offsets, no memory map), and shards are
written by a streaming safetensors writer, so the host holds about one tensor at a time, never
a whole shard.

The package, one concern a module (each imports only the ones above it):

* `formats`: the compressed-tensors names, config and layout, the packing of one weight.
* `writer`: the streaming safetensors writer and `parse_size`.
* `plan`: which tensors are packed or copied, their shards, and `ExportReport`.
* `packed`: `iter_packed` (packing in memory for weight sync) and `linear_module_names`.
* `load`: `load_compressed_checkpoint` and `dequantize_checkpoint`.
* this `__init__`: `export_checkpoint`. Every name is importable from `aqn_rs.export` as it
  was when the export was one module, but for its command line: `aqn-rs export` is
  `aqn_rs.cli.export`, on the floor above the packages it runs.
"""


from __future__ import annotations

# The `x as x` imports re-export names the single-module export had outside __all__, so that
# `aqn_rs.export.x` still works: the shared constants and the dtype tables, which
# tests/unit/test_constants.py checks are the constants module's. fused_weight_groups lives with
# the selection rules; `aqn_rs.export.fused_weight_groups` stays.
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .._aqn_rs import __version__
from ..checkpoint import FolderTensors
from ..constants import DEFAULT_EXCLUDE, FORMATS, FUSED_GROUPS
from ..constants import SCALE_MODES as SCALE_MODES
from ..errors import CheckpointNotFoundError
from ..selection import fused_weight_groups
from .formats import _BLOCK as _BLOCK
from .formats import _DTYPE_NAMES as _DTYPE_NAMES
from .formats import _DTYPE_TAGS as _DTYPE_TAGS
from .formats import _ST_DTYPES as _ST_DTYPES
from .formats import _ST_TORCH as _ST_TORCH
from .formats import (
    _WEIGHT_FILE_SUFFIXES,
    CT_FORMATS,
    CT_VERSION,
    _check_format,
    _dense,
    _group_amax,
    _ModelTensors,
    _pack_weight,
    _quantizer,
    _selector,
    _to_quant_input,
    quantization_config,
)
from .load import dequantize_checkpoint, load_compressed_checkpoint
from .packed import iter_packed, linear_module_names
from .plan import ExportReport, _dtype_name, _plan, _resolve_dtype, _shard
from .writer import _ShardWriter, parse_size


def export_checkpoint(
    model_or_path: Union[torch.nn.Module, str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    format: str = "nvfp4",
    scale_mode: Optional[str] = "floor",
    exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE,
    include: Optional[Sequence[str]] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    *,
    tokenizer: Any = None,
    dtype: Any = torch.bfloat16,
    fuse_global_scales: bool = True,
    device: Any = None,
) -> Path:
    """Write a packed FP4 checkpoint in the compressed-tensors format, loadable by vLLM.

    Args:
        model_or_path: a transformers model in memory (an `nn.Module` with `.config`; CPU or
            CUDA, unsharded) or a checkpoint folder (safetensors, single or sharded with an
            index, plus `config.json`); a folder is read one tensor at a time.
        out_dir: the folder to create. It is written as a temporary sibling folder and renamed
            at the end; on any error nothing is left behind.
        format: "nvfp4" (E4M3 block scales of 16 + f32 global scale; vLLM's
            `CompressedTensorsW4A16Fp4`, Marlin on Hopper) or "mxfp4" (E8M0 block scales of 32;
            `CompressedTensorsW4A16Mxfp4`).
        scale_mode: MXFP4 scale mode ("floor", "rceil", "even", "ceil"); must stay "floor"
            (or None) for NVFP4. The scales are stored as bytes, so vLLM serves any mode.
        exclude: module patterns kept dense (exact dotted-suffix names, shell globs, `re:`
            regexes); they are listed in the config's `ignore`. Default: lm_head, embed_tokens.
        include: if given, only Linear modules matching one of these patterns are packed.
        max_shard_size: bytes per safetensors shard (int, or "5GB", "500MB", "2GiB"); one shard
            is written as `model.safetensors`, several with `model.safetensors.index.json`.
        overwrite: replace an existing `out_dir` (only once the new checkpoint is complete).
        tokenizer: optional tokenizer to save alongside (in-memory model).
        dtype: dtype of everything that is not packed, and the dtype weights are cast to before
            they are quantized (bf16 by default: verl's FSDP actor computes, and fake-quantizes,
            in bf16). None keeps each tensor's own dtype.
        fuse_global_scales: NVFP4: quantize q/k/v and gate/up (and MLA q_a/kv_a) with their
            common amax so that each vLLM-fused layer has one global scale (vLLM requires it).
        device: where to quantize ("cuda" to use the GPU for a folder or a CPU model); default:
            where each tensor is.

    Returns:
        The path of the written checkpoint.

    Raises:
        ValueError: unknown format or scale mode, no Linear layer to pack, a fused group only
            partly excluded, `out_dir` equal to the input.
        CheckpointError (a ValueError): an input folder that cannot be read (an already
            quantized one, a bad index or file); CheckpointNotFoundError (a FileNotFoundError)
            where it is not a folder or has no weights or config.json.
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    return _export(model_or_path, out_dir, format, scale_mode, exclude, include, max_shard_size,
                   overwrite, tokenizer, dtype, fuse_global_scales, device).path


def _export(model_or_path, out_dir, format, scale_mode, exclude, include, max_shard_size, overwrite,
            tokenizer, dtype, fuse_global_scales, device) -> ExportReport:
    t_start = time.perf_counter()
    format, scale_mode = _check_format(format, scale_mode)
    dtype = _resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; export needs a little-endian host")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")

    if isinstance(model_or_path, torch.nn.Module):
        if getattr(model_or_path, "config", None) is None:
            raise TypeError("the model has no .config; export needs a transformers model (vLLM reads config.json)")
        tensors: Any = _ModelTensors(model_or_path)
        src_folder = None
    elif isinstance(model_or_path, (str, os.PathLike)):
        src_folder = Path(model_or_path).absolute()
        if not src_folder.is_dir():
            raise CheckpointNotFoundError(f"{src_folder} is not a folder")
        if src_folder.resolve() == out_dir.resolve():
            raise ValueError("out_dir is the input folder; export to a new folder")
        tensors = FolderTensors(src_folder)
    else:
        raise TypeError(f"model_or_path must be an nn.Module or a folder path, got {type(model_or_path).__name__}")

    try:
        selector = _selector(include, exclude)
        units, packed, ignore, groups = _plan(tensors, format, selector, fuse_global_scales, dtype)
        outs = [o for u in units for o in u.outs]
        shards = _shard(outs, max_bytes)
        n = len(shards)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        metadata = {"format": "pt", "aqn_rs.version": __version__, "aqn_rs.format": format}
        if format == "mxfp4":
            metadata["aqn_rs.scale_mode"] = scale_mode

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.aqn-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except BaseException:
        tensors.close()
        raise
    try:
        q = _quantizer(format, scale_mode)
        t_quant = t_write = 0.0
        writers = iter([(files[i], shards[i]) for i in range(n)])
        w: Optional[_ShardWriter] = None
        for unit in units:
            if unit.kind == "dense":
                results = [(unit.outs[0].name, _dense(tensors.get(unit.inputs[0]), dtype))]
            else:
                t0 = time.perf_counter()
                ws = [_to_quant_input(tensors.get(name), dtype, device) for name in unit.inputs]
                amax = _group_amax(q, ws) if len(ws) > 1 else None
                results = []
                for name, wt in zip(unit.inputs, ws):
                    mod = name.rpartition(".")[0]
                    results += [(f"{mod}.{suffix}", t) for suffix, t in _pack_weight(q, wt, amax)]
                if ws and ws[0].is_cuda:
                    torch.cuda.synchronize(ws[0].device)
                t_quant += time.perf_counter() - t0
            t0 = time.perf_counter()
            for name, t in results:
                if w is None or w.full:
                    if w is not None:
                        w.close()
                    fname, souts = next(writers)
                    w = _ShardWriter(tmp / fname, souts, metadata)
                w.write(name, t)
            t_write += time.perf_counter() - t0
        if w is not None:
            w.close()
        if n > 1:
            weight_map = {o.name: files[i] for i in range(n) for o in shards[i]}
            index = {"metadata": {"total_size": sum(o.nbytes for o in outs)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        # config.json, tokenizer, generation config and the rest.
        if src_folder is not None:
            _copy_other_files(src_folder, tmp)
            config = json.loads((src_folder / "config.json").read_text())
        else:
            model = model_or_path
            model.config.save_pretrained(str(tmp))
            config = json.loads((tmp / "config.json").read_text())
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                try:
                    gen.save_pretrained(str(tmp))
                except Exception as e:  # noqa: BLE001 - a bad generation config must not lose the export
                    warnings.warn(f"generation_config not saved: {e}", stacklevel=3)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        config["quantization_config"] = quantization_config(format, ignore)
        if dtype is not None:
            config["dtype"] = _dtype_name(dtype)
            if "torch_dtype" in config:
                config["torch_dtype"] = _dtype_name(dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        # Publish: move an old out_dir aside only now that the new one is complete.
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.aqn-old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        tensors.close()

    packed_names = {o.name for u in units if u.kind == "pack" for o in u.outs}
    return ExportReport(
        path=out_dir,
        format=format,
        scale_mode=scale_mode if format == "mxfp4" else None,
        packed=packed,
        ignore=ignore,
        fused_groups=groups,
        shards=files,
        packed_bytes=sum(o.nbytes for o in outs if o.name in packed_names),
        dense_bytes=sum(o.nbytes for o in outs if o.name not in packed_names),
        seconds_quantize=t_quant,
        seconds_write=t_write,
        seconds_total=time.perf_counter() - t_start,
    )


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copy every non-weight file (tokenizer, generation config, chat template, code, ...)."""
    for root, dirs, fnames in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for fname in fnames:
            if fname.startswith(".") or (fname == "config.json" and Path(root) == src):
                continue
            if fname.endswith(_WEIGHT_FILE_SUFFIXES):
                continue
            rel = Path(root).relative_to(src) / fname
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / fname, dst / rel)


__all__ = [
    "CT_FORMATS",
    "CT_VERSION",
    "DEFAULT_EXCLUDE",
    "FORMATS",
    "FUSED_GROUPS",
    "ExportReport",
    "dequantize_checkpoint",
    "export_checkpoint",
    "fused_weight_groups",
    "iter_packed",
    "linear_module_names",
    "load_compressed_checkpoint",
    "parse_size",
    "quantization_config",
]
