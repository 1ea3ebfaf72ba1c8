"""CUDA path of the quantizers: allocates outputs with torch on the input's device and
launches the kernels of `cuda/` (through `_aqn_rs.cuda_*`) on torch's current stream for that
device. No host synchronisation anywhere, so calls order with torch work and can be captured
in a CUDA graph (call once before capturing: the first call on a device loads the kernels).

`quantizers.py` validates its inputs first; the checks here are the cheap ones that keep a
wrong call from reaching the driver (the Rust side validates every pointer again). Keep this
file lean: it is the per-call Python overhead.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from . import _aqn_rs as _rs
from .constants import BLOCK_SIZES, DTYPE_TAGS

_BLOCK = BLOCK_SIZES
_AMAX_SCRATCH = int(getattr(_rs, "CUDA_AMAX_SCRATCH", 1024))

_available: Optional[bool] = None
# Filled by _init() on the first call (this module imports without torch): torch dtype ->
# "f32" / "bf16" / "f16"; an empty dict sends the first call through _check, which fills it.
_dtags: dict = {}
_raw_stream = None  # torch._C._cuda_getCurrentRawStream(device_index) -> int
_empty_like = None  # torch.empty_like
_rs_fake_quant = _rs.cuda_fake_quant
_rs_fake_quant_t = _rs.cuda_fake_quant_t
# True once _init registered torch's DLPack C exchange API (torch >= 2.10) with the binding:
# fake_quant then hands the tensors themselves to it, which reads them with no Python call.
_xapi = False


def _init() -> None:
    global _raw_stream, _empty_like, _xapi
    import torch

    _empty_like = torch.empty_like
    _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
        lambda d: torch.cuda.current_stream(d).cuda_stream
    )
    _dtags.update({getattr(torch, name): tag for name, tag in DTYPE_TAGS.items()})
    _xapi = bool(_rs.dlpack_exchange_register(torch.Tensor))  # False before torch 2.10


def available() -> bool:
    """Kernels compiled in, a CUDA driver loadable, a device visible, and torch with CUDA."""
    global _available
    if _available is None:
        ok = bool(_rs.cuda_built()) and bool(_rs.cuda_available())
        if ok:
            try:
                import torch

                ok = torch.cuda.is_available()
            except ImportError:
                ok = False
        _available = ok
    return _available


def build_archs() -> List[str]:
    """SASS/PTX targets embedded in this build, e.g. ["sm_80", ..., "compute_80"]; [] if CPU-only."""
    return list(_rs.cuda_build_archs())


def _check(x: Any, what: str = "x") -> Tuple[str, int]:
    """(dtype tag, device index) of a contiguous CUDA tensor of a supported dtype (the
    messages are the quantizers' own: their CUDA calls come straight here)."""
    if not _dtags:
        _init()
    tag = _dtags.get(x.dtype)
    if tag is None:
        raise TypeError(
            f"unsupported dtype {x.dtype}; expected torch.float32, torch.bfloat16 or torch.float16"
        )
    dev = x.get_device()
    if dev < 0:
        raise ValueError(f"{what} is a CPU tensor; the CUDA path needs a CUDA tensor")
    if not x.is_contiguous():
        raise ValueError(
            "expected a contiguous tensor (blocks run along the last dimension of a "
            "row-major tensor); call .contiguous() first"
        )
    return tag, dev


def _check_alike(op: str, named: List[Tuple[Any, str]]) -> Tuple[str, int]:
    """`_check` of every `(tensor, name)` of a multi-tensor call, which takes one dtype and one
    device: their (dtype tag, device index)."""
    x0, name0 = named[0]
    tag, dev = _check(x0, name0)
    for t, what in named[1:]:
        tt, d = _check(t, what)
        if tt != tag or d != dev:
            raise ValueError(
                f"{op}: {what} is {t.dtype} on cuda:{d}, {name0} {x0.dtype} on cuda:{dev}; "
                "one dtype and one device for all"
            )
    return tag, dev


def _rows_k(shape) -> Tuple[int, int]:
    if len(shape) == 0:
        raise ValueError("a 0-d tensor has no last dimension to block; reshape it to [1] first")
    k = int(shape[-1])
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows, k


# _amax_args' answer where there is no amax (MXFP4).
_NO_AMAX = (0, None, 0, None)


def _amax_args(amax: Any, x: Any):
    """(amax_ptr, amax_value, scratch, keepalive) for the NVFP4 amax source."""
    import torch

    if amax is None:
        s = torch.empty(_AMAX_SCRATCH, dtype=torch.float32, device=x.device)
        return 0, None, s.data_ptr(), s
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1:
            raise ValueError(f"amax must be a scalar (0-d or 1-element) tensor, got shape {tuple(amax.shape)}")
        a = amax.to(device=x.device, dtype=torch.float32, non_blocking=True)
        return a.data_ptr(), None, 0, a
    return 0, float(amax), 0, None


def amax(x: Any):
    """Max |x| as a 0-d float32 tensor on x's device (NaN if any NaN, 0 for empty); no sync."""
    import torch

    tag, dev = _check(x)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    s = torch.empty(_AMAX_SCRATCH, dtype=torch.float32, device=x.device)
    _rs.cuda_amax(tag, dev, _raw_stream(dev), x.data_ptr(), x.numel(), s.data_ptr(), out.data_ptr())
    return out


def amax_many(xs: List[Any]):
    """One max |x| over several CUDA tensors of one dtype and device (an NVFP4 fused group's
    shared amax) as a 0-d float32 tensor: one call, one pass per member and one fold, no sync.
    The first member is read last, so it is the one still in L2 for the fake quant after."""
    import torch

    if not xs:
        raise ValueError("amax_many needs at least one tensor")
    tag, dev = _check_alike("amax_many", [(x, f"tensor {i}") for i, x in enumerate(xs)])
    out = torch.empty((), dtype=torch.float32, device=xs[0].device)
    s = torch.empty(_AMAX_SCRATCH * len(xs), dtype=torch.float32, device=xs[0].device)
    _rs.cuda_amax_many(
        tag, dev, _raw_stream(dev), [x.data_ptr() for x in xs], [x.numel() for x in xs],
        s.data_ptr(), s.numel(), out.data_ptr(),
    )
    return out


def many_ready(xs: List[Any], block: int) -> bool:
    """Whether `fake_quant_many` takes these tensors: CUDA, one dtype and device, contiguous,
    16-byte aligned, with whole `block`-element blocks along the last dimension (the vector
    kernels' layout). Cheap: attribute reads only."""
    if not xs:
        return False
    if not _dtags:
        _init()
    x0 = xs[0]
    dt, dev = x0.dtype, x0.device
    if dt not in _dtags or not x0.is_cuda:
        return False
    for x in xs:
        if x.dtype != dt or x.device != dev or x.dim() == 0 or not x.is_contiguous():
            return False
        if x.numel() and (x.shape[-1] % block or x.data_ptr() % 16):
            return False
    return True


def fake_quant_many(xs: List[Any], fmt: str, scale_mode: str, slots: Optional[List[int]] = None,
                    n_slots: int = 0):
    """Fake quant of several CUDA tensors of one dtype and device in a few launches (per 126
    tensors: one for MXFP4; an amax pass, a fold and the fake quant for NVFP4), no sync.
    NVFP4: tensor i uses the amax of slot `slots[i]` (0 <= slot < n_slots), the max |x| over
    all tensors of that slot (a fused group's shared amax). Returns (outputs, amax): amax is
    a float32 tensor [n_slots] on the device for NVFP4, None for MXFP4. The tensors need the
    vector layout (`many_ready`)."""
    import torch

    if not xs:
        return [], (torch.empty(0, dtype=torch.float32) if fmt == "nvfp4" else None)
    tag, dev = _check_alike("fake_quant_many", [(x, f"tensor {i}") for i, x in enumerate(xs)])
    for x in xs:
        if x.dim() == 0:
            _rows_k(())  # raises the quantizers' message for a 0-d tensor
    outs = [_empty_like(x) for x in xs]
    amax = scratch = None
    if fmt == "nvfp4":
        if slots is None:
            slots, n_slots = list(range(len(xs))), len(xs)
        amax = torch.empty(n_slots, dtype=torch.float32, device=xs[0].device)
        scratch = torch.empty(max(1, n_slots) * _AMAX_SCRATCH, dtype=torch.float32, device=xs[0].device)
    _rs.cuda_fake_quant_many(
        fmt, scale_mode, tag, dev, _raw_stream(dev), [x.data_ptr() for x in xs],
        [o.data_ptr() for o in outs], [x.numel() for x in xs], [int(x.shape[-1]) for x in xs],
        list(slots) if fmt == "nvfp4" else [], n_slots,
        amax.data_ptr() if amax is not None and n_slots else 0,
        scratch.data_ptr() if scratch is not None else 0,
        scratch.numel() if scratch is not None else 0,
    )
    return outs, amax


def sq_err_many(xs: List[Any], ys: List[Any]):
    """Per pair (x, y) of CUDA tensors of one dtype and device (x a weight, y its fake quant,
    same number of elements): `[[sum (x - y)^2, sum x^2], ...]` as a float64 tensor of shape
    `[len(xs), 2]` on their device, no sync. One read of each tensor in the kernel (f32 sums
    per CTA), one fold in float64 for all of them."""
    import torch

    if not xs or len(xs) != len(ys):
        raise ValueError(f"sq_err_many needs pairs: got {len(xs)} x and {len(ys)} y tensors")
    named = [(t, f"{side} {i}") for i, pair in enumerate(zip(xs, ys)) for side, t in zip("xy", pair)]
    tag, dev = _check_alike("sq_err_many", named)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.numel() != y.numel():
            raise ValueError(f"sq_err_many: pair {i} has {x.numel()} and {y.numel()} elements")
    out = torch.empty(len(xs) * 2 * _AMAX_SCRATCH, dtype=torch.float32, device=xs[0].device)
    _rs.cuda_sq_err_many(
        tag, dev, _raw_stream(dev), [x.data_ptr() for x in xs], [y.data_ptr() for y in ys],
        [x.numel() for x in xs], out.data_ptr(), out.numel(),
    )
    return out.view(len(xs), _AMAX_SCRATCH, 2).sum(1, dtype=torch.float64)


def fake_quant(x: Any, fmt: str, scale_mode: str, amax: Any = None):
    """Quantize-dequantize x ("mxfp4" with scale_mode, or "nvfp4" with an optional amax:
    None computes it on the device, a float or a 0-d tensor on any device is used as is).
    Returns a new tensor like x."""
    # The hot path (this is the per-call overhead): with torch's DLPack exchange API the
    # binding reads x, out and the current stream itself; it declines (False) anything but a
    # contiguous CUDA tensor of a supported dtype, which then takes the checked path below.
    if _xapi:
        out = _empty_like(x)
        ap, av, sp, _keep = _amax_args(amax, x) if fmt == "nvfp4" else _NO_AMAX
        if _rs_fake_quant_t(x, out, fmt, scale_mode, ap, av, sp):
            return out
    return _fake_quant_attrs(x, fmt, scale_mode, amax)


def _fake_quant_attrs(x: Any, fmt: str, scale_mode: str, amax: Any = None):
    """fake_quant reading the tensor's attributes in Python (torch < 2.10, or an input the
    exchange path declined: this raises the quantizers' messages for it)."""
    tag = _dtags.get(x.dtype)
    dev = x.get_device()
    if tag is None or dev < 0 or not x.is_contiguous():
        tag, dev = _check(x)  # raises for a bad input; the first call sets the module up
    try:
        k = x.size(-1)
    except IndexError:
        _rows_k(())  # a 0-d tensor: raises the quantizers' message
    out = _empty_like(x)
    ap, av, sp, _keep = _amax_args(amax, x) if fmt == "nvfp4" else _NO_AMAX
    _rs_fake_quant(
        fmt, scale_mode, tag, dev, _raw_stream(dev), x.data_ptr(), out.data_ptr(),
        x.numel() // k if k else 0, k, ap, av, sp,
    )
    return out


def quantize(x: Any, fmt: str, scale_mode: str, amax: Any = None):
    """Packed codes uint8 [..., ceil(K/2)], scale bytes uint8 [..., ceil(K/B)] and, for NVFP4,
    the global scale as a 0-d float32 tensor on the device (None for MXFP4)."""
    import torch

    tag, dev = _check(x)
    shape = tuple(x.shape)
    rows, k = _rows_k(shape)
    b = _BLOCK.get(fmt)
    if b is None:
        raise ValueError(f"unknown format {fmt!r}; expected 'mxfp4' or 'nvfp4'")
    lead = shape[:-1]
    codes = torch.empty(lead + ((k + 1) // 2,), dtype=torch.uint8, device=x.device)
    scales = torch.empty(lead + ((k + b - 1) // b,), dtype=torch.uint8, device=x.device)
    if fmt == "nvfp4":
        gs = torch.empty((), dtype=torch.float32, device=x.device)
        ap, av, sp, _keep = _amax_args(amax, x)
        gp = gs.data_ptr()
    else:
        gs, ap, av, sp, gp = None, 0, None, 0, 0
    _rs.cuda_quantize(
        fmt, scale_mode, tag, dev, _raw_stream(dev), x.data_ptr(), codes.data_ptr(),
        scales.data_ptr(), gp, rows, k, ap, av, sp,
    )
    return codes, scales, gs


def dequantize(codes: Any, scales: Any, global_scale: Any, shape, fmt: str, dtype: Any):
    """Tensor of `shape` and `dtype` on codes' device from packed codes and scale bytes
    (NVFP4: global_scale a float or a 0-d tensor, as quantize returned it)."""
    import torch

    if not _dtags:
        _init()
    tag = _dtags.get(dtype)
    if tag is None:
        raise TypeError(f"unsupported output dtype {dtype}; expected float32, bfloat16 or float16")
    b = _BLOCK.get(fmt)
    if b is None:
        raise ValueError(f"unknown format {fmt!r}; expected 'mxfp4' or 'nvfp4'")
    shape = tuple(int(d) for d in shape)
    rows, k = _rows_k(shape)
    dev = codes.get_device()
    for name, t, n in (("codes", codes, rows * ((k + 1) // 2)), ("scales", scales, rows * ((k + b - 1) // b))):
        if t.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8, got {t.dtype}")
        if t.get_device() != dev or dev < 0:
            raise ValueError(f"codes and scales must be CUDA tensors on one device ({codes.device}, {scales.device})")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} bytes; shape {shape} with {fmt} needs {n}")
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    gp, gv, _keep = 0, None, None
    if fmt == "nvfp4":
        if global_scale is None:
            raise ValueError("NVFP4 dequantize needs a global_scale")
        if isinstance(global_scale, torch.Tensor):
            if global_scale.numel() != 1:
                raise ValueError("global_scale must be a scalar tensor")
            _keep = global_scale.to(device=codes.device, dtype=torch.float32, non_blocking=True)
            gp = _keep.data_ptr()
        else:
            gv = float(global_scale)
    _rs.cuda_dequantize(
        fmt, tag, dev, _raw_stream(dev), codes.data_ptr(), scales.data_ptr(), gp, gv,
        out.data_ptr(), rows, k,
    )
    return out
