"""The package API against the pure-torch reference, bit for bit (the numerics tests' first two
layers: exact tables, then bit-exact against the reference; the third is test_error_table.py).

Layer 1 pins the reference itself to exact tables taken from docs/reference/FORMATS.md (ties to
even, saturation, the scale-mode table). Layer 2 compares ``aqn_rs.Mxfp4Quantizer`` /
``aqn_rs.Nvfp4Quantizer`` (CPU path) with ``aqn_rs.reference`` on fresh random inputs,
adversarial inputs (ties and their f32 neighbours, +-6 boundaries, zeros, -0.0, subnormals,
NaN, +-Inf, values near the dtype maxima), odd last dimensions, several leading shapes, empty
tensors, all three dtypes (and numpy f32/f16), all four MXFP4 scale modes and the NVFP4 amax
options, plus a hypothesis property test. Float outputs are compared as bit patterns, with
"both NaN" counting as equal (FORMATS.md §NaN outputs); codes, scales and global scales must be
identical.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import (  # noqa: E402  (tests/ is on sys.path: pyproject's pytest pythonpath)
    DTYPES,
    E2M1_TIES,
    LEADING_SHAPES,
    ODD_KS,
    RANDOM_GENERATORS,
    load_reference,
    mixed_blocks,
    special_rows,
    tie_rows,
)

MODES = ("floor", "rceil", "even", "ceil")
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
R = load_reference()


# ---------------------------------------------------------------------------------------------
# Layer 1: the reference against exact tables (no package needed)
# ---------------------------------------------------------------------------------------------


def _nx(v: float, toward: float) -> float:
    """The f32 neighbour of f32 ``v`` towards ``toward``."""
    return torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(toward)).item()


@pytest.mark.parametrize(
    "y, value",
    [
        (0.0, 0.0),
        (0.25, 0.0),  # tie to even (0)
        (_nx(0.25, 1), 0.5),
        (0.5, 0.5),
        (0.75, 1.0),  # tie to even (1.0)
        (_nx(0.75, 0), 0.5),
        (1.25, 1.0),  # tie to even (1.0)
        (_nx(1.25, 2), 1.5),
        (1.75, 2.0),  # tie to even (2.0)
        (_nx(1.75, 0), 1.5),
        (2.5, 2.0),  # tie to even (2.0)
        (_nx(2.5, 3), 3.0),
        (3.5, 4.0),  # tie to even (4.0)
        (_nx(3.5, 0), 3.0),
        (5.0, 4.0),  # tie to even (4.0)
        (_nx(5.0, 6), 6.0),
        (6.0, 6.0),
        (7.0, 6.0),  # saturation
        (1e30, 6.0),
        (math.inf, 6.0),
        (-0.0, -0.0),  # code 0x8
        (-0.1, -0.0),  # sign kept when rounding to zero
        (-5.5, -6.0),
    ],
)
def test_reference_e2m1_table(y, value):
    code = R.e2m1_encode(torch.tensor([y], dtype=torch.float32))
    got = R.e2m1_decode(code)
    assert got.item() == value and math.copysign(1, got.item()) == math.copysign(1, value)
    if value == 0 and math.copysign(1, value) < 0:
        assert code.item() == 0x8


@pytest.mark.parametrize(
    "v, byte",
    [
        (0.0, 0x00),
        (2.0**-9, 0x01),  # smallest subnormal
        (2.0**-10, 0x00),  # tie to even (0)
        (1.5 * 2.0**-10, 0x01),
        (2.0**-6, 0x08),  # smallest normal
        (1.0, 0x38),
        (1.0625, 0x38),  # tie to even (1.0)
        (1.1875, 0x3A),  # tie to even (1.25)
        (1.9375, 0x40),  # rounds up into the next binade (2.0)
        (448.0, 0x7E),
        (464.0, 0x7E),  # saturation (would round to 480)
        (math.inf, 0x7E),
        (-448.0, 0xFE),
        (math.nan, 0x7F),
    ],
)
def test_reference_e4m3_table(v, byte):
    assert R.e4m3_encode(torch.tensor([v], dtype=torch.float32)).item() == byte


@pytest.mark.parametrize(
    "amax, floor, ceil, even, rceil",
    [
        # even adds a quarter (1 << 21) to the mantissa before taking the exponent
        (6.0, 0, 1, 0, 0),  # 1.5 + 0.25 stays below 2
        (4.0, 0, 0, 0, 0),  # a power of two: every mode agrees
        (5.0, 0, 1, 0, 0),  # 1.25 * 4: even rounds down; rceil ceil(log2(5/6)) = 0
        (7.0, 0, 1, 1, 1),  # 1.75 * 4: even rounds up; rceil ceil(log2(7/6)) = 1
        (1.0, -2, -2, -2, -2),
        (0.0, -127, -127, -127, -127),  # zero block: clamped
        (2.0**-140, -127, -127, -127, -127),  # subnormal amax: E = -127
        (3.4028234663852886e38, 125, 126, 126, 126),
    ],
)
def test_reference_mx_scale_table(amax, floor, ceil, even, rceil):
    x = torch.zeros(1, 32)
    x[0, 5] = amax
    for mode, e in zip(MODES, (floor, rceil, even, ceil)):
        _, scales = R.mxfp4_quantize(x, mode)
        assert scales.item() == e + 127, (mode, amax)


def test_reference_rceil_exact_for_subnormal_d():
    # d = amax / 6 subnormal: ceil(log2 d) from the exact value, not from log2
    for m in (1, 2, 3, 4, 5, 1000, 2**22, 2**22 + 1):
        d = m * 2.0**-149
        amax = torch.tensor(d, dtype=torch.float32) * 6
        x = torch.zeros(1, 32)
        x[0, 0] = amax
        got = R.mxfp4_quantize(x, "rceil")[1].item() - 127
        dd = float(amax / 6)
        assert got == max(-127, math.ceil(math.log2(dd))), (m, dd, got)


def test_reference_mx_known_values():
    # amax 6 * 2**p, floor: e = p; every value lands on a tie or grid point times 2**p
    for p in (-100, -3, 0, 7, 100):
        row = torch.tensor([6.0, 5.0, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25] * 4) * 2.0**p
        want = torch.tensor([6.0, 4.0, 4.0, 2.0, 2.0, 1.0, 1.0, 0.0] * 4) * 2.0**p
        got = R.mxfp4_fake_quant(row.reshape(1, 32))
        assert torch.equal(got.reshape(-1), want), p


def test_reference_nvfp4_known_values():
    # amax = inf -> gs = 1; block amax 6 * 2**p -> s = 2**p exactly, d = 2**p
    row = torch.tensor([6.0, 5.0, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25] * 2)
    for p in (-9, -2, 0, 3, 6):
        codes, scales, gs = R.nvfp4_quantize((row * 2.0**p).reshape(1, 16), amax=math.inf)
        assert gs.item() == 1.0
        assert R.e4m3_decode(scales).item() == 2.0**p
        got = R.nvfp4_dequantize(codes, scales, gs, (1, 16), torch.float32).reshape(-1)
        want = torch.tensor([6.0, 4.0, 4.0, 2.0, 2.0, 1.0, 1.0, 0.0] * 2) * 2.0**p
        assert torch.equal(got, want), p
    # a zero block: scale byte 0x20 (0.125, compressed-tensors' eps), dequant 0
    codes, scales, gs = R.nvfp4_quantize(torch.zeros(2, 16))
    assert scales.flatten().tolist() == [0x20, 0x20] and gs.item() == 1.0


def test_reference_nonfinite_blocks():
    x = torch.ones(2, 64)
    x[0, 3] = math.nan
    x[1, 40] = -math.inf
    codes, scales = R.mxfp4_quantize(x)
    assert scales.tolist() == [[0xFF, 125], [125, 0xFF]]  # amax 1 -> floor e = -2
    assert R.unpack_nibbles(codes, 64)[0, :32].eq(0).all()
    y = R.mxfp4_fake_quant(x)
    assert torch.isnan(y[0, :32]).all() and torch.equal(y[0, 32:], torch.ones(32))
    assert torch.isnan(y[1, 32:]).all() and torch.equal(y[1, :32], torch.ones(32))
    # NVFP4: tensor amax NaN -> gs = 1; only the blocks holding NaN/Inf are NaN
    codes, scales, gs = R.nvfp4_quantize(x)
    assert gs.item() == 1.0
    assert scales[0].tolist() == [0x7F, 0x23, 0x23, 0x23]  # e4m3(1/6) = 0.171875
    assert scales[1].tolist() == [0x23, 0x23, 0x7F, 0x23]
    y = R.nvfp4_fake_quant(x)
    assert torch.isnan(y[0, :16]).all() and not torch.isnan(y[0, 16:]).any()
    assert torch.isnan(y[1, 32:48]).all() and not torch.isnan(y[1, :32]).any()


def test_reference_rejects_0d():
    with pytest.raises(ValueError):
        R.mxfp4_quantize(torch.tensor(1.0))
    with pytest.raises(ValueError):
        R.nvfp4_quantize(torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# Layer 2: the API against the reference
# ---------------------------------------------------------------------------------------------

try:
    import aqn_rs
except ImportError:  # extension not built: layer 1 still runs
    aqn_rs = None


@pytest.fixture(autouse=True)
def _needs_api(request):
    if aqn_rs is None and not request.node.name.startswith("test_reference_"):
        pytest.skip("aqn_rs is not built (cd /work/main && maturin develop --release)")


def _as_torch(a):
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    if isinstance(a, np.generic):
        return torch.from_numpy(np.asarray(a))
    return a


def _int_view(t):
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_same_bits(got, want, what=""):
    """Same dtype, shape and bit pattern; "both NaN" counts as equal."""
    got, want = _as_torch(got), _as_torch(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype.is_floating_point:
        nan_g, nan_w = torch.isnan(got), torch.isnan(want)
        bad = (_int_view(got) != _int_view(want)) & ~(nan_g & nan_w)
    else:
        bad = got != want
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; first at {idx}: "
            f"api {got[idx].item()!r} vs reference {want[idx].item()!r}"
        )


def _reference_input(x):
    """The torch tensor the reference sees for an API input (numpy shares memory)."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def check_mxfp4(x, mode, what=""):
    """Every MXFP4 API entry point against the reference for one input."""
    q = aqn_rs.Mxfp4Quantizer(scale_mode=mode)
    xt = _reference_input(x)
    what = f"{what} mxfp4/{mode} {tuple(xt.shape)} {xt.dtype}"
    want = R.mxfp4_fake_quant(xt, mode)
    got = q.fake_quant(x)
    assert type(got) is type(x)
    assert_same_bits(got, want, what + " fake_quant")

    t = q.quantize(x)
    codes, scales = R.mxfp4_quantize(xt, mode)
    assert t.format == "mxfp4" and t.global_scale is None
    assert tuple(t.shape) == tuple(xt.shape)
    assert_same_bits(t.codes, codes, what + " codes")
    assert_same_bits(t.scales, scales, what + " scales")
    assert_same_bits(q.dequantize(t), got, what + " dequantize(quantize) vs fake_quant")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        if isinstance(x, np.ndarray) and dt is torch.bfloat16:
            continue
        out_dtype = dt if not isinstance(x, np.ndarray) else {torch.float32: np.float32, torch.float16: np.float16}[dt]
        assert_same_bits(
            q.dequantize(t, dtype=out_dtype),
            R.mxfp4_dequantize(codes, scales, xt.shape, dt),
            f"{what} dequantize->{dt}",
        )


