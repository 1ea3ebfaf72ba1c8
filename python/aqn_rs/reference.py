"""Pure-torch reference for MXFP4 and NVFP4: the ground truth the tests compare against.

Every function here is written directly from the rules in ``docs/reference/FORMATS.md`` (the
formats' contract), not from the Rust core or the CUDA kernels, so that a bit-exact match
between this module and the fast paths is evidence that both follow the contract. Section
names in the comments (``FORMATS.md §E4M3`` ...) point at the rule used.

Conventions (FORMATS.md, "Notation"):

* All arithmetic is IEEE-754 binary32 with round-to-nearest-even. torch's CPU elementwise ops
  are separate kernels (no fused multiply-add across ops), so writing each step as one torch op
  gives exactly the f32 rounding the contract prescribes. bf16/f16 inputs are widened to f32
  first (exact).
* Bit-level quantities (exponent fields, E8M0 powers of two, E4M3 bytes) are computed from the
  integer bit patterns, never through ``log2``/``pow``, which are not exact.
* Blocks run along the last dimension; a row's last block may be short (its amax is over its
  real elements only); blocks never cross rows.

Only ``torch`` and ``math`` are imported: this module must stay importable without the
compiled extension. It favours clarity over speed but is fully vectorised (a 4096x4096 tensor
takes a few seconds on a small CPU).
"""

from __future__ import annotations

import math

import torch

from .constants import E2M1_MAX, MXFP4_BLOCK, NVFP4_BLOCK, SCALE_MODES

__all__ = [
    "E2M1_VALUES",
    "MX_BLOCK",
    "NV_BLOCK",
    "SCALE_MODES",
    "e2m1_decode",
    "e2m1_encode",
    "e4m3_decode",
    "e4m3_encode",
    "e8m0_decode",
    "mxfp4_dequantize",
    "mxfp4_fake_quant",
    "mxfp4_quantize",
    "nvfp4_dequantize",
    "nvfp4_fake_quant",
    "nvfp4_global_scale",
    "nvfp4_quantize",
    "pack_nibbles",
    "unpack_nibbles",
]

# FORMATS.md §Tensor layout: block sizes.
MX_BLOCK = MXFP4_BLOCK
NV_BLOCK = NVFP4_BLOCK

# FORMATS.md §E2M1: magnitudes by index 0..7; code = sign << 3 | index.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
F4_E2M1_MAX = E2M1_MAX
F4_E2M1_MAX_POW2 = 2  # 6 = 1.5 * 2**2: the largest power of two below the E2M1 max

# FORMATS.md §E4M3: float8_e4m3fn.
E4M3_MAX = 448.0
E4M3_MAX_BYTE = 0x7E  # 448
E4M3_NAN_BYTE = 0x7F
# FORMATS.md §NVFP4 step 3: a zero block scale becomes 0.125 (compressed-tensors' eps).
NV_ZERO_SCALE_BYTE = 0x20  # E4M3 0.125
NV_GLOBAL_NUMERATOR = 2688.0  # 448 * 6 (E4M3 max times E2M1 max)

# FORMATS.md §E8M0.
E8M0_BIAS = 127
E8M0_NAN_BYTE = 0xFF


F32_TINY = 2.0**-126  # smallest normal f32 (torch.finfo(torch.float32).tiny)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# f32 bit helpers
# ---------------------------------------------------------------------------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The u32 pattern of an f32 tensor, held in int64 (so shifts and masks are unsigned)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """f32 tensor from u32 patterns held in any integer tensor."""
    b = b.to(torch.int64) & 0xFFFFFFFF
    # reinterpret the low 32 bits as a signed int32, then view as f32
    b = torch.where(b >= 2**31, b - 2**32, b)
    return b.to(torch.int32).view(torch.float32)


def _exp_field(x: torch.Tensor) -> torch.Tensor:
    """E(x) = ((bits(x) >> 23) & 0xFF) - 127, the raw unbiased exponent field (int64)."""
    return ((_bits(x) >> 23) & 0xFF) - 127


