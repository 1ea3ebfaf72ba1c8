"""The user-facing quantizers: `Mxfp4Quantizer`, `Nvfp4Quantizer` and `QuantizedTensor`.

Inputs are torch tensors (CPU or CUDA; float32, bfloat16, float16) or numpy arrays (float32,
float16). CPU work runs in the Rust core (`aqn_rs._aqn_rs`) on zero-copy views of the caller's
buffer with the GIL released; CUDA tensors go to the kernels in `aqn_rs._cuda`. The exact
rules are in docs/reference/FORMATS.md; `aqn_rs.reference` is the pure-torch ground truth.

torch is imported only when a torch tensor is passed, so numpy-only use stays light.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import sys
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from . import _aqn_rs, _cuda
from .constants import DTYPE_TAGS, MXFP4_BLOCK, NVFP4_BLOCK, SCALE_MODES, TAG_DTYPES

_NUMPY_TAGS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
_TAG_NUMPY = {"f32": np.float32, "f16": np.float16}


def _is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_tag(t) -> str:
    try:
        return DTYPE_TAGS[str(t.dtype).removeprefix("torch.")]
    except KeyError:
        raise TypeError(
            f"unsupported dtype {t.dtype}; expected torch.float32, torch.bfloat16 or torch.float16"
        ) from None


def _torch_dtype(tag: str):
    import torch

    return getattr(torch, TAG_DTYPES[tag])


_VIEW_DTYPES = {"f32": np.float32, "bf16": np.uint16, "f16": np.uint16, "u8": np.uint8}


def _rs_view(a: Any, tag: str) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor or array for the Rust core: float32 and
    uint8 as they are, bf16/f16 as uint16 bit patterns (numpy has no bfloat16).

    torch tensors are viewed through their data pointer, not `Tensor.numpy()`: that call marks
    the tensor's storage non-resizable for good, which breaks FSDP2 (it frees unsharded
    parameters by resizing their storage to 0). The view lives only for the call, while the
    caller holds the tensor.
    """
    dt = _VIEW_DTYPES[tag]
    if isinstance(a, np.ndarray):
        return a.view(dt) if a.dtype != dt else a
    if a.device.type != "cpu" or not a.is_contiguous():
        raise ValueError(f"expected a contiguous CPU tensor here, got one on {a.device}")
    n = a.numel()
    if n == 0:
        return np.empty(tuple(a.shape), dt)
    nbytes = n * a.element_size()
    buf = (ctypes.c_char * nbytes).from_address(a.data_ptr())
    return np.frombuffer(buf, dtype=dt).reshape(tuple(a.shape))


def _dtype_tag_of(dtype: Any, default: str) -> str:
    """Tag for a requested output dtype given as a torch dtype, numpy dtype or string."""
    if dtype is None:
        return default
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return _torch_tag(torch.empty(0, dtype=dtype))
    if isinstance(dtype, str) and dtype in ("bf16", "bfloat16"):
        return "bf16"
    try:
        return _NUMPY_TAGS[np.dtype(dtype)]
    except (TypeError, KeyError):
        raise TypeError(
            f"unsupported output dtype {dtype!r}; expected float32, bfloat16 or float16"
        ) from None


def _check_input(x: Any) -> Tuple[str, str]:
    """Validate an input and return (kind, dtype tag); kind is 'torch-cpu', 'torch-cuda' or 'numpy'."""
    if _is_torch_tensor(x):
        tag = _torch_tag(x)
        if x.dim() == 0:
            raise ValueError(
                "a 0-d tensor has no last dimension to block; reshape it to [1] first"
            )
        if not x.is_contiguous():
            raise ValueError(
                "expected a contiguous tensor (blocks run along the last dimension of a "
                "row-major tensor); call .contiguous() first"
            )
        if x.device.type == "cuda":
            return "torch-cuda", tag
        if x.device.type != "cpu":
            raise ValueError(f"unsupported device {x.device}; expected cpu or cuda")
        return "torch-cpu", tag
    if isinstance(x, np.ndarray):
        tag = _NUMPY_TAGS.get(x.dtype)
        if tag is None:
            raise TypeError(
                f"unsupported numpy dtype {x.dtype}; expected float32 or float16 "
                "(numpy has no bfloat16: pass a torch tensor for bf16)"
            )
        if x.ndim == 0:
            raise ValueError("a 0-d array has no last dimension to block; reshape it to [1] first")
        if not x.flags.c_contiguous:
            raise ValueError("expected a C-contiguous array; call np.ascontiguousarray first")
        return "numpy", tag
    raise TypeError(
        f"expected a torch.Tensor or numpy.ndarray, got {type(x).__module__}.{type(x).__qualname__}"
    )


