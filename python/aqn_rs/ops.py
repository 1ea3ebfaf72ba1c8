"""The torch ops of fake quantization: `torch.ops.aqn_rs.fake_quant` and its straight-through
gradient, for the module hooks (`aqn_rs.hooks`) and for direct use (`fake_quant`).

* Backward is the straight-through estimator: the gradient of the fake-quantized tensor is
  passed to the input unchanged (`ste="identity"`), or zeroed where the element was clipped at
  the top of its block's FP4 grid (`ste="clipped"`).
* The op is a `torch.library` custom op with a fake implementation and an autograd formula, so
  `torch.compile(fullgraph=True)` traces it whole.
* `STELink` gives a cached fake-quantized weight the same gradient as the op, and
  `normal_tensor` makes the value a cache may serve to every later forward (a normal tensor,
  never an inference tensor).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .constants import STE_MODES
from .quantizers import Mxfp4Quantizer, Nvfp4Quantizer, _Quantizer


def quantizer_for(fmt: str, scale_mode: str) -> _Quantizer:
    if fmt == "mxfp4":
        return Mxfp4Quantizer(scale_mode)
    if fmt == "nvfp4":
        return Nvfp4Quantizer()
    raise ValueError(f"unknown format {fmt!r}; expected 'mxfp4' or 'nvfp4'")


# ---- the custom op -------------------------------------------------------------------------


@torch.library.custom_op("aqn_rs::fake_quant", mutates_args=())
def fake_quant_op(x: Tensor, fmt: str, scale_mode: str, ste: str, amax: Optional[Tensor] = None) -> Tensor:
    """Fake quant as a torch op (CPU and CUDA). Backward: STE (`ste` = identity | clipped)."""
    return fake_quant_with(quantizer_for(fmt, scale_mode), x, amax)


def fake_quant_with(q: _Quantizer, x: Tensor, amax: Optional[Tensor]) -> Tensor:
    """The op's implementation, also called directly where autograd is off (the weight cache)."""
    x = x.contiguous()
    if q.format == "nvfp4":
        return q.fake_quant(x, amax=amax)
    return q.fake_quant(x)


@fake_quant_op.register_fake
def _(x, fmt, scale_mode, ste, amax=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _block_top(x: Tensor, fmt: str, scale_mode: str, amax: Optional[Tensor]) -> Tensor:
    """Per element, the top of its block's grid (6 * decode scale): values above it were clipped."""
    q = quantizer_for(fmt, scale_mode)
    x = x.detach().contiguous()
    t = q.quantize(x, amax=amax) if fmt == "nvfp4" else q.quantize(x)
    s = t.scales
    if fmt == "mxfp4":
        d = torch.ldexp(torch.ones_like(s, dtype=torch.float32), s.to(torch.int32) - 127)
        d = torch.where(s == 255, torch.nan, d)
    else:
        d = s.view(torch.float8_e4m3fn).float() / t.global_scale.to(s.device)
    block = q.block_size
    top = (6.0 * d).repeat_interleave(block, dim=-1)[..., : x.shape[-1]]
    return top


def _setup_context(ctx, inputs, output):
    x, fmt, scale_mode, ste, amax = inputs
    ctx.ste = ste
    if ste == "clipped":
        ctx.fmt, ctx.scale_mode = fmt, scale_mode
        ctx.save_for_backward(x, amax)


@torch.library.custom_op("aqn_rs::clipped_ste_grad", mutates_args=())
def clipped_ste_grad(grad: Tensor, x: Tensor, fmt: str, scale_mode: str, amax: Optional[Tensor] = None) -> Tensor:
    """The clipped STE's gradient: `grad` where `|x|` is within its block's grid, else 0. An
    opaque op of its own because the block scales come from the quantizer's kernels, which
    `torch.compile`'s backward tracing (fake tensors) cannot enter."""
    keep = x.abs() <= _block_top(x, fmt, scale_mode, amax)
    return grad * keep.to(grad.dtype)


@clipped_ste_grad.register_fake
def _(grad, x, fmt, scale_mode, amax=None):
    return torch.empty_like(grad)


def _backward(ctx, grad):
    if ctx.ste == "identity":
        return grad, None, None, None, None
    x, amax = ctx.saved_tensors
    return torch.ops.aqn_rs.clipped_ste_grad(grad, x, ctx.fmt, ctx.scale_mode, amax), None, None, None, None


torch.library.register_autograd("aqn_rs::fake_quant", _backward, setup_context=_setup_context)


class STELink(torch.autograd.Function):
    """Returns the cached fake-quantized weight `q` while routing the gradient to `w`: unchanged
    (`ste="identity"`) or zeroed where `w` was clipped at the top of its block's grid
    (`"clipped"`; the mask is computed in backward from the saved `w`, so the forward reuses the
    cache in both modes). The same gradient as `torch.ops.aqn_rs.fake_quant(w, ...)`'s."""

    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor, fmt: str, scale_mode: str, ste: str, amax: Optional[Tensor]) -> Tensor:
        ctx.ste = ste
        if ste == "clipped":
            ctx.fmt, ctx.scale_mode = fmt, scale_mode
            ctx.save_for_backward(w, amax)
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.ste == "identity":
            return grad, None, None, None, None, None
        w, amax = ctx.saved_tensors
        return torch.ops.aqn_rs.clipped_ste_grad(grad, w, ctx.fmt, ctx.scale_mode, amax), None, None, None, None, None


def normal_tensor(compute, *args) -> Tensor:
    """`compute(*args)` outside autograd and, if it is on, outside `inference_mode`: a value
    that is cached and served to later forwards must be a normal tensor (an inference tensor
    handed to a training forward silently cuts the weight's gradient). Leaving inference mode
    for one op costs nothing measurable; the inputs are the module's (normal) parameters."""
    with torch.inference_mode(False), torch.no_grad():
        return compute(*args)


def fake_quant(x: Tensor, quantizer: _Quantizer, ste: str = "identity", amax: Optional[Tensor] = None) -> Tensor:
    """Differentiable fake quant of a torch tensor (STE backward).

    Args:
        x: float32/bfloat16/float16 tensor on CPU or CUDA.
        quantizer: an `Mxfp4Quantizer` or `Nvfp4Quantizer`.
        ste: "identity" (gradient passes unchanged) or "clipped" (zero where clipped at the
            top of the block's grid).
        amax: optional NVFP4 tensor amax (0-d tensor).

    Returns:
        The fake-quantized tensor, same shape and dtype.
    """
    if ste not in STE_MODES:
        raise ValueError(f"unknown ste {ste!r}; expected one of {STE_MODES}")
    mode = getattr(quantizer, "scale_mode", "floor")
    return torch.ops.aqn_rs.fake_quant(x, quantizer.format, mode, ste, amax)