def _mantissa(x: torch.Tensor) -> torch.Tensor:
    """The 23-bit mantissa field of an f32 tensor (int64)."""
    return _bits(x) & 0x7FFFFF


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact f32 ``2**k`` for integer ``k`` in [-149, 127] (subnormals included), from bits."""
    k = k.to(torch.int64)
    normal = _from_bits((k.clamp(-126, 127) + 127) << 23)
    subnormal = _from_bits(torch.ones_like(k) << (k.clamp(-149, -127) + 149))
    return torch.where(k >= -126, normal, subnormal)


def _signbit(x: torch.Tensor) -> torch.Tensor:
    """Sign bit of an f32 tensor (bool), so that -0.0 counts as negative."""
    return torch.signbit(x)


# ---------------------------------------------------------------------------------------------
# Element and scale codecs
# ---------------------------------------------------------------------------------------------


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Encode finite f32 values to E2M1 codes (FORMATS.md §E2M1).

    Round-half-to-even on the magnitude grid {0, .5, 1, 1.5, 2, 3, 4, 6} with saturation at 6
    (+Inf gives 6); the sign bit of the input is kept even when the magnitude rounds to zero,
    so ``-0.0`` and tiny negatives give code 0x8.

    Args:
        y: f32 tensor (NaN gives an unspecified code; callers mask non-finite blocks).

    Returns:
        uint8 tensor of codes 0..15, same shape as ``y``.
    """
    y = y.to(torch.float32)
    a = y.abs()
    # The table in FORMATS.md §E2M1: strict/loose inequalities alternate because a tie goes to
    # the even neighbour (index 0, 2, 4, 6 are the even mantissas).
    index = (a > 0.25).to(torch.uint8)
    index += a >= 0.75
    index += a > 1.25
    index += a >= 1.75
    index += a > 2.5
    index += a >= 3.5
    index += a > 5.0
    index |= _signbit(y).to(torch.uint8) << 3
    return index


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Decode E2M1 codes (low 4 bits of a uint8 tensor) to f32, exactly (0x8 gives -0.0).

    Args:
        codes: uint8 tensor of codes 0..15.

    Returns:
        f32 tensor of the same shape.
    """
    table = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES], dtype=torch.float32, device=codes.device)
    return table[(codes & 0xF).to(torch.int64)]


def e4m3_encode(v: torch.Tensor) -> torch.Tensor:
    """Encode f32 values to float8_e4m3fn bytes (FORMATS.md §E4M3).

    Round-half-to-even, saturating at 448 (also for +-Inf), NaN -> 0x7F, subnormals down to
    2**-9. Computed from the exponent/mantissa fields, not with torch's fp8 cast.

    Args:
        v: f32 tensor.

    Returns:
        uint8 tensor of E4M3 bytes, same shape.
    """
    v = v.to(torch.float32)
    a = v.abs()
    sign = _signbit(v).to(torch.int64) << 7

    # |v| < 2**-6: subnormal range of E4M3; a * 2**9 is exact (a power-of-two scaling of a
    # value below 8), torch.round is round-half-to-even. n == 8 is 2**-6, code 8.
    n_sub = torch.round(a * 512.0).to(torch.int64)

    # normal range: E = floor(log2 a) from the exponent bits (a >= 2**-6 is a normal f32),
    # m = a / 2**E in [1, 2) (exact), n = RNE((m - 1) * 8) (m - 1 and * 8 are exact).
    big_e = _exp_field(a).clamp(-6, 8)
    m = a / _pow2(big_e)
    n_norm = torch.round((m - 1.0) * 8.0).to(torch.int64)
    code_norm = ((big_e + 7) << 3) + n_norm  # n == 8 carries into the exponent by itself

    mag = torch.where(a < 2.0**-6, n_sub, code_norm)
    mag = torch.where(a >= E4M3_MAX, torch.full_like(mag, E4M3_MAX_BYTE), mag)
    out = sign | mag
    out = torch.where(torch.isnan(v), torch.full_like(out, E4M3_NAN_BYTE), out)
    return out.to(torch.uint8)


def e4m3_decode(b: torch.Tensor) -> torch.Tensor:
    """Decode float8_e4m3fn bytes to f32, exactly (0x7F/0xFF are NaN).

    Args:
        b: uint8 tensor.

    Returns:
        f32 tensor, same shape.
    """
    b = b.to(torch.int64)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    sub = man.to(torch.float32) * 2.0**-9
    norm = (1.0 + man.to(torch.float32) / 8.0) * _pow2(exp - 7)
    mag = torch.where(exp == 0, sub, norm)
    mag = torch.where((b & 0x7F) == 0x7F, torch.full_like(mag, float("nan")), mag)
    return torch.where((b & 0x80) != 0, -mag, mag)


def e8m0_decode(b: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 bytes to f32: ``2**(b - 127)`` exactly (0 gives the subnormal 2**-127),
    0xFF is NaN (FORMATS.md §E8M0).

    Args:
        b: uint8 tensor.

    Returns:
        f32 tensor, same shape.
    """
    b = b.to(torch.int64)
    out = _pow2(b - E8M0_BIAS)
    return torch.where(b == E8M0_NAN_BYTE, torch.full_like(out, float("nan")), out)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dimension (FORMATS.md §Tensor layout).

    Element ``2i`` goes to the low nibble of byte ``i``, element ``2i+1`` to the high nibble;
    an odd length leaves the last byte's high nibble 0.

    Args:
        codes: uint8 tensor ``[..., K]`` of values 0..15.

    Returns:
        uint8 tensor ``[..., ceil(K/2)]``.
    """
    codes = codes.to(torch.uint8) & 0xF
    k = codes.shape[-1]
    if k % 2:
        pad = torch.zeros((*codes.shape[:-1], 1), dtype=torch.uint8, device=codes.device)
        codes = torch.cat([codes, pad], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`.

    Args:
        packed: uint8 tensor ``[..., ceil(k/2)]``.
        k: number of codes per row.

    Returns:
        uint8 tensor ``[..., k]`` of codes 0..15.
    """
    packed = packed.to(torch.uint8)
    both = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return both.reshape(*packed.shape[:-1], packed.shape[-1] * 2)[..., :k]


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("a 0-d tensor has no last dimension to block along")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected float32, bfloat16 or float16, got {x.dtype}")