_CUDA = None  # the _cuda module, once it has been found usable


def _cuda_module():
    global _CUDA
    if _CUDA is None:
        if not _cuda.available():
            raise RuntimeError(
                "a CUDA tensor was passed but aqn_rs has no usable CUDA kernels "
                f"(build_info: {build_info()}); reinstall aqn-rs with the kernels "
                "(pip install aqn-rs, without AQN_NO_CUDA=1) or move the tensor to the CPU"
            )
        _CUDA = _cuda
    return _CUDA


def _amax_value(amax: Any) -> Optional[float]:
    """A host float from None / float / int / 0-d tensor or array (CPU)."""
    if amax is None:
        return None
    if isinstance(amax, (float, int, np.floating, np.integer)) and not isinstance(amax, bool):
        return float(amax)
    if _is_torch_tensor(amax) or isinstance(amax, np.ndarray):
        if amax.ndim != 0 and tuple(amax.shape) != (1,):
            raise ValueError(f"amax must be a scalar or 0-d tensor, got shape {tuple(amax.shape)}")
        return float(amax.reshape(()).item())
    raise TypeError(f"amax must be None, a float or a 0-d tensor, got {type(amax).__name__}")


def _packed_shape(shape: Tuple[int, ...], block: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    k = shape[-1]
    return (*shape[:-1], (k + 1) // 2), (*shape[:-1], -(-k // block))


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A tensor in packed FP4 form, as `quantize` returns it.

    Attributes:
        codes: uint8 `[..., ceil(K/2)]`, two E2M1 codes per byte (element 2i in the low nibble).
        scales: uint8 `[..., ceil(K/block)]`: E8M0 bytes (MXFP4) or float8_e4m3fn bytes (NVFP4).
        global_scale: NVFP4's f32 encode-direction global scale (a 0-d float32 tensor on the
            codes' device for torch input, `np.float32` for numpy input); None for MXFP4.
        shape: the original tensor's shape.
        format: "mxfp4" or "nvfp4".
        dtype: the original dtype tag ("f32", "bf16" or "f16"), the default for `dequantize`.
        scale_mode: the MXFP4 scale mode that produced the scales (None for NVFP4).
    """

    codes: Any
    scales: Any
    global_scale: Any
    shape: Tuple[int, ...]
    format: str
    dtype: str = "f32"
    scale_mode: Optional[str] = None

    @property
    def block_size(self) -> int:
        return MXFP4_BLOCK if self.format == "mxfp4" else NVFP4_BLOCK

    def nbytes(self) -> int:
        """Bytes of packed storage (codes + scales + global scale)."""
        extra = 4 if self.global_scale is not None else 0
        return int(self.codes.nbytes if hasattr(self.codes, "nbytes") else self.codes.numel()) + int(
            self.scales.nbytes if hasattr(self.scales, "nbytes") else self.scales.numel()
        ) + extra


class _Quantizer:
    format: str = ""
    block_size: int = 0

    # -- dispatch helpers -------------------------------------------------------------------
    def _alloc_like(self, x, kind: str):
        if kind == "numpy":
            return np.empty_like(x)
        import torch

        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _alloc_packed(self, x, kind: str, shape):
        cshape, sshape = _packed_shape(tuple(shape), self.block_size)
        if kind == "numpy":
            return np.empty(cshape, np.uint8), np.empty(sshape, np.uint8)
        import torch

        return (
            torch.empty(cshape, dtype=torch.uint8, device=x.device),
            torch.empty(sshape, dtype=torch.uint8, device=x.device),
        )

    @staticmethod
    def _host_packed(t: QuantizedTensor) -> Tuple[Any, Any]:
        """C-contiguous codes and scales of a CPU QuantizedTensor (copies only if needed). The
        caller keeps the returned objects alive while the core reads views of them."""
        if isinstance(t.codes, np.ndarray):
            return np.ascontiguousarray(t.codes), np.ascontiguousarray(t.scales)
        return t.codes.detach().contiguous(), t.scales.detach().contiguous()

    def _check_qt(self, t: QuantizedTensor) -> None:
        if not isinstance(t, QuantizedTensor):
            raise TypeError(f"expected an aqn_rs.QuantizedTensor, got {type(t).__name__}")
        if t.format != self.format:
            raise ValueError(
                f"{type(self).__name__} cannot dequantize a {t.format!r} tensor; "
                f"use the {t.format} quantizer"
            )
        if len(t.shape) == 0:
            raise ValueError("QuantizedTensor.shape must have at least one dimension")
        cshape, sshape = _packed_shape(tuple(t.shape), self.block_size)
        if tuple(t.codes.shape) != cshape or tuple(t.scales.shape) != sshape:
            raise ValueError(
                f"codes/scales shapes {tuple(t.codes.shape)}/{tuple(t.scales.shape)} do not match "
                f"shape {tuple(t.shape)} (expected {cshape}/{sshape})"
            )
        for name, a in (("codes", t.codes), ("scales", t.scales)):
            if str(a.dtype) not in ("uint8", "torch.uint8"):
                raise TypeError(f"QuantizedTensor.{name} must be uint8, got {a.dtype}")

    def _dequant_out(self, t: QuantizedTensor, dtype: Any):
        tag = _dtype_tag_of(dtype, t.dtype)
        if _is_torch_tensor(t.codes):
            import torch

            out = torch.empty(t.shape, dtype=_torch_dtype(tag), device=t.codes.device)
            return out, tag, ("torch-cuda" if out.is_cuda else "torch-cpu")
        if tag == "bf16":
            raise TypeError("numpy has no bfloat16; dequantize numpy codes to float32 or float16")
        return np.empty(t.shape, _TAG_NUMPY[tag]), tag, "numpy"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config() == other.config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.config().items()))))

    def config(self) -> dict:
        """The keyword arguments that rebuild this quantizer."""
        raise NotImplementedError


class Mxfp4Quantizer(_Quantizer):
    """OCP MXFP4: blocks of 32 E2M1 values sharing an E8M0 (power-of-two) scale.

    Args:
        scale_mode: how the shared exponent comes from the block amax: "floor" (OCP spec,
            default; up to 25% of a block's range saturates at 6), "rceil" (NVIDIA
            cuBLAS/Transformer Engine: 2^ceil(log2(amax/6)), never saturates), "even" or
            "ceil" (torchao's definitions).
    """

    format = "mxfp4"
    block_size = MXFP4_BLOCK

    def __init__(self, scale_mode: str = "floor") -> None:
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"unknown MXFP4 scale_mode {scale_mode!r}; expected one of {SCALE_MODES}")
        self.scale_mode = scale_mode

    def config(self) -> dict:
        return {"scale_mode": self.scale_mode}

    def fake_quant(self, x):
        """Quantize then dequantize `x` in one pass.

        Args:
            x: torch tensor (CPU/CUDA; float32, bfloat16, float16) or numpy array (float32,
                float16), contiguous, at least 1-d. Blocks run along the last dimension; a
                last dimension that is not a multiple of 32 ends in a short block.

        Returns:
            A new tensor/array of the same type, shape, dtype and device. Blocks containing
            NaN or Inf come back as NaN. Autograd is not tracked: for a
            straight-through gradient use `aqn_rs.hooks.fake_quant` (or `quantize_model`).
        """
        if getattr(x, "is_cuda", False):  # the hot path: _cuda checks the tensor itself
            return _cuda_module().fake_quant(x, "mxfp4", self.scale_mode, None)
        kind, tag = _check_input(x)
        out = self._alloc_like(x, kind)
        _aqn_rs.mxfp4_fake_quant(_rs_view(x, tag), _rs_view(out, tag), tag, self.scale_mode)
        return out

    def fake_quant_many(self, xs):
        """`fake_quant` of several tensors: the outputs in input order, each equal to
        `fake_quant(x)` bit for bit. CUDA tensors of one dtype and device, contiguous, 16-byte
        aligned and with whole 32-element blocks along the last dimension go through one
        launch per 126 tensors; anything else takes one `fake_quant` per tensor."""
        xs = list(xs)
        cuda = _cuda_module() if xs and getattr(xs[0], "is_cuda", False) else None
        if cuda is not None and cuda.many_ready(xs, MXFP4_BLOCK):
            return cuda.fake_quant_many(xs, "mxfp4", self.scale_mode)[0]
        return [self.fake_quant(x) for x in xs]

    def quantize(self, x) -> QuantizedTensor:
        """Quantize `x` to packed E2M1 codes and E8M0 scale bytes.

        Args:
            x: as for `fake_quant`.

        Returns:
            A `QuantizedTensor` with `codes` uint8 `[..., ceil(K/2)]`, `scales` uint8
            `[..., ceil(K/32)]` (E8M0, 0xFF = NaN block) and `global_scale` None.
        """
        kind, tag = _check_input(x)
        shape = tuple(x.shape)
        if kind == "torch-cuda":
            codes, scales, _ = _cuda_module().quantize(x, "mxfp4", self.scale_mode, None)
        else:
            codes, scales = self._alloc_packed(x, kind, shape)
            _aqn_rs.mxfp4_quantize(
                _rs_view(x, tag), tag, self.scale_mode, _rs_view(codes, "u8"), _rs_view(scales, "u8")
            )
        return QuantizedTensor(codes, scales, None, shape, "mxfp4", tag, self.scale_mode)

    def dequantize(self, t: QuantizedTensor, dtype: Any = None):
        """Dequantize a `QuantizedTensor` from `quantize`.

        Args:
            t: the packed tensor (torch CPU/CUDA or numpy, as `quantize` returned it).
            dtype: output dtype (torch or numpy dtype); default the original tensor's dtype.

        Returns:
            A tensor/array of shape `t.shape`.
        """
        self._check_qt(t)
        out, tag, kind = self._dequant_out(t, dtype)
        if kind == "torch-cuda":
            return _cuda_module().dequantize(t.codes, t.scales, None, t.shape, "mxfp4", out.dtype)
        codes, scales = self._host_packed(t)
        _aqn_rs.mxfp4_dequantize(_rs_view(codes, "u8"), _rs_view(scales, "u8"), _rs_view(out, tag), tag)
        return out


class Nvfp4Quantizer(_Quantizer):
    """NVFP4: blocks of 16 E2M1 values with a float8_e4m3fn block scale and an f32 per-tensor
    global scale, by the compressed-tensors / vLLM checkpoint convention (so fake quant equals
    what vLLM computes from a checkpoint exported with the same scales).
    """

    format = "nvfp4"
    block_size = NVFP4_BLOCK

    def __init__(self) -> None:
        pass

    def config(self) -> dict:
        return {}

    @staticmethod
    def global_scale(amax: float) -> float:
        """The encode-direction global scale `2688 / amax` as compressed-tensors computes it."""
        return float(_aqn_rs.nvfp4_global_scale(float(amax)))

    def amax(self, x):
        """Max |x| over the tensor (NaN if any element is NaN): a float for CPU/numpy input, a
        0-d float32 tensor on the device for CUDA input (no host sync)."""
        kind, tag = _check_input(x)
        if kind == "torch-cuda":
            return _cuda_module().amax(x)
        return float(_aqn_rs.nvfp4_amax(_rs_view(x, tag), tag))

    def amax_many(self, xs):
        """Max |x| over several tensors (NaN if any element of any is NaN): the shared amax of
        a fused group (q/k/v, gate/up), from which each member's global scale is derived.
        CUDA tensors (one dtype, one device): a 0-d float32 tensor on the device, in one call
        and without a host sync; CPU / numpy: a float."""
        xs = list(xs)
        if not xs:
            raise ValueError("amax_many needs at least one tensor")
        if all(getattr(x, "is_cuda", False) for x in xs):
            for x in xs:
                _check_input(x)
            return _cuda_module().amax_many(xs)
        if any(getattr(x, "is_cuda", False) for x in xs):
            raise ValueError("amax_many: all CUDA tensors or none")
        vals = [self.amax(x) for x in xs]
        return math.nan if any(math.isnan(v) for v in vals) else max(vals)

    def fake_quant_many(self, xs, groups: Optional[Sequence[Any]] = None, return_amax: bool = False):
        """Fake quant of several tensors, with one shared amax per group.

        Tensors with equal labels in `groups` (one label per tensor; None: every tensor its
        own) share one tensor amax, the max of theirs, as the members of a fused layer
        (q/k/v, gate/up) do in vLLM. Each output equals `fake_quant(x, amax=its group's
        amax)`, bit for bit. CUDA tensors of one dtype and device, contiguous, 16-byte
        aligned and with whole 16-element blocks along the last dimension go through a few
        launches per 126 tensors with no host sync; anything else takes one `fake_quant` per
        tensor after the groups' `amax_many`.

        Returns:
            The outputs in input order; with `return_amax`, `(outputs, amaxes)`: each
            tensor's (its group's) amax, a 0-d float32 tensor on the device (CUDA) or a float.
        """
        xs = list(xs)
        labels = list(range(len(xs))) if groups is None else list(groups)
        if len(labels) != len(xs):
            raise ValueError(f"fake_quant_many: {len(xs)} tensors but {len(labels)} group labels")
        slot_of: dict = {}
        slots = [slot_of.setdefault(g, len(slot_of)) for g in labels]
        cuda = _cuda_module() if xs and getattr(xs[0], "is_cuda", False) else None
        if cuda is not None and cuda.many_ready(xs, NVFP4_BLOCK):
            outs, amax = cuda.fake_quant_many(xs, "nvfp4", "floor", slots, len(slot_of))
            amaxes = [amax[s] for s in slots]
        else:
            members: List[List[Any]] = [[] for _ in slot_of]
            for x, s in zip(xs, slots):
                members[s].append(x)
            group_amax = [self.amax_many(m) for m in members]
            amaxes = [group_amax[s] for s in slots]
            outs = [self.fake_quant(x, amax=a) for x, a in zip(xs, amaxes)]
        return (outs, amaxes) if return_amax else outs

    def fake_quant(self, x, amax: Any = None):
        """Quantize then dequantize `x` in one pass.

        Args:
            x: as for `Mxfp4Quantizer.fake_quant`.
            amax: optional precomputed max |x| (float or 0-d tensor) from which the global
                scale is derived, e.g. cached per weight version; None computes it.

        Returns:
            A new tensor/array like `x`.
        """
        if getattr(x, "is_cuda", False):  # the hot path: _cuda checks the tensor itself
            return _cuda_module().fake_quant(x, "nvfp4", "floor", amax)
        kind, tag = _check_input(x)
        out = self._alloc_like(x, kind)
        _aqn_rs.nvfp4_fake_quant(_rs_view(x, tag), _rs_view(out, tag), tag, _amax_value(amax))
        return out

    def quantize(self, x, amax: Any = None) -> QuantizedTensor:
        """Quantize `x` to packed E2M1 codes, E4M3 block-scale bytes and a global scale.

        Args:
            x: as for `fake_quant`.
            amax: optional precomputed max |x|.

        Returns:
            A `QuantizedTensor`; `global_scale` is the f32 encode-direction scale
            (`d_block = e4m3(scale_byte) / global_scale`).
        """
        kind, tag = _check_input(x)
        shape = tuple(x.shape)
        if kind == "torch-cuda":
            codes, scales, gs = _cuda_module().quantize(x, "nvfp4", "floor", amax)
            return QuantizedTensor(codes, scales, gs, shape, "nvfp4", tag, None)
        codes, scales = self._alloc_packed(x, kind, shape)
        gs = _aqn_rs.nvfp4_quantize(
            _rs_view(x, tag), tag, _rs_view(codes, "u8"), _rs_view(scales, "u8"), _amax_value(amax)
        )
        if kind == "numpy":
            gs = np.float32(gs)
        else:
            import torch

            gs = torch.tensor(gs, dtype=torch.float32)
        return QuantizedTensor(codes, scales, gs, shape, "nvfp4", tag, None)

    def dequantize(self, t: QuantizedTensor, dtype: Any = None):
        """Dequantize a `QuantizedTensor` from `quantize` (see `Mxfp4Quantizer.dequantize`)."""
        self._check_qt(t)
        if t.global_scale is None:
            raise ValueError("an NVFP4 QuantizedTensor needs a global_scale")
        out, tag, kind = self._dequant_out(t, dtype)
        if kind == "torch-cuda":
            return _cuda_module().dequantize(t.codes, t.scales, t.global_scale, t.shape, "nvfp4", out.dtype)
        codes, scales = self._host_packed(t)
        _aqn_rs.nvfp4_dequantize(
            _rs_view(codes, "u8"), _rs_view(scales, "u8"), _amax_value(t.global_scale), _rs_view(out, tag), tag
        )
        return out


def build_info() -> dict:
    """What this build of aqn-rs contains.

    Returns:
        dict with `version`, `cuda` (CUDA kernels compiled in), `cuda_archs` (SASS/PTX targets
        in the embedded fatbin), `cuda_available` (kernels built and a driver and device usable
        now) and `cpu_threads` (threads of the CPU path).
    """
    return {
        "version": _aqn_rs.__version__,
        "cuda": bool(_cuda.build_archs()),
        "cuda_archs": list(_cuda.build_archs()),
        "cuda_available": bool(_cuda.available()),
        "cpu_threads": int(_aqn_rs.cpu_threads()),
    }
