"""aqn-rs: fused MXFP4/NVFP4 fake quantization and Adaptive Quantization Noise (AQN) for
quantization-aware RL training of LLMs with FP4 weights.

Quick start::

    import torch, aqn_rs
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    wq = aqn_rs.Nvfp4Quantizer().fake_quant(w)           # same shape and dtype
    t = aqn_rs.Mxfp4Quantizer("floor").quantize(w)        # packed codes + E8M0 scales
    w2 = aqn_rs.Mxfp4Quantizer().dequantize(t, dtype=torch.bfloat16)

The exact number formats are in docs/FORMATS.md; `aqn_rs.reference` is a pure-torch
implementation of the same rules that the tests compare against bit for bit.
"""

from ._aqn_rs import AqnError, __version__
from .quantizers import (
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    SCALE_MODES,
    Mxfp4Quantizer,
    Nvfp4Quantizer,
    QuantizedTensor,
    build_info,
)

__all__ = [
    "AqnError",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "Mxfp4Quantizer",
    "Nvfp4Quantizer",
    "QuantizedTensor",
    "SCALE_MODES",
    "__version__",
    "build_info",
]