def _to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """View ``x [..., K]`` as f32 blocks ``[R, n_blocks, block]`` with a zero-padded tail."""
    k = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    n_blocks = -(-k // block)
    xf = x.detach().to(torch.float32).reshape(rows, k)
    pad = n_blocks * block - k
    if pad:
        # zero padding does not change a block's amax (amax >= 0) and is dropped afterwards
        xf = torch.cat([xf, torch.zeros((rows, pad), dtype=torch.float32, device=xf.device)], dim=-1)
    return xf.reshape(rows, n_blocks, block)


def _decoded_blocks(codes: torch.Tensor, shape: tuple[int, ...], block: int) -> torch.Tensor:
    """Packed codes of a tensor of ``shape`` decoded to f32 blocks ``[R, n_blocks, block]``
    (the layout :func:`_to_blocks` gives the input)."""
    rows = math.prod(shape[:-1])
    vals = e2m1_decode(unpack_nibbles(codes.reshape(rows, codes.shape[-1]), shape[-1]))
    return _to_blocks(vals.reshape(shape), block)


def _from_blocks(y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_to_blocks` for a per-element result ``[R, n_blocks, block]``."""
    k = shape[-1]
    rows, n_blocks, block = y.shape
    return y.reshape(rows, n_blocks * block)[:, :k].reshape(shape)


def _block_stats(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax (f32) and a mask of blocks holding NaN or Inf.

    ``amax`` propagates NaN (torch.amax does) and Inf, so a block is non-finite exactly when
    its amax is; the amax of such a block is meaningless and every result derived from it is
    masked out by the callers.
    """
    amax = xb.abs().amax(dim=-1)
    return amax, ~torch.isfinite(amax)


def _check_shape(shape, codes: torch.Tensor, scales: torch.Tensor, block: int) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("a 0-d shape has no last dimension to block along")
    k = shape[-1]
    want_codes = (*shape[:-1], -(-k // 2))
    want_scales = (*shape[:-1], -(-k // block))
    if tuple(codes.shape) != want_codes or tuple(scales.shape) != want_scales:
        raise ValueError(
            f"codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not match shape "
            f"{shape}: expected {want_codes} / {want_scales}"
        )
    return shape


# ---------------------------------------------------------------------------------------------
# MXFP4 (FORMATS.md §MXFP4)
# ---------------------------------------------------------------------------------------------


def _ceil_log2_exact(d: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(d))`` for finite f32 ``d >= 0`` from its bits; -127 for ``d == 0``.

    Normal ``d``: ``E(d) + (mantissa != 0)``. Subnormal ``d = m * 2**-149`` (1 <= m < 2**23):
    ``ceil(log2 m) - 149`` where ``ceil(log2 m) = bit_length(m - 1)``, read off the exponent of
    the exactly representable f32 ``m - 1``.
    """
    e_field = _exp_field(d)
    man = _mantissa(d)
    normal = e_field + (man != 0).to(torch.int64)
    m_minus_1 = (man - 1).clamp(min=0)
    bit_len = torch.where(
        m_minus_1 > 0,
        _exp_field(m_minus_1.to(torch.float32)) + 1,
        torch.zeros_like(m_minus_1),
    )
    subnormal = bit_len - 149
    out = torch.where(e_field > -127, normal, subnormal)
    return torch.where(d == 0, torch.full_like(out, -127), out)


def _mx_exponent(amax: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """Unbiased block exponent ``e`` in [-127, 127] by scale mode (FORMATS.md §MXFP4 table)."""
    if scale_mode == "floor":
        e = _exp_field(amax) - F4_E2M1_MAX_POW2
    elif scale_mode == "ceil":
        e = _exp_field(amax) + (_mantissa(amax) != 0).to(torch.int64) - F4_E2M1_MAX_POW2
    elif scale_mode == "even":
        # round the mantissa to 1 bit (E2M1 has one) before taking the exponent: add half an
        # ulp of a 1-bit mantissa (1 << 21) and drop the mantissa
        rounded = (_bits(amax) + (1 << 21)) & 0xFF800000
        e = ((rounded >> 23) & 0xFF) - 127 - F4_E2M1_MAX_POW2
    elif scale_mode == "rceil":
        d = amax / F4_E2M1_MAX  # f32 division, as cuBLAS/TE divide by the element max
        e = _ceil_log2_exact(d)
    else:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def mxfp4_quantize(
    x: torch.Tensor, scale_mode: str = "floor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to MXFP4 (block 32, E8M0 scales) along the last dimension.

    Args:
        x: f32/bf16/f16 tensor ``[..., K]`` (K >= 0, any leading shape, >= 1 dim).
        scale_mode: ``"floor"`` (OCP spec, default), ``"rceil"``, ``"even"`` or ``"ceil"``.

    Returns:
        ``(codes, scales)``: uint8 ``[..., ceil(K/2)]`` packed E2M1 codes and uint8
        ``[..., ceil(K/32)]`` E8M0 bytes (0xFF for a block holding NaN or Inf, whose codes are 0).
    """
    _check_input(x)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    shape = tuple(x.shape)
    xb = _to_blocks(x, MX_BLOCK)
    amax, nonfinite = _block_stats(xb)
    e = _mx_exponent(amax, scale_mode)
    # x * 2**-e: exact when the product is normal, otherwise one RNE rounding, the same as
    # x / 2**e (FORMATS.md §MXFP4, "Element code").
    y = xb * _pow2(-e).unsqueeze(-1)
    codes = e2m1_encode(y)
    codes = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(codes), codes)
    scales = (e + E8M0_BIAS).to(torch.uint8)
    scales = torch.where(nonfinite, torch.full_like(scales, E8M0_NAN_BYTE), scales)
    codes = pack_nibbles(_from_blocks(codes, shape))
    return codes, scales.reshape(*shape[:-1], scales.shape[-1])


def mxfp4_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, shape, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize MXFP4 codes and E8M0 scales: ``decode(code) * 2**e`` in f32, then RNE to
    ``dtype``; a 0xFF block is all NaN.

    Args:
        codes: uint8 ``[..., ceil(K/2)]`` packed codes.
        scales: uint8 ``[..., ceil(K/32)]`` E8M0 bytes.
        shape: the original shape ``[..., K]``.
        dtype: output dtype (f32, bf16 or f16).

    Returns:
        Tensor of ``shape`` and ``dtype``.
    """
    shape = _check_shape(shape, codes, scales, MX_BLOCK)
    vals = _decoded_blocks(codes, shape, MX_BLOCK)
    s = e8m0_decode(scales.reshape(vals.shape[:2])).unsqueeze(-1)
    out = vals * s  # NaN scale -> NaN block
    return _from_blocks(out, shape).to(dtype)


def mxfp4_fake_quant(x: torch.Tensor, scale_mode: str = "floor") -> torch.Tensor:
    """MXFP4 quantize then dequantize; the output has ``x``'s shape and dtype.

    Args:
        x: f32/bf16/f16 tensor ``[..., K]``.
        scale_mode: see :func:`mxfp4_quantize`.

    Returns:
        Tensor like ``x``.
    """
    codes, scales = mxfp4_quantize(x, scale_mode)
    return mxfp4_dequantize(codes, scales, x.shape, x.dtype)


# ---------------------------------------------------------------------------------------------
# NVFP4 (FORMATS.md §NVFP4)
# ---------------------------------------------------------------------------------------------


def nvfp4_global_scale(amax) -> torch.Tensor:
    """NVFP4 encode-direction global scale from a tensor amax (FORMATS.md §NVFP4 step 2).

    ``gs = (1 / max(A, 2**-126)) * 2688`` (reciprocal first, then multiply: that is how
    compressed-tensors' ``2688 / amax`` evaluates in torch); 1 when ``A`` is NaN or the result is
    not a finite positive number.

    Args:
        amax: float or tensor with one element, >= 0 or NaN/Inf.

    Returns:
        0-d f32 tensor.
    """
    a = torch.as_tensor(amax, dtype=torch.float32).detach().reshape(())
    if bool(a < 0):
        raise ValueError(f"amax must be >= 0 (or NaN/Inf), got {float(a)}")
    clamped = torch.maximum(a, torch.tensor(F32_TINY, dtype=torch.float32, device=a.device))
    g = torch.reciprocal(clamped) * NV_GLOBAL_NUMERATOR
    ok = torch.isfinite(g) & (g > 0) & ~torch.isnan(a)
    return torch.where(ok, g, torch.ones_like(g))


def nvfp4_quantize(
    x: torch.Tensor, amax=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize to NVFP4 (block 16, E4M3 block scales, f32 global scale).

    Args:
        x: f32/bf16/f16 tensor ``[..., K]``.
        amax: optional precomputed tensor amax (float or one-element tensor); by default
            ``max |x|`` over the whole tensor (NaN if any element is NaN, 0 if empty).

    Returns:
        ``(codes, scales, global_scale)``: uint8 ``[..., ceil(K/2)]`` packed E2M1 codes,
        uint8 ``[..., ceil(K/16)]`` E4M3 bytes (0x7F for a block holding NaN or Inf, whose
        codes are 0), and the 0-d f32 encode-direction global scale.
    """
    _check_input(x)
    shape = tuple(x.shape)
    if amax is None:
        xf = x.detach().to(torch.float32)
        amax_t = xf.abs().amax() if xf.numel() else torch.zeros((), device=xf.device)  # NaN propagates
    else:
        amax_t = torch.as_tensor(amax, dtype=torch.float32)
        if amax_t.numel() != 1:
            raise ValueError(f"amax must have one element, got shape {tuple(amax_t.shape)}")
    gs = nvfp4_global_scale(amax_t)

    xb = _to_blocks(x, NV_BLOCK)
    b, nonfinite = _block_stats(xb)
    s = e4m3_encode(gs * (b / F4_E2M1_MAX))
    s = torch.where(s == 0, torch.full_like(s, NV_ZERO_SCALE_BYTE), s)
    d = e4m3_decode(s) / gs  # decode-direction block scale, IEEE f32 division
    y = torch.clamp(xb / d.unsqueeze(-1), -F4_E2M1_MAX, F4_E2M1_MAX)
    codes = e2m1_encode(y)
    codes = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(codes), codes)
    s = torch.where(nonfinite, torch.full_like(s, E4M3_NAN_BYTE), s)
    codes = pack_nibbles(_from_blocks(codes, shape))
    return codes, s.reshape(*shape[:-1], s.shape[-1]), gs


def nvfp4_dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale,
    shape,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize NVFP4: ``decode(code) * (f32(s) / gs)`` in f32, then RNE to ``dtype``; a
    0x7F block is all NaN.

    Args:
        codes: uint8 ``[..., ceil(K/2)]`` packed codes.
        scales: uint8 ``[..., ceil(K/16)]`` E4M3 bytes.
        global_scale: the encode-direction global scale returned by :func:`nvfp4_quantize`.
        shape: the original shape ``[..., K]``.
        dtype: output dtype (f32, bf16 or f16).

    Returns:
        Tensor of ``shape`` and ``dtype``.
    """
    shape = _check_shape(shape, codes, scales, NV_BLOCK)
    gs = torch.as_tensor(global_scale, dtype=torch.float32).reshape(())
    vals = _decoded_blocks(codes, shape, NV_BLOCK)
    d = e4m3_decode(scales.reshape(vals.shape[:2])) / gs  # NaN byte -> NaN block
    out = vals * d.unsqueeze(-1)
    return _from_blocks(out, shape).to(dtype)


def nvfp4_fake_quant(x: torch.Tensor, amax=None) -> torch.Tensor:
    """NVFP4 quantize then dequantize; the output has ``x``'s shape and dtype.

    Args:
        x: f32/bf16/f16 tensor ``[..., K]``.
        amax: optional precomputed tensor amax, see :func:`nvfp4_quantize`.

    Returns:
        Tensor like ``x``.
    """
    codes, scales, gs = nvfp4_quantize(x, amax)
    return nvfp4_dequantize(codes, scales, gs, x.shape, x.dtype)
