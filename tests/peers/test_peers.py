"""The reference (and so docs/reference/FORMATS.md) against the real peer packages.

* MXFP4: torchao 0.18 ``to_mx`` / ``to_dtype`` in all four scale modes: identical packed codes,
  E8M0 bytes and dequantized bits, on f32 and bf16 inputs with K a multiple of 32 and every
  block amax >= 2**-100 (torchao clamps its divisor at 2**-126 below that: FORMATS.md §MXFP4,
  "Peer differences"). The documented differences are pinned by their own tests.
* NVFP4: compressed-tensors' own arithmetic (``generate_gparam``, ``calculate_qparams``,
  ``quantize``, ``dequantize``) for the NVFP4 W4A16 args: 0 mismatches in codes, block scales,
  global scale and dequantized bits on f32 inputs. On bf16 inputs compressed-tensors does part
  of the scale math in bf16; the mismatch rate is measured, printed and bounded.
* NVFP4 rule variants of other peers, evaluated in IEEE f32 on the CPU: TE's IEEE-quotient
  global scale (alone, and with TE's full scale arithmetic) and ModelOpt's decode-direction
  scales. Rates are printed and bounded; docs/results/PEERS.md records them.

Run with ``-s`` to see the measured rates.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from helpers import (  # noqa: E402  (tests/ is on sys.path: pyproject's pytest pythonpath)
    gaussian,
    laplace,
    mixed_blocks,
    student_t,
    tie_rows,
)


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bits_equal(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    diff = (_bits(a) != _bits(b)) & ~nan_a
    if diff.any():
        i = diff.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(diff.sum())} elements differ, first at {i}: {a[tuple(i)].item()!r} "
            f"vs {b[tuple(i)].item()!r}"
        )


# ---------------------------------------------------------------------------------------------
# E4M3 / E8M0 codecs against torch's own float8 types
# ---------------------------------------------------------------------------------------------


def test_e4m3_encode_matches_torch_cast(ref):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-14, 12, (200_000,), generator=g))
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    v = torch.cat([v, grid, ref_neighbours(grid), torch.tensor([464.0, 465.0, 1e30, -1e30])])
    ours = ref.e4m3_encode(v)
    # torch's eager cast does not saturate finite overflow (FORMATS.md: we saturate at 448)
    theirs = v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ours, theirs)
    assert ref.e4m3_encode(torch.tensor([math.nan, math.inf, -math.inf])).tolist() == [
        0x7F,
        0x7E,
        0xFE,
    ]


def ref_neighbours(t):
    """f32 neighbours and midpoints of grid values (rounding-boundary probes)."""
    up = torch.nextafter(t, torch.full_like(t, math.inf))
    down = torch.nextafter(t, torch.full_like(t, -math.inf))
    srt = torch.sort(t.unique()).values
    mids = (srt[1:] + srt[:-1]) / 2
    mids_up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    mids_down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    return torch.cat([up, down, mids, mids_up, mids_down])


def test_e4m3_e8m0_decode_match_torch(ref):
    b = torch.arange(256, dtype=torch.uint8)
    ours = ref.e4m3_decode(b)
    theirs = b.view(torch.float8_e4m3fn).float()
    _assert_bits_equal(ours, theirs, "e4m3 decode")
    ours8 = ref.e8m0_decode(b)
    theirs8 = b.view(torch.float8_e8m0fnu).float()
    _assert_bits_equal(ours8, theirs8, "e8m0 decode")


# ---------------------------------------------------------------------------------------------
# MXFP4 vs torchao
# ---------------------------------------------------------------------------------------------

MODES = ("floor", "rceil", "even", "ceil")


def _torchao():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    cfg = pytest.importorskip("torchao.prototype.mx_formats.config")
    return mx, cfg.ScaleCalculationMode


def _torchao_mx(x, mode):
    mx, scm = _torchao()
    scale, data = mx.to_mx(x, torch.float4_e2m1fn_x2, 32, getattr(scm, mode.upper()))
    codes = data.view(torch.uint8)
    deq = mx.to_dtype(codes, scale, torch.float4_e2m1fn_x2, 32, x.dtype)
    return codes, scale.view(torch.uint8), deq


def _mx_inputs():
    g = torch.Generator().manual_seed(2)
    shape = (64, 512)
    # block magnitudes 2**-90 .. 2**90 keep every block amax >= 2**-100 (torchao's range)
    yield "mixed_blocks", mixed_blocks(shape, g, block=32, lo_pow2=-90, hi_pow2=90)
    yield "gaussian", gaussian(shape, g)
    yield "student_t3", student_t(shape, g) * 1e3
    yield "laplace", laplace(shape, g) * 1e-3
    yield "ties", tie_rows(32)
    # a row of zero blocks and a row of -0.0 (amax 0: e = -127 everywhere; codes are 0 / 8)
    yield "zeros", torch.stack([torch.zeros(64), -torch.zeros(64)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_mxfp4_matches_torchao(ref, mode, dtype):
    _torchao()
    for name, x in _mx_inputs():
        x = x.to(dtype)
        codes, scales, deq = _torchao_mx(x, mode)
        our_codes, our_scales = ref.mxfp4_quantize(x, mode)
        assert torch.equal(our_codes, codes), f"{name}: codes differ"
        assert torch.equal(our_scales, scales), f"{name}: scales differ"
        _assert_bits_equal(ref.mxfp4_fake_quant(x, mode), deq, f"{name}: dequant")
        _assert_bits_equal(
            ref.mxfp4_dequantize(our_codes, our_scales, x.shape, dtype), deq, f"{name}: deq2"
        )


def test_mxfp4_documented_torchao_differences(ref):
    """The differences FORMATS.md documents, pinned so a torchao change is noticed."""
    # 1. rceil: torchao's eager log2 rounds ceil(log2(d)) down when d = amax/6 lies a few
    #    ulps above a power of two; we use the exact value (as cvt.rp...ue8m0 does).
    amax = torch.nextafter(torch.tensor(6.0 * 2.0**20), torch.tensor(math.inf))
    d = amax / 6
    assert d > 2.0**20  # d is just above 2**20, so ceil(log2(d)) = 21
    x = torch.cat([amax.reshape(1), torch.zeros(31)]).reshape(1, 32)
    _, scales, _ = _torchao_mx(x, "rceil")
    _, our_scales = ref.mxfp4_quantize(x, "rceil")
    assert our_scales.item() == 127 + 21
    assert scales.item() == 127 + 20  # torchao's quirk (documented)

    # 2. an Inf block: torchao keeps a finite scale, we write 0xFF (all-NaN block)
    x = torch.cat([torch.tensor([math.inf]), torch.ones(31)]).reshape(1, 32)
    _, scales, _ = _torchao_mx(x, "floor")
    _, our_scales = ref.mxfp4_quantize(x, "floor")
    assert our_scales.item() == 0xFF and scales.item() != 0xFF

    # 3. tiny blocks (amax < ~2**-124): torchao divides by max(2**e, 2**-126)
    x = (torch.tensor([1.5, 1.0, 0.5, 0.75] * 8) * 2.0**-125).reshape(1, 32)
    codes, scales, _ = _torchao_mx(x, "floor")
    our_codes, our_scales = ref.mxfp4_quantize(x, "floor")
    assert torch.equal(our_scales, scales)  # same E8M0 byte (e = -127)...
    assert not torch.equal(our_codes, codes)  # ...but torchao's elements are scaled by 2**126


# ---------------------------------------------------------------------------------------------
# NVFP4 vs compressed-tensors
# ---------------------------------------------------------------------------------------------


def _ct():
    ct_args = pytest.importorskip("compressed_tensors.quantization")
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    fwd = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    args = ct_args.QuantizationArgs(
        num_bits=4,
        type=ct_args.QuantizationType.FLOAT,
        strategy=ct_args.QuantizationStrategy.TENSOR_GROUP,
        symmetric=True,
        dynamic=False,
        group_size=16,
        scale_dtype=torch.float8_e4m3fn,
        zp_dtype=torch.float8_e4m3fn,
    )
    return helpers, fwd, args


def ct_nvfp4(x, amax=None, gs_from_f32_amax=False):
    """compressed-tensors' NVFP4 W4A16 weight arithmetic on a 2-d tensor, the way
    llm-compressor calls it for a weight (min/max observers in the weight's dtype).

    Returns (global_scale f32 [1], block scales f32 holding E4M3 values [R, K/16],
    E2M1 values [R, K] in x.dtype, dequantized tensor in x.dtype).
    """
    helpers, fwd, args = _ct()
    rows, k = x.shape
    xb = x.reshape(rows, k // 16, 16)
    if amax is not None:
        a = torch.tensor(amax, dtype=x.dtype)
        gs = helpers.generate_gparam(-a, a)
    elif gs_from_f32_amax:
        a = x.float().abs().amax()
        gs = helpers.generate_gparam(-a, a)
    else:
        gs = helpers.generate_gparam(x.min(), x.max())
    scale, zp = helpers.calculate_qparams(xb.amin(-1), xb.amax(-1), args, global_scale=gs)
    q = fwd.quantize(x, scale, zp, args, global_scale=gs)
    dq = fwd.dequantize(q, scale, zp, args, global_scale=gs, dtype=x.dtype)
    return gs, scale, q, dq


def _nv_inputs(seed, rows=256, k=1024):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, k)
    for mag in (1e-3, 1.0, 1e3):
        yield f"gaussian*{mag:g}", gaussian(shape, g) * mag
        yield f"student_t3*{mag:g}", student_t(shape, g) * mag
        yield f"laplace*{mag:g}", laplace(shape, g) * mag
    yield "mixed_blocks", mixed_blocks(shape, g, block=16, lo_pow2=-12, hi_pow2=12)
    yield "ties", tie_rows(32)


def _our_e2m1_values(ref, codes, k):
    return ref.e2m1_decode(ref.unpack_nibbles(codes, k))


def _nv_compare(ref, x, amax=None, **kw):
    """Mismatch counts (codes, scales, global scale, dequant) of the reference vs ct."""
    gs, scale, q, dq = ct_nvfp4(x, amax=amax, **kw)
    codes, scales, our_gs = ref.nvfp4_quantize(x, amax)
    ours_q = _our_e2m1_values(ref, codes, x.shape[-1])
    # ct's E2M1 cast takes sign(x), so it loses the sign of zero: compare values (0 == -0)
    code_mm = int((ours_q != q.float()).sum())
    ct_scale_bytes = scale.to(torch.float8_e4m3fn).view(torch.uint8)
    scale_mm = int((ct_scale_bytes != scales).sum())
    gs_mm = int(_bits(gs.float().reshape(())) != _bits(our_gs))
    ours_dq = ref.nvfp4_dequantize(codes, scales, our_gs, x.shape, x.dtype)
    dq_mm = int(((_bits(ours_dq) != _bits(dq)) & ~(torch.isnan(dq) & torch.isnan(ours_dq))).sum())
    return code_mm, scale_mm, gs_mm, dq_mm, x.numel(), scales.numel()


def test_nvfp4_matches_compressed_tensors_f32(ref):
    _ct()
    for name, x in _nv_inputs(seed=3):
        code_mm, scale_mm, gs_mm, dq_mm, _, _ = _nv_compare(ref, x)
        assert (code_mm, scale_mm, gs_mm, dq_mm) == (0, 0, 0, 0), name
    # a caller-given amax, including one smaller than the data (ct clamps to [-6, 6] too)
    x = gaussian((64, 256), torch.Generator().manual_seed(4))
    for amax in (float(x.abs().max()), 10.0, 0.5, 1e-3):
        assert _nv_compare(ref, x, amax=amax)[:4] == (0, 0, 0, 0), amax


def test_nvfp4_global_scale_matches_generate_gparam(ref):
    """``(1 / max(A, tiny)) * 2688`` is what compressed-tensors' ``2688 / A`` evaluates to in
    torch; it differs from the IEEE quotient by 1 ulp for a sizeable share of amaxes, which
    this test also checks (so the rule is really exercised, not vacuously matched)."""
    helpers, _, _ = _ct()
    g = torch.Generator().manual_seed(7)
    amax = torch.exp(torch.rand(3000, generator=g) * 120 - 60)  # log-uniform e**-60 .. e**60
    specials = torch.tensor([0.0, 2.0**-149, 2.0**-126, 1e-38, 3.4e38, math.nan])
    amax = torch.cat([amax, specials])
    theirs = torch.cat([helpers.generate_gparam(-a, a) for a in amax])
    ours = torch.stack([ref.nvfp4_global_scale(float(a)) for a in amax])
    _assert_bits_equal(ours, theirs, "global scale")
    # A = +Inf: 2688 / inf = 0, which compressed-tensors' nan_to_num keeps (gs = 0, and its
    # block scales then become 0 -> eps); FORMATS.md replaces every non-positive gs by 1.
    inf = torch.tensor(math.inf)
    assert float(helpers.generate_gparam(-inf, inf)) == 0.0
    assert float(ref.nvfp4_global_scale(math.inf)) == 1.0
    ieee = torch.tensor(2688.0) / amax[:3000]
    n_diff = int((_bits(ieee) != _bits(ours[:3000])).sum())
    print(f"\nglobal scale: reciprocal-then-multiply != IEEE quotient for {n_diff}/3000 amaxes")
    assert n_diff > 0


@pytest.mark.parametrize("gs_from_f32_amax", [False, True], ids=["ct-bf16-gs", "f32-gs"])
def test_nvfp4_bf16_mismatch_rate_vs_compressed_tensors(ref, gs_from_f32_amax):
    """compressed-tensors computes ``amax_b / 6`` (and, from bf16 observers, ``2688 / amax``)
    in bf16; we stay in f32 (FORMATS.md, NVFP4). Bound: a relative perturbation |delta| <= 2**-8 of the
    pre-rounding E4M3 scale (bf16 gs: 2**-9, bf16 b/6: 2**-9) changes the rounded scale only
    within |delta| (in log2 terms |delta|/ln 2) of one of the 8 rounding boundaries per binade,
    so for spread-out block amaxes at most 8 * 2**-8 / ln 2 = 4.5% of block scales move; a
    moved scale (one E4M3 step, 6-12%) moves a fraction of its block's codes, and a moved gs
    moves codes within 2**-9 of an E2M1 boundary. Asserted: scales < 5%, codes < 3%."""
    _ct()
    tot = [0] * 6
    for _, x in _nv_inputs(seed=5, rows=128):
        if x.shape[-1] % 16:
            continue
        r = _nv_compare(ref, x.to(torch.bfloat16), gs_from_f32_amax=gs_from_f32_amax)
        tot = [a + b for a, b in zip(tot, r)]
    code_mm, scale_mm, gs_mm, dq_mm, n, nb = tot
    print(
        f"\nNVFP4 bf16 vs compressed-tensors ({'gs from f32 amax' if gs_from_f32_amax else 'ct bf16 gs'}):"
        f" codes {code_mm}/{n} = {code_mm / n:.3%}, block scales {scale_mm}/{nb} = "
        f"{scale_mm / nb:.3%}, global scales differing {gs_mm}, dequant bits {dq_mm / n:.2%}"
    )
    assert code_mm / n < 0.03
    assert scale_mm / nb < 0.05


# ---------------------------------------------------------------------------------------------
# NVFP4 rule variants of other peers (IEEE f32 on the CPU)
# ---------------------------------------------------------------------------------------------


def _variant_ieee_gs(ref, x):
    """Our rule with TE's IEEE-quotient global scale ``gs = 2688 / A``."""
    a = x.abs().amax()
    gs = torch.tensor(2688.0) / a
    rows, k = x.shape
    xb = x.reshape(rows, k // 16, 16)
    s = ref.e4m3_encode(gs * (xb.abs().amax(-1) / 6))
    s = torch.where(s == 0, torch.full_like(s, 0x20), s)
    d = ref.e4m3_decode(s) / gs
    q = ref.e2m1_decode(ref.e2m1_encode(torch.clamp(xb / d[..., None], -6, 6)))
    return q.reshape(rows, k), s


def _variant_te(ref, x):
    """TransformerEngine's NVFP4 scale arithmetic (common/cast/nvfp4/core_nvfp4.cuh):
    ``S_enc = 2688 / A`` (IEEE), ``s = e4m3(b * (S_enc * (1/6)))``, element encode factor
    ``1 / (s * (1 / S_enc))``, element = E2M1(x * factor)."""
    a = x.abs().amax()
    s_enc = torch.tensor(2688.0) / a
    rows, k = x.shape
    xb = x.reshape(rows, k // 16, 16)
    s = ref.e4m3_encode(xb.abs().amax(-1) * (s_enc * torch.tensor(1.0 / 6.0)))
    factor = torch.tensor(1.0) / (ref.e4m3_decode(s) * (torch.tensor(1.0) / s_enc))
    factor = factor.clamp(max=torch.finfo(torch.float32).max)
    q = ref.e2m1_decode(ref.e2m1_encode(xb * factor[..., None]))
    return q.reshape(rows, k), s


def _variant_modelopt(ref, x):
    """ModelOpt's decode-direction NVFP4 fake quant (modelopt/torch/quantization/triton/
    fp4_kernel.py ``fp4_fake_quant_block``): ``gsd = A / 2688``; ``s = e4m3(min(b / (6 * gsd),
    448))``; ``d = s * gsd`` (1 if d < 1e-5); element = sign(x) * E2M1(|x| / d)."""
    a = x.abs().amax()
    gsd = a / torch.tensor(2688.0)
    rows, k = x.shape
    xb = x.reshape(rows, k // 16, 16)
    s = ref.e4m3_encode(torch.clamp(xb.abs().amax(-1) / (6.0 * gsd), max=448.0))
    d = ref.e4m3_decode(s) * gsd
    d = torch.where(d >= 1e-5, d, torch.ones_like(d))
    q = ref.e2m1_decode(ref.e2m1_encode(xb.abs() / d[..., None]))
    q = torch.where(xb >= 0, q, -q)
    return q.reshape(rows, k), s


def variant_mismatches(ref, variant, x):
    """Code and scale mismatches of a variant vs the reference on a 2-d f32 tensor, split into
    blocks whose E4M3 scale is regular and blocks whose scale underflows E4M3 (our rule
    encodes ``gs * (b / 6)`` to 0 there and uses compressed-tensors' 0.125 instead; TE keeps
    the zero scale, ModelOpt keeps it and divides by 1)."""
    codes, scales, gs = ref.nvfp4_quantize(x)
    rows, k = x.shape
    ours = _our_e2m1_values(ref, codes, k).reshape(rows, k // 16, 16)
    q, s = variant(ref, x)
    q = q.reshape(rows, k // 16, 16)
    b = x.reshape(rows, k // 16, 16).abs().amax(-1)
    underflow = ref.e4m3_encode(gs * (b / 6)) == 0
    code_blk = (q != ours).sum(-1)
    scale_blk = s != scales
    return {
        "codes_regular": int(code_blk[~underflow].sum()),
        "scales_regular": int(scale_blk[~underflow].sum()),
        "n_regular": int((~underflow).sum()) * 16,
        "blocks_regular": int((~underflow).sum()),
        "codes_underflow": int(code_blk[underflow].sum()),
        "n_underflow": int(underflow.sum()) * 16,
    }


@pytest.mark.parametrize(
    "variant", [_variant_ieee_gs, _variant_te, _variant_modelopt], ids=["te-gs", "te", "modelopt"]
)
def test_nvfp4_variant_mismatch_rates(ref, variant):
    tot: dict = {}
    for _, x in _nv_inputs(seed=6, rows=512, k=1024):
        for key, val in variant_mismatches(ref, variant, x).items():
            tot[key] = tot.get(key, 0) + val
    n, nb = tot["n_regular"], tot["blocks_regular"]
    print(
        f"\nNVFP4 variant {variant.__name__}: regular blocks: codes {tot['codes_regular']}/{n}"
        f" = {tot['codes_regular'] / n:.2e}, block scales {tot['scales_regular']}/{nb} = "
        f"{tot['scales_regular'] / nb:.2e}; E4M3-underflow blocks: codes "
        f"{tot['codes_underflow']}/{tot['n_underflow']}"
    )
    # On regular blocks the variants differ from ours only through 1-ulp differences in the
    # f32 scale arithmetic, which move the rare value sitting on a rounding boundary; measured
    # ~1e-7 (docs/results/PEERS.md). A loose bound still catches a real rule change.
    assert tot["codes_regular"] / n < 1e-5
    assert tot["scales_regular"] / nb < 1e-5
