"""aqn-rs: fused MXFP4/NVFP4 fake quantization and Adaptive Quantization Noise (AQN) for
quantization-aware RL training of LLMs with FP4 weights.

Quick start::

    import torch, aqn_rs
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    wq = aqn_rs.Nvfp4Quantizer().fake_quant(w)           # same shape and dtype
    t = aqn_rs.Mxfp4Quantizer("floor").quantize(w)        # packed codes + E8M0 scales
    w2 = aqn_rs.Mxfp4Quantizer().dequantize(t, dtype=torch.bfloat16)

The exact number formats are in docs/reference/FORMATS.md; `aqn_rs.reference` is a pure-torch
implementation of the same rules that the tests compare against bit for bit.
"""

from ._aqn_rs import SigmaScheduler, __version__
from .aqn import AqnNoise, gaussian_noise
from .errors import AqnError
from .quantizers import (
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    SCALE_MODES,
    Mxfp4Quantizer,
    Nvfp4Quantizer,
    QuantizedTensor,
    build_info,
)
from .selection import ModuleSelector

# torch-dependent names load on first use, so `import aqn_rs` does not import torch.
_LAZY = {
    "quantize_model": ("hooks", "quantize_model"),
    "QuantizationHandle": ("hooks", "QuantizationHandle"),
    "attach_noise": ("hooks", "attach_noise"),
    "hooks": ("hooks", None),
    "export_checkpoint": ("export", "export_checkpoint"),
    "load_compressed_checkpoint": ("export", "load_compressed_checkpoint"),
    "dequantize_checkpoint": ("export", "dequantize_checkpoint"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod_name, attr = _LAZY[name]
        mod = importlib.import_module(f".{mod_name}", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'aqn_rs' has no attribute {name!r}")


__all__ = [
    "AqnError",
    "AqnNoise",
    "ModuleSelector",
    "SigmaScheduler",
    "attach_noise",
    "dequantize_checkpoint",
    "export_checkpoint",
    "load_compressed_checkpoint",
    "gaussian_noise",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "Mxfp4Quantizer",
    "Nvfp4Quantizer",
    "QuantizationHandle",
    "QuantizedTensor",
    "SCALE_MODES",
    "__version__",
    "build_info",
    "quantize_model",
]
