"""AQN's deterministic noise: N(0, sigma^2) keyed by ``(seed, step, module name)`` through
Philox4x32-10 (docs/reference/NOISE.md), on the CPU in Rust, on CUDA in one kernel, elsewhere
in pure torch (`_reference_gaussian`, the same algorithm op for op). torch is imported inside
the functions."""

from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np

from .. import _aqn_rs, _cuda

# ---------------------------------------------------------------------------------------------
# The noise algorithm (docs/reference/NOISE.md). Constants are given by their f32 bit patterns, the
# same table as `aqn_core::noise` and the CUDA port.
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3

_F32_BITS = {
    "U24": 0x33800000,  # 2^-24
    "SQRT2": 0x3FB504F3,
    "LN2_HI": 0x3F317180,
    "LN2_LO": 0x3717F7D1,
    "LG1": 0x3F2AAAAB,  # 2/3
    "LG2": 0x3ECCCCCD,  # 2/5
    "LG3": 0x3E924925,  # 2/7
    "LG4": 0x3E638E39,  # 2/9
    "S1": 0xBE2AAAAB,  # -1/3!
    "S2": 0x3C088889,  # 1/5!
    "S3": 0xB9500D01,  # -1/7!
    "S4": 0x3638EF1D,  # 1/9!
    "C1": 0xBF000000,  # -1/2!
    "C2": 0x3D2AAAAB,  # 1/4!
    "C3": 0xBAB60B61,  # -1/6!
    "C4": 0x37D00D01,  # 1/8!
    "C5": 0xB493F27E,  # -1/10!
    "ANGLE_UNIT": 0x34C90FDB,  # 2 pi / 2^24
    "HALF": 0x3F000000,
    "ONE": 0x3F800000,
    "TWO": 0x40000000,
    "MINUS_TWO": 0xC0000000,
}