def check_nvfp4(x, amax=None, what=""):
    """Every NVFP4 API entry point against the reference for one input and amax option."""
    n = aqn_rs.Nvfp4Quantizer()
    xt = _reference_input(x)
    what = f"{what} nvfp4 amax={amax!r} {tuple(xt.shape)} {xt.dtype}"
    want = R.nvfp4_fake_quant(xt, amax)
    got = n.fake_quant(x, amax=amax)
    assert type(got) is type(x)
    assert_same_bits(got, want, what + " fake_quant")

    t = n.quantize(x, amax=amax)
    codes, scales, gs = R.nvfp4_quantize(xt, amax)
    assert t.format == "nvfp4" and tuple(t.shape) == tuple(xt.shape)
    assert_same_bits(t.codes, codes, what + " codes")
    assert_same_bits(t.scales, scales, what + " scales")
    if isinstance(x, np.ndarray):
        assert isinstance(t.global_scale, np.float32), type(t.global_scale)
    else:
        assert isinstance(t.global_scale, torch.Tensor) and t.global_scale.dim() == 0
        assert t.global_scale.dtype == torch.float32
    assert_same_bits(_as_torch(t.global_scale).reshape(()), gs, what + " global_scale")
    assert_same_bits(n.dequantize(t), got, what + " dequantize(quantize) vs fake_quant")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        if isinstance(x, np.ndarray) and dt is torch.bfloat16:
            continue
        out_dtype = dt if not isinstance(x, np.ndarray) else {torch.float32: np.float32, torch.float16: np.float16}[dt]
        assert_same_bits(
            n.dequantize(t, dtype=out_dtype),
            R.nvfp4_dequantize(codes, scales, gs, xt.shape, dt),
            f"{what} dequantize->{dt}",
        )