def _fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def noise_key(seed: int, name: str) -> int:
    """The 64-bit Philox key of ``(seed, name)``: FNV-1a 64 over the seed's 8 little-endian
    bytes followed by the UTF-8 bytes of the (canonical) module name."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return _fnv1a64(int(seed).to_bytes(8, "little") + name.encode("utf-8"))


def _u64(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(v).__name__}")
    v = int(v)
    if not 0 <= v < 2**64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {v}")
    return v


def _shape_tuple(shape: Any) -> Tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    return shape


def _reference_gaussian(
    shape: Any,
    seed: int,
    step: int,
    name: str,
    sigma: float = 1.0,
    offset: int = 0,
    device: Any = None,
):
    """Pure-torch reference of the noise (docs/reference/NOISE.md), op for op the algorithm of
    `aqn_core::noise`: a float32 tensor of ``shape`` holding elements
    ``offset .. offset + numel`` of the noise of ``(seed, step, name)`` times ``float32(sigma)``.

    Runs on any device. Every float operation is a separate torch op on float32 tensors, so
    it is one IEEE round-to-nearest operation on CPU and CUDA alike (never run it under
    torch.compile, which may fuse multiply-adds; it is excluded from compilation).
    """
    return _eager(_reference_gaussian_eager, shape, seed, step, name, sigma, offset, device)


def _eager(fn, *args):
    """`fn(*args)`, kept out of any torch.compile graph (`torch.compiler.disable`) when dynamo
    is loaded, which is the only time anything can be compiling."""
    import sys

    if "torch._dynamo" in sys.modules:
        import torch

        return torch.compiler.disable(fn)(*args)
    return fn(*args)


def _reference_gaussian_eager(shape, seed, step, name, sigma, offset, device):
    import torch

    shape = _shape_tuple(shape)
    seed, step, offset = _u64(seed, "seed"), _u64(step, "step"), _u64(offset, "offset")
    n = math.prod(shape)
    if offset + n >= 2**62:
        raise ValueError("the reference handles element indices below 2**62")
    device = torch.device("cpu") if device is None else torch.device(device)

    # Constants as Python floats holding the exact f32 values: whether torch rounds such a
    # scalar to f32 first or computes the op in f64 and rounds once, the f32 result of +, -, *, /
    # is the same (double rounding is innocuous from 53 to 24 bits), and no device copies.
    k = {name_: float(np.array(b, dtype=np.uint32).view(np.float32)) for name_, b in _F32_BITS.items()}
    key = noise_key(seed, name)
    if n == 0:
        return torch.empty(shape, dtype=torch.float32, device=device)

    first, last = offset // 4, (offset + n - 1) // 4
    b = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    c0, c1 = b & _M32, b >> 32
    c2 = torch.full_like(b, step & _M32)
    c3 = torch.full_like(b, step >> 32)
    k0, k1 = key & _M32, key >> 32

    def mulhilo(m: int, c):
        # 32x32 -> 64-bit product from two 16x32-bit halves, so no int64 product overflows.
        p_lo = c * (m & 0xFFFF)
        p_hi = c * (m >> 16)
        t = p_lo + ((p_hi & 0xFFFF) << 16)
        return (p_hi >> 16) + (t >> 32), t & _M32

    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _M32, (k1 + _PHILOX_W1) & _M32
        hi0, lo0 = mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0

    def minus_two_log_uniform(x):
        u = ((x >> 8) + 1).to(torch.float32) * k["U24"]
        bits = u.view(torch.int32).to(torch.int64)
        e = (bits >> 23) - 127
        m = ((bits & 0x007FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)
        big = m > k["SQRT2"]
        m = torch.where(big, m * k["HALF"], m)
        e = e + big.to(torch.int64)
        f = m - k["ONE"]
        s = f / (k["TWO"] + f)
        z = s * s
        rr = k["LG3"] + z * k["LG4"]
        rr = k["LG2"] + z * rr
        rr = k["LG1"] + z * rr
        rr = z * rr
        hfsq = (k["HALF"] * f) * f
        ef = e.to(torch.float32)
        ln_u = ef * k["LN2_HI"] - ((hfsq - (s * (hfsq + rr) + ef * k["LN2_LO"])) - f)
        return k["MINUS_TWO"] * ln_u

    def sincos_turns(x):
        kk = x >> 8
        q = (kk + (1 << 21)) >> 22
        a = (kk - (q << 22)).to(torch.float32) * k["ANGLE_UNIT"]
        z = a * a
        p = k["S3"] + z * k["S4"]
        p = k["S2"] + z * p
        p = k["S1"] + z * p
        p = z * p
        s = a + a * p
        c = k["C4"] + z * k["C5"]
        c = k["C3"] + z * c
        c = k["C2"] + z * c
        c = k["C1"] + z * c
        c = k["ONE"] + z * c
        q = q & 3
        sin = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
        cos = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
        return sin, cos

    def sqrt_rn(v):
        # torch's float32 sqrt on the CPU is not correctly rounded (about 0.7% of results are
        # 1 ulp off); the float64 square root rounded once to float32 is (double rounding is
        # innocuous for sqrt from 53 to 24 bits), on every device.
        return torch.sqrt(v.to(torch.float64)).to(torch.float32)

    r0 = sqrt_rn(minus_two_log_uniform(c0))
    s0, co0 = sincos_turns(c1)
    r1 = sqrt_rn(minus_two_log_uniform(c2))
    s1, co1 = sincos_turns(c3)
    z = torch.stack([r0 * co0, r0 * s0, r1 * co1, r1 * s1], dim=1).reshape(-1)
    start = offset - 4 * first
    z = z[start : start + n]
    return (z * float(np.float32(sigma))).reshape(shape)


def _cuda_kernels() -> bool:
    return _cuda.available()


def _cuda_gaussian(shape, seed, step, name, sigma, offset, device, dtype):
    """The noise kernel (cuda/noise.cu): one launch on torch's current stream, the output
    dtype written directly; bit-identical to the CPU path (tests/exact/test_noise.py)."""
    # Raw pointers cannot be traced: always eager.
    return _eager(_cuda_gaussian_eager, shape, seed, step, name, sigma, offset, device, dtype)


def _cuda_gaussian_eager(shape, seed, step, name, sigma, offset, device, dtype):
    import torch

    seed, step, offset = _u64(seed, "seed"), _u64(step, "step"), _u64(offset, "offset")
    out = torch.empty(shape, dtype=dtype, device=device)
    idx = out.get_device()
    if not _cuda._dtags:
        _cuda._init()
    _aqn_rs.cuda_noise(_cuda._dtags[dtype], idx, _cuda._raw_stream(idx), out.data_ptr(), out.numel(),
                       offset, seed, str(name), step, float(sigma))
    return out


def _is_torch_dtype(dtype: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(dtype, torch.dtype)


def gaussian_noise(
    shape: Any,
    seed: int,
    step: int,
    name: str,
    sigma: float = 1.0,
    *,
    dtype: Any = None,
    device: Any = None,
    offset: int = 0,
):
    """Deterministic N(0, sigma^2) noise for a weight of ``shape``, keyed by
    ``(seed, step, name)`` (docs/reference/NOISE.md).

    Args:
        shape: the tensor's shape (an int or a sequence of ints).
        seed: run seed, an integer in [0, 2**64).
        step: optimizer step, an integer in [0, 2**64).
        name: the module's qualified name (use the canonical name, see `canonical_name`).
        sigma: standard deviation; the value is ``z * float32(sigma)`` computed in float32.
        dtype: a torch dtype -> a torch tensor; None or a numpy dtype -> a numpy array (float32
            by default). The noise is generated in float32 and then cast (round to nearest even).
        device: a torch device (implies a torch tensor, float32 unless ``dtype`` says otherwise).
        offset: flat index of the first element in the full tensor: elements
            ``[offset, offset + prod(shape))`` of the full tensor's row-major noise. A shard of
            rows ``[r0, r1)`` of a ``[R, C]`` weight is ``gaussian_noise((r1 - r0, C), ...,
            offset=r0 * C)``.

    Returns:
        A torch tensor or numpy array of ``shape``.
    """
    shape = _shape_tuple(shape)
    if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if _is_torch_dtype(dtype) or device is not None:
        import torch

        dev = torch.device("cpu") if device is None else torch.device(device)
        out_dtype = torch.float32 if dtype is None else dtype
        if not _is_torch_dtype(out_dtype):
            raise TypeError(f"with a device, dtype must be a torch dtype, got {dtype!r}")
        if dev.type == "cpu":
            t = torch.empty(shape, dtype=torch.float32)
            _aqn_rs.noise_fill_f32(t.numpy(), seed, step, name, float(sigma), offset)
        elif dev.type == "cuda" and out_dtype in (torch.float32, torch.bfloat16, torch.float16) and _cuda_kernels():
            return _cuda_gaussian(shape, seed, step, name, sigma, offset, dev, out_dtype)
        else:
            t = _reference_gaussian(shape, seed, step, name, sigma, offset, dev)
        return t if out_dtype == torch.float32 else t.to(out_dtype)
    np_dtype = np.dtype(np.float32 if dtype is None else dtype)
    if np_dtype.kind != "f":
        raise TypeError(f"dtype must be a floating dtype, got {np_dtype}")
    a = np.empty(shape, dtype=np.float32)
    _aqn_rs.noise_fill_f32(a, seed, step, name, float(sigma), offset)
    return a if np_dtype == np.float32 else a.astype(np_dtype)