def check_all(x, what=""):
    for mode in MODES:
        check_mxfp4(x, mode, what)
    check_nvfp4(x, None, what)


# --- fresh random inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", sorted(RANDOM_GENERATORS))
def test_random_inputs(name, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{dtype}".encode()))
    for shape in ((1000,), (7, 65), (2, 3, 96), (16, 256)):
        x = RANDOM_GENERATORS[name](shape, g).to(dtype)
        check_all(x, name)


# --- odd lengths and leading shapes ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", ODD_KS)
def test_odd_lengths_and_leading_shapes(k, dtype):
    g = torch.Generator().manual_seed(1000 + k)
    for lead in LEADING_SHAPES:
        x = mixed_blocks((*lead, k), g, block=8, lo_pow2=-20, hi_pow2=20).to(dtype)
        check_all(x, f"K={k}")


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 7), (0, 0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_empty(shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    check_all(x, "empty")
    check_nvfp4(x, 1.0, "empty")


def test_0d_is_an_error():
    for q in (aqn_rs.Mxfp4Quantizer(), aqn_rs.Nvfp4Quantizer()):
        with pytest.raises(ValueError):
            q.fake_quant(torch.tensor(1.0))
        with pytest.raises(ValueError):
            q.quantize(torch.tensor(1.0))


def test_non_contiguous_input_is_handled_or_a_clear_error():
    # a non-contiguous input is either handled or a clear error, never read in the wrong order
    x = torch.randn(64, 48).t()
    for q in (aqn_rs.Mxfp4Quantizer(), aqn_rs.Nvfp4Quantizer()):
        try:
            y = q.fake_quant(x)
        except ValueError as e:
            assert "contiguous" in str(e)
        else:
            want = (R.mxfp4_fake_quant if q.format == "mxfp4" else R.nvfp4_fake_quant)(x.contiguous())
            assert_same_bits(y, want, "non-contiguous")


# --- adversarial inputs ----------------------------------------------------------------------


def _tie_powers(dtype):
    # keep 6 * 2**p and 0.25 * 2**p inside the dtype's normal range
    return {torch.float32: range(-120, 121, 20), torch.bfloat16: range(-120, 121, 20), torch.float16: range(-12, 14, 5)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ties_and_neighbours(dtype):
    x = tie_rows(32, _tie_powers(dtype)).to(dtype)
    check_all(x, "ties")
    # gs = 1 (amax Inf or NaN): NVFP4 block scales b/6 become exact powers of two, so the
    # elements land exactly on E2M1 ties
    check_nvfp4(x, math.inf, "ties")
    check_nvfp4(x, math.nan, "ties")
    # the same rows as 16-element NVFP4 blocks and with a short tail
    check_all(x.reshape(-1, 16), "ties/16")
    check_all(x[:, :29].contiguous(), "ties/29")


def test_reference_ties_are_exercised():
    """Guard for the adversarial generator: the reference sees exact E2M1 ties."""
    x = tie_rows(32, range(-20, 21, 5))
    e = R.mxfp4_quantize(x, "floor")[1].to(torch.int64) - 127
    y = x * torch.exp2(-e.float())
    hits = torch.isin(y.abs(), torch.tensor(E2M1_TIES))
    assert int(hits.sum()) >= 7 * len(range(-20, 21, 5))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_boundaries_at_six(dtype):
    # +-6 * 2**e and its neighbours, with the block anchored so floor picks e
    base = torch.tensor([4.0, 6.0, -6.0, 5.0, -5.0, 5.5, 3.0, 0.5])
    rows = []
    for p in range(-10, 11, 2):
        v = base * 2.0**p
        up = torch.nextafter(v, torch.full_like(v, math.inf))
        down = torch.nextafter(v, torch.full_like(v, -math.inf))
        rows.append(torch.cat([v, up, down, v * 1.0000001]))
    x = torch.stack(rows).to(dtype)
    check_all(x, "six")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", (32, 17, 48))
def test_special_values(dtype, k):
    x = special_rows(k).to(dtype)
    check_all(x, "special")
    for amax in (1.0, math.inf, math.nan, 0.0):
        check_nvfp4(x, amax, "special")
    # each special row alone (so tensor amax, and NVFP4's gs, come from that row only)
    for i in range(x.shape[0]):
        check_all(x[i : i + 1].contiguous(), f"special row {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_subnormal_tensors(dtype):
    """Whole tensors of subnormals (NVFP4's amax then sits far below 2**-126)."""
    tiny = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}[dtype]
    g = torch.Generator().manual_seed(11)
    x = (torch.randint(-300, 300, (4, 48), generator=g).float() * tiny).to(dtype)
    check_all(x, "subnormal")
    check_all(-torch.zeros(3, 33, dtype=dtype), "neg-zero")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_huge_values(dtype):
    mx = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(12)
    x = (torch.rand(4, 64, generator=g) * 2 - 1) * mx
    x[0, 0] = mx
    x[1, 1] = -mx
    check_all(x.to(dtype), "huge")


# --- NVFP4 amax options ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_nvfp4_amax_options(dtype):
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(8, 80, generator=g) * 3).to(dtype)
    true_amax = float(x.float().abs().max())
    for amax in (
        None,
        true_amax,
        torch.tensor(true_amax),
        torch.tensor(true_amax, dtype=torch.float64),
        true_amax * 1.5,
        true_amax / 7,  # smaller than the data: elements clamp to +-6 * d
        1e-30,  # tiny: gs overflows -> 1
        1e30,
        0.0,
        math.inf,
        math.nan,
        np.float32(true_amax),
    ):
        check_nvfp4(x, amax, "amax")


def test_nvfp4_negative_amax_is_an_error():
    x = torch.ones(2, 16)
    with pytest.raises(ValueError):
        R.nvfp4_quantize(x, -1.0)
    with pytest.raises((ValueError, aqn_rs.AqnError)):
        aqn_rs.Nvfp4Quantizer().fake_quant(x, amax=-1.0)


# --- numpy inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16], ids=["np-f32", "np-f16"])
def test_numpy_inputs(np_dtype):
    g = torch.Generator().manual_seed(14)
    for shape in ((100,), (5, 33), (2, 2, 64)):
        x = mixed_blocks(shape, g, block=8, lo_pow2=-8, hi_pow2=8).to(
            torch.float32 if np_dtype is np.float32 else torch.float16
        )
        check_all(x.numpy(), "numpy")
        check_nvfp4(x.numpy(), 2.5, "numpy")
    x = special_rows(32).to(torch.float32 if np_dtype is np.float32 else torch.float16)
    check_all(x.numpy(), "numpy special")
    check_all(np.zeros((3, 0), np_dtype), "numpy empty")


# --- hypothesis property test ----------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - CI installs hypothesis
    st = None


if st is None:

    def test_property_api_matches_reference():
        pytest.skip("hypothesis is not installed")

else:

    # Hypothesis draws the structure (shape, dtype, exponent range, how many special values, a
    # power-of-two shift) and a seed; numpy expands the seed into the elements, because drawing
    # hundreds of elements one by one through hypothesis costs ~5 ms an example (the 10,000
    # examples must run in about a minute on 2 cores). Elements start as raw f32 bit patterns
    # (every exponent, subnormals, NaN payloads, +-Inf); in "narrow" tensors the exponent field is
    # squeezed to 2**-8 .. 2**7 (realistic blocks where most elements matter); then some positions
    # are overwritten by E2M1 ties / grid points / signed zeros, and the whole tensor is shifted by
    # a power of two (exact unless it over- or underflows, itself an interesting input).
    _NICE = np.array(
        [0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -6.0, 4.0, 448.0, 1.0, -0.5, 3.0],
        dtype=np.float32,
    )


    @st.composite
    def _tensors(draw):
        lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
        k = draw(st.integers(1, 70))
        narrow = draw(st.booleans())
        nice_fraction = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
        scale_pow = draw(st.integers(-140, 120))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        n = math.prod(lead) * k
        bits = rng.integers(0, 2**32, size=n, dtype=np.uint32)
        if narrow:
            exp = ((bits >> 23) & 0xFF) % 16 + 119
            bits = (bits & np.uint32(0x807FFFFF)) | (exp.astype(np.uint32) << 23)
        floats = bits.view(np.float32).copy()
        nice = rng.random(n) < nice_fraction
        floats[nice] = rng.choice(_NICE, size=int(nice.sum()))
        x = torch.from_numpy(floats).reshape(*lead, k)
        return (x * torch.tensor(2.0**scale_pow, dtype=torch.float32)).to(dtype)


    # amax: None, or any non-negative f32 (from its bits: zero, subnormals, +Inf, NaN included)
    _AMAX = st.one_of(
        st.none(),
        st.integers(0, 0x7FFFFFFF).map(lambda b: float(np.array(b, np.uint32).view(np.float32))),
    )


    @settings(
        max_examples=10_000,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(x=_tensors(), mode=st.sampled_from(MODES), amax=_AMAX)
    def test_property_api_matches_reference(x, mode, amax):
        q = aqn_rs.Mxfp4Quantizer(scale_mode=mode)
        codes, scales = R.mxfp4_quantize(x, mode)
        t = q.quantize(x)
        assert_same_bits(t.codes, codes, "mx codes")
        assert_same_bits(t.scales, scales, "mx scales")
        want = R.mxfp4_dequantize(codes, scales, x.shape, x.dtype)  # = R.mxfp4_fake_quant(x)
        assert_same_bits(q.fake_quant(x), want, f"mxfp4/{mode}")
        n = aqn_rs.Nvfp4Quantizer()
        codes, scales, gs = R.nvfp4_quantize(x, amax)
        t = n.quantize(x, amax=amax)
        assert_same_bits(t.codes, codes, "nv codes")
        assert_same_bits(t.scales, scales, "nv scales")
        assert_same_bits(t.global_scale.reshape(()), gs, "nv global scale")
        want = R.nvfp4_dequantize(codes, scales, gs, x.shape, x.dtype)  # = R.nvfp4_fake_quant(x)
        assert_same_bits(n.fake_quant(x, amax=amax), want, "nvfp4")
