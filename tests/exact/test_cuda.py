"""CUDA kernels == CPU path, bit for bit (docs/reference/FORMATS.md), for every op, format, scale
mode and dtype, on fresh random, adversarial and odd-length inputs; plus graph capture, multi-GPU,
> 2^31 elements, torch's expandable segments, and the errors.

The CPU path (`aqn_rs.Mxfp4Quantizer(...).fake_quant(x.cpu())`, ...) is the ground truth.
GPU tests skip themselves without a usable CUDA build and device (CI has none); the CPU-only
tests at the top always run. One command on a GPU machine: `bash scripts/gpu_check.sh`.

AQN_CUDA_TEST_QUICK=1 trims the matrix and skips the multi-GB tests (for compute-sanitizer,
which runs kernels ~100x slower).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
aqn_rs = pytest.importorskip("aqn_rs")
from aqn_rs import _aqn_rs as _rs  # noqa: E402
from aqn_rs import _cuda  # noqa: E402

QUICK = os.environ.get("AQN_CUDA_TEST_QUICK", "") not in ("", "0")
HAVE_GPU = _cuda.available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA kernels and a CUDA device")
two_gpus = pytest.mark.skipif(
    not HAVE_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("floor", "rceil", "even", "ceil")
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# ------------------------------------------------------------------------------------------
# CPU-only: the arithmetic identity the kernels rely on, and the no-GPU behaviour.


def _e2m1_table(a: np.ndarray) -> np.ndarray:
    """The comparison encoder of formats.rs, as magnitudes (a >= 0, f32)."""
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    idx = (
        (a > 0.25).astype(np.int32)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    )
    return grid[idx]


def _e2m1_round_trick(a: np.ndarray) -> np.ndarray:
    """cuda/fp4_common.cuh `e2m1_round`, simulated in numpy f32 (IEEE RNE adds)."""
    a = np.minimum(a, np.float32(6.0))
    b = a.view(np.uint32)
    mb = np.maximum((b & np.uint32(0x7F800000)) + np.uint32(22 << 23), np.uint32(0x4A800000))
    m = mb.view(np.float32)
    with np.errstate(over="ignore"):
        return (a + m) - m


def test_e2m1_round_trick_matches_comparison_encoder():
    """Every bf16 and f16 magnitude, every f32 within 4096 ulps of each tie and grid point,
    and 4M random f32 patterns in [0, Inf]. (Run once exhaustively over all 2^31 non-negative
    f32 patterns: 0 mismatches.)"""
    parts = [
        (np.arange(0, 0x7F81, dtype=np.uint32) << 16).view(np.float32),  # bf16 up to Inf
        np.arange(0, 0x7C01, dtype=np.uint16).view(np.float16).astype(np.float32),
    ]
    for t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
        c = np.float32(t).view(np.uint32).astype(np.int64)
        parts.append(np.arange(c - 4096, c + 4097, dtype=np.int64).astype(np.uint32).view(np.float32))
    rng = np.random.default_rng(0)
    parts.append(rng.integers(0, 0x7F800001, 4_000_000, dtype=np.uint32).view(np.float32))
    parts.append(np.array([np.inf, 6.0, 7.0, 1e30, 2.0**-149], np.float32))
    a = np.concatenate(parts)
    got, want = _e2m1_round_trick(a), _e2m1_table(a)
    bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, f"{bad.size} mismatches, first at {a[bad[:5]]}: {got[bad[:5]]} vs {want[bad[:5]]}"


def test_build_reporting_is_consistent():
    archs = _cuda.build_archs()
    assert bool(archs) == bool(_rs.cuda_built())
    if archs:
        assert any(a.startswith("compute_") for a in archs), archs
    if not _rs.cuda_built():
        assert not _cuda.available()


@pytest.mark.skipif(HAVE_GPU, reason="checks the behaviour without a usable GPU")
def test_without_gpu_calls_raise_runtime_error():
    # Built without kernels, or no driver/device: a RuntimeError, never a crash.
    with pytest.raises(RuntimeError):
        _rs.cuda_fake_quant("mxfp4", "floor", "bf16", 0, 0, 1 << 20, 1 << 21, 1, 32, 0, None, 0)
    with pytest.raises(RuntimeError):
        _rs.cuda_amax("f32", 0, 0, 1 << 20, 4, 1 << 21, 1 << 22)


def test_argument_errors_need_no_gpu():
    # Argument checks come before any driver call.
    with pytest.raises(TypeError):
        _rs.cuda_fake_quant("mxfp4", "floor", "f64", 0, 0, 0, 0, 1, 32, 0, None, 0)
    with pytest.raises(ValueError):
        _rs.cuda_fake_quant("mxfp5", "floor", "f32", 0, 0, 0, 0, 1, 32, 0, None, 0)
    with pytest.raises(ValueError):
        _rs.cuda_fake_quant("mxfp4", "round", "f32", 0, 0, 0, 0, 1, 32, 0, None, 0)
    with pytest.raises(ValueError, match="amax"):
        _rs.cuda_fake_quant("nvfp4", "floor", "f32", 0, 0, 0, 0, 1, 32, 0, -1.0, 0)
    with pytest.raises(ValueError, match="exactly one"):
        _rs.cuda_fake_quant("nvfp4", "floor", "f32", 0, 0, 0, 0, 1, 32, 0, None, 0)


def test_dlpack_exchange_path_declines_what_it_cannot_take():
    """The hot path reads tensors through torch's DLPack C exchange API (torch >= 2.10). It
    registers only a capsule of that name, and declines (False, nothing launched, no error
    left set) anything that is not a CUDA tensor, so the checked path reports it."""
    class Other:  # a capsule of another name where the API's should be
        __dlpack_c_exchange_api__ = torch.utils.dlpack.to_dlpack(torch.zeros(2))

    for obj in (None, 3, np.ndarray, Other):
        assert _rs.dlpack_exchange_register(obj) is False
    if getattr(torch.Tensor, "__dlpack_c_exchange_api__", None) is None:
        pytest.skip(f"torch {torch.__version__} has no DLPack C exchange API (torch < 2.10)")
    assert _rs.dlpack_exchange_register(torch.Tensor) is True
    x = torch.randn(4, 64)
    for obj in (x, [1.0, 2.0], np.zeros((4, 64), np.float32), torch.empty(4, 64, device="meta")):
        assert _rs.cuda_fake_quant_t(obj, torch.empty_like(x), "mxfp4", "floor", 0, None, 0) is False
    # The checked path still raises its message for such an input.
    with pytest.raises(ValueError, match="CPU tensor"):
        _cuda.fake_quant(x, "mxfp4", "floor", None)


# ------------------------------------------------------------------------------------------
# GPU: helpers.


def bits(t):
    t = t.detach().cpu().contiguous()
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def assert_bits_equal(got, want, what=""):
    got, want = bits(got), bits(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    neq = got != want
    if bool(neq.any()):
        i = torch.nonzero(neq.reshape(-1))[:5].reshape(-1)
        raise AssertionError(
            f"{what}: {int(neq.sum())} of {neq.numel()} differ; first flat indices {i.tolist()}: "
            f"got {got.reshape(-1)[i].tolist()} want {want.reshape(-1)[i].tolist()}"
        )


def cpu_quantizer(fmt, mode):
    return aqn_rs.Mxfp4Quantizer(scale_mode=mode) if fmt == "mxfp4" else aqn_rs.Nvfp4Quantizer()


def cpu_fake_quant(x, fmt, mode, amax=None):
    q = cpu_quantizer(fmt, mode)
    xc = x.detach().cpu()
    if fmt == "mxfp4":
        return q.fake_quant(xc)
    if isinstance(amax, torch.Tensor):
        amax = float(amax.cpu())
    return q.fake_quant(xc, amax=amax)


def cpu_quantize(x, fmt, mode, amax=None):
    q = cpu_quantizer(fmt, mode)
    xc = x.detach().cpu()
    if fmt == "mxfp4":
        return q.quantize(xc)
    if isinstance(amax, torch.Tensor):
        amax = float(amax.cpu())
    return q.quantize(xc, amax=amax)


def inputs(shape, dtype, seed, dev="cuda"):
    """Fresh random inputs of several kinds, plus adversarial rows, cast to dtype."""
    from helpers import RANDOM_GENERATORS, special_rows, tie_rows  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, fn in RANDOM_GENERATORS.items():
        out[name] = fn(shape, g).to(dtype)
    k = shape[-1]
    n = math.prod(shape)
    for name, rows in (("ties", tie_rows(32)), ("special", special_rows(32))):
        flat = rows.reshape(-1)
        reps = -(-n // flat.numel())
        out[name] = flat.repeat(reps)[:n].reshape(shape).to(dtype)
    # Random bit patterns: every exponent, NaN payloads, subnormals of the dtype.
    ib = INT_VIEW[dtype]
    info = torch.iinfo(ib)
    r = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(ib)
    out["bits"] = r.view(dtype)
    del k
    return {name: t.to(dev) for name, t in out.items()}


SHAPES_FULL = [(1,), (7,), (33,), (3, 33), (2, 3, 64), (5, 1000), (37, 96), (1, 48), (64, 4096), (3, 4097)]
SHAPES_QUICK = [(7,), (3, 33), (2, 3, 64), (37, 96), (1, 48)]
SHAPES = SHAPES_QUICK if QUICK else SHAPES_FULL
AMAXES = (None, "tensor", "cpu_tensor", 3.0, 0.0, math.inf, math.nan, 1e-30)


# ------------------------------------------------------------------------------------------
# GPU: exactness against the CPU path.


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
def test_mxfp4_matches_cpu(dtype, mode):
    for si, shape in enumerate(SHAPES):
        for name, x in inputs(shape, dtype, seed=si).items():
            what = f"mxfp4 {mode} {dtype} {shape} {name}"
            assert_bits_equal(_cuda.fake_quant(x, "mxfp4", mode, None), cpu_fake_quant(x, "mxfp4", mode), what)
            codes, scales, gs = _cuda.quantize(x, "mxfp4", mode, None)
            assert gs is None
            want = cpu_quantize(x, "mxfp4", mode)
            assert_bits_equal(codes, want.codes, what + " codes")
            assert_bits_equal(scales, want.scales, what + " scales")
            back = _cuda.dequantize(codes, scales, None, shape, "mxfp4", dtype)
            assert_bits_equal(back, cpu_quantizer("mxfp4", mode).dequantize(want, dtype=dtype), what + " dequant")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("amax_kind", AMAXES, ids=str)
def test_nvfp4_matches_cpu(dtype, amax_kind):
    shapes = SHAPES if amax_kind in (None, "tensor") else SHAPES[:3]
    for si, shape in enumerate(shapes):
        for name, x in inputs(shape, dtype, seed=100 + si).items():
            if amax_kind == "tensor":
                amax = x.float().abs().amax() * 0.75  # smaller than the data: the clamp matters
            elif amax_kind == "cpu_tensor":
                amax = torch.tensor(2.5)
            else:
                amax = amax_kind
            what = f"nvfp4 amax={amax_kind} {dtype} {shape} {name}"
            got = _cuda.fake_quant(x, "nvfp4", "floor", amax)
            assert_bits_equal(got, cpu_fake_quant(x, "nvfp4", "floor", amax), what)
            codes, scales, gs = _cuda.quantize(x, "nvfp4", "floor", amax)
            want = cpu_quantize(x, "nvfp4", "floor", amax)
            assert_bits_equal(codes, want.codes, what + " codes")
            assert_bits_equal(scales, want.scales, what + " scales")
            assert gs.device == x.device and gs.dim() == 0 and gs.dtype == torch.float32
            assert_bits_equal(gs, torch.as_tensor(want.global_scale, dtype=torch.float32), what + " gs")
            back = _cuda.dequantize(codes, scales, gs, shape, "nvfp4", dtype)
            assert_bits_equal(back, got, what + " dequantize(quantize(x)) == fake_quant(x)")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_nvfp4_near_midpoint_quotients(dtype):
    """Blocks whose elements sit within a few ulps of midpoint * d (d the block's decode
    scale, not a power of two): the E2M1 code then hangs on the last bit of the correctly
    rounded quotient x / d (multiplying by a rounded 1/d gets some of these wrong). Global
    scales from tiny to huge amaxes, both signs."""
    rng = np.random.default_rng(29)
    q = aqn_rs.Nvfp4Quantizer()
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    for gamax in (1.0, 3.7, 384.0, 1e-3, 12345.678, 2.0**-20, 2.0**30):
        blocks = []
        for big in rng.uniform(0.05, 1.0, 12).astype(np.float32) * np.float32(gamax):
            head = torch.zeros(16).to(dtype)
            head[0] = float(big)
            t = q.quantize(head, amax=gamax)
            e4 = torch.tensor([int(t.scales.reshape(-1)[0])], dtype=torch.uint8).view(torch.float8_e4m3fn).float()
            dec = np.float32(e4.numpy()[0]) / np.float32(t.global_scale)
            c = (mids * dec).astype(np.float32).view(np.int32).astype(np.int64)
            probes = (c[:, None] + np.arange(-6, 7)[None, :]).astype(np.int32).view(np.float32).reshape(-1)
            probes = np.where(rng.random(probes.size) < 0.5, -probes, probes)
            for i in range(0, probes.size, 15):
                blk = torch.zeros(16)
                blk[0] = float(head[0])
                chunk = torch.from_numpy(probes[i : i + 15].copy())
                blk[1 : 1 + chunk.numel()] = chunk
                blocks.append(blk.to(dtype))
        x = torch.stack(blocks).reshape(-1, 64 if len(blocks) % 4 == 0 else 16)
        for amax in (gamax, None):
            what = f"near-midpoint {dtype} amax={gamax} ({'given' if amax else 'computed'})"
            xg = x.cuda()
            assert_bits_equal(_cuda.fake_quant(xg, "nvfp4", "floor", amax), cpu_fake_quant(x, "nvfp4", "floor", amax), what)
            codes, scales, _ = _cuda.quantize(xg, "nvfp4", "floor", amax)
            want = cpu_quantize(x, "nvfp4", "floor", amax)
            assert_bits_equal(codes, want.codes, what + " codes")
            assert_bits_equal(scales, want.scales, what + " scales")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_amax_matches_cpu(dtype):
    cases = []
    for si, shape in enumerate(SHAPES + [(3, 1 << 20)]):
        cases += [(f"{shape} {name}", x) for name, x in inputs(shape, dtype, seed=200 + si).items()]
    cases += [(str(s), torch.empty(s, dtype=dtype, device="cuda")) for s in [(0,), (4, 0)]]
    for what, x in cases:
        got = _cuda.amax(x)
        assert got.device == x.device and got.dim() == 0 and got.dtype == torch.float32
        want = torch.tensor(aqn_rs.Nvfp4Quantizer().amax(x.cpu()), dtype=torch.float32)
        assert_bits_equal(got, want, f"amax {dtype} {what}")


def _cpu_amax(xs):
    vals = [aqn_rs.Nvfp4Quantizer().amax(x.cpu()) for x in xs]
    return math.nan if any(math.isnan(v) for v in vals) else max(vals)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_amax_finds_a_spike_anywhere(dtype):
    """The amax pass walks each tensor's chunks from the last to the first: one spike at any
    position (first, last, either side of a chunk or grid-stride boundary, the unaligned head
    and the tail) must be found, for sizes around whole chunks and whole waves of the grid."""
    epv = 16 // torch.tensor([], dtype=dtype).element_size()
    chunk = 512 * 4 * epv  # AMAX_THREADS * AMAX_UNROLL vectors
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    wave = 2 * sms * chunk  # the amax grid's cap: 2 CTAs per SM
    g = torch.Generator().manual_seed(11)
    sizes = [1, epv - 1, epv + 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, wave - 3, wave, wave + epv + 1]
    if not QUICK:
        sizes += [2 * wave + chunk // 2 + 3]
    for n in sizes:
        base = (torch.rand(n + 1, generator=g) * 0.5).to(dtype).cuda()
        for off in (0, 1):  # off = 1: a pointer not on a 16-byte boundary (head elements)
            x = base[off:]
            m = x.numel()
            spots = {0, m - 1, m // 2, min(chunk, m - 1), min(chunk - 1, m - 1), min(wave, m - 1), max(m - chunk, 0)}
            for p in sorted(spots):
                y = x.clone()
                y[p] = -7.0  # |y| max, negative: the pass takes |x|
                got = _cuda.amax(y)
                assert float(got) == 7.0, (dtype, n, off, p, float(got))
                got2 = _cuda.amax_many([x, y, x])
                assert float(got2) == 7.0, (dtype, n, off, p, "amax_many", float(got2))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_amax_many_matches_cpu(dtype):
    """amax_many (a fused group's shared amax in one call) == the max of the members' CPU
    amaxes, bit for bit: random and adversarial members, NaN/Inf members, empty members,
    members of very different sizes, one member, many members."""
    groups = []
    for si, shape in enumerate(SHAPES):
        xs = list(inputs(shape, dtype, seed=300 + si).values())
        groups += [(f"{shape} all kinds", xs)] + [(f"{shape} {i}+{i + 1}", xs[i:i + 2]) for i in range(len(xs) - 1)]
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(3, 1 << 20, generator=g) * 3).to(dtype).cuda()
    small = torch.randn(7, generator=g).to(dtype).cuda()
    empty = torch.empty(0, dtype=dtype, device="cuda")
    nan = small.clone()
    nan[3] = math.nan
    inf = small.clone()
    inf[0] = -math.inf
    groups += [
        ("big+small", [big, small]), ("small+big", [small, big]), ("one", [big]),
        ("empty+small", [empty, small]), ("all empty", [empty, empty]), ("nan", [big, nan, small]),
        ("inf", [inf, big]), ("inf+nan", [inf, nan]),
        ("many", [torch.randn(1 + i, generator=g).to(dtype).cuda() for i in range(200)]),
    ]
    for what, xs in groups:
        got = _cuda.amax_many(xs)
        assert got.device == xs[0].device and got.dim() == 0 and got.dtype == torch.float32
        want = torch.tensor(_cpu_amax(xs), dtype=torch.float32)
        assert_bits_equal(got, want, f"amax_many {dtype} {what}")
        q = aqn_rs.Nvfp4Quantizer()
        assert_bits_equal(q.amax_many(xs), want, f"Nvfp4Quantizer.amax_many {dtype} {what}")
        # the CPU form gives the same value as a float
        cpu = q.amax_many([x.cpu() for x in xs])
        assert (math.isnan(cpu) and math.isnan(float(want))) or cpu == float(want), (what, cpu, float(want))


@gpu
def test_amax_many_rejects_bad_input():
    x = torch.randn(64, device="cuda")
    with pytest.raises(ValueError, match="at least one"):
        _cuda.amax_many([])
    with pytest.raises(ValueError, match="one dtype and one device"):
        _cuda.amax_many([x, x.to(torch.bfloat16)])
    with pytest.raises(ValueError, match="CPU tensor"):
        _cuda.amax_many([x, x.cpu()])
    with pytest.raises(ValueError, match="contiguous"):
        _cuda.amax_many([x.view(8, 8).t()])
    with pytest.raises(ValueError, match="all CUDA tensors or none"):
        aqn_rs.Nvfp4Quantizer().amax_many([x, x.cpu()])
    out = torch.empty((), device="cuda")
    s = torch.empty(1024, device="cuda")
    st = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="needs 2048"):  # scratch for one member, two given
        _rs.cuda_amax_many("f32", 0, st, [x.data_ptr()] * 2, [64, 64], s.data_ptr(), 1024, out.data_ptr())
    with pytest.raises(ValueError, match="2 pointers but 1 element counts"):
        _rs.cuda_amax_many("f32", 0, st, [x.data_ptr()] * 2, [64], s.data_ptr(), 2048, out.data_ptr())
    with pytest.raises(ValueError, match="at most 4096"):
        _rs.cuda_amax_many("f32", 0, st, [x.data_ptr()] * 4097, [1] * 4097, s.data_ptr(), 1024, out.data_ptr())
    with pytest.raises(ValueError):  # scratch_len says more than the buffer holds
        _rs.cuda_amax_many("f32", 0, st, [x.data_ptr()] * 2, [64, 64], s.data_ptr(), 1 << 40, out.data_ptr())
    # A count past the allocation (the check sees the allocation, which torch's caching
    # allocator makes larger than the tensor: 65 of 64 elements would pass it).
    with pytest.raises(ValueError, match="past the end"):  # a member's count runs past its buffer
        _rs.cuda_amax_many("f32", 0, st, [x.data_ptr()], [1 << 28], s.data_ptr(), 1024, out.data_ptr())
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_sq_err_many_matches_float64(dtype):
    """sq_err_many (the weight sync's error sums: one read of each tensor) == the float64 sums
    of the same elements to f32 accumulation rounding, per pair: the vector path and the
    scalar one (an offset view misaligns x, y or both), sizes around the vector width and the
    grid's reach, an empty pair, a pair of equal tensors (exactly 0 error), a real fake quant,
    many pairs of one call."""
    g = torch.Generator().manual_seed(11)

    def pair(n, off_x=0, off_y=0):
        base = torch.randn(n + 1, generator=g) * 0.02
        y = base + torch.randn(n + 1, generator=g) * 0.002
        x = base.to(dtype).cuda()
        return x[off_x:off_x + n], y.to(dtype).cuda()[off_y:off_y + n]

    pairs = [pair(n) for n in (0, 1, 7, 8, 9, 4095, 8 * 4096 + 3, (1 << 20) + 5, 3 << 20)]
    pairs += [pair(4099, 1, 0), pair(4099, 0, 1), pair(4099, 1, 1), pair(1 << 20, 3, 3)]
    w = pairs[-5][0]
    pairs += [(w, w.clone())]  # no error at all
    wq = (torch.randn(64, 4096, generator=g) * 0.02).to(dtype).cuda()
    pairs += [(wq, aqn_rs.Nvfp4Quantizer().fake_quant(wq))]
    got = _cuda.sq_err_many([x for x, _ in pairs], [y for _, y in pairs])
    assert got.shape == (len(pairs), 2) and got.dtype == torch.float64 and got.device == wq.device
    for i, (x, y) in enumerate(pairs):
        xd, yd = x.double().cpu(), y.double().cpu()
        want = torch.stack([(xd - yd).square().sum(), xd.square().sum()])
        assert torch.allclose(got[i].cpu(), want, rtol=1e-5, atol=0), (dtype, i, x.numel(), got[i], want)
    assert got[len(pairs) - 2, 0] == 0 and got[0].tolist() == [0.0, 0.0]
    # the same pairs one call each: a pair's sums do not depend on its neighbours
    for i in (1, 6, len(pairs) - 1):
        one = _cuda.sq_err_many([pairs[i][0]], [pairs[i][1]])
        assert torch.equal(one[0], got[i]), i


@gpu
def test_sq_err_many_rejects_bad_input():
    x = torch.randn(64, device="cuda")
    with pytest.raises(ValueError, match="needs pairs"):
        _cuda.sq_err_many([], [])
    with pytest.raises(ValueError, match="needs pairs"):
        _cuda.sq_err_many([x, x], [x])
    with pytest.raises(ValueError, match="one dtype and one device"):
        _cuda.sq_err_many([x], [x.to(torch.bfloat16)])
    with pytest.raises(ValueError, match="CPU tensor"):
        _cuda.sq_err_many([x], [x.cpu()])
    with pytest.raises(ValueError, match="64 and 65 elements"):
        _cuda.sq_err_many([x], [torch.randn(65, device="cuda")])
    out = torch.empty(2048, device="cuda")
    st = torch.cuda.current_stream().cuda_stream
    p = x.data_ptr()
    with pytest.raises(ValueError, match="needs 4096"):  # a stretch for one pair, two given
        _rs.cuda_sq_err_many("f32", 0, st, [p, p], [p, p], [64, 64], out.data_ptr(), 2048)
    with pytest.raises(ValueError, match="2 x pointers, 1 y pointers and 2 element counts"):
        _rs.cuda_sq_err_many("f32", 0, st, [p, p], [p], [64, 64], out.data_ptr(), 4096)
    with pytest.raises(ValueError, match="past the end"):  # out_len says more than the buffer holds
        _rs.cuda_sq_err_many("f32", 0, st, [p], [p], [64], out.data_ptr(), 1 << 40)
    # past the allocation (torch's caching allocator makes it larger than the tensor)
    with pytest.raises(ValueError, match="past the end"):  # a pair's count runs past its buffers
        _rs.cuda_sq_err_many("f32", 0, st, [p], [p], [1 << 28], out.data_ptr(), 2048)
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("fmt", ("mxfp4", "nvfp4"))
def test_quant_sync_on_cuda_equals_cpu(fmt):
    """The verl plugin's weight-sync fake quant on CUDA tensors (amax_many for the fused
    groups, the multi-tensor error norms) == the same stream on the CPU, bit for bit for the
    weights; the error statistics agree to f32 rounding."""
    from aqn_rs.integrations.verl import quant_sync

    g = torch.Generator().manual_seed(3)
    names, groups = [], {}
    stream = []
    for layer in range(3):
        p = f"model.layers.{layer}"
        qkv = tuple(f"{p}.self_attn.{m}_proj" for m in "qkv")
        gu = (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")
        for grp, shapes in ((qkv, [(64, 64), (32, 64), (32, 64)]), (gu, [(96, 64), (96, 64)])):
            for i, (m, shape) in enumerate(zip(grp, shapes)):
                w = torch.randn(*shape, generator=g) * (1 + 3 * i)  # members' amaxes differ
                stream.append((f"{m}.weight", w))
                names.append(m)
                groups[m] = grp
        stream.append((f"{p}.mlp.down_proj.weight", torch.randn(64, 96, generator=g)))
        names.append(f"{p}.mlp.down_proj")
        stream.append((f"{p}.input_layernorm.weight", torch.ones(64)))
    q = aqn_rs.Nvfp4Quantizer() if fmt == "nvfp4" else aqn_rs.Mxfp4Quantizer()
    res = {}
    for dev in ("cpu", "cuda"):
        st = {}
        out = dict(quant_sync(((n, t.to(dev)) for n, t in stream), q, names, groups,
                              param_dtype=torch.bfloat16, on_done=st.update))
        res[dev] = (out, st)
    (oc, sc), (og, sg) = res["cpu"], res["cuda"]
    for n, _ in stream:
        assert og[n].is_cuda
        assert_bits_equal(og[n], oc[n], n)
    assert sg["tensors"] == sc["tensors"] == len(names)
    for k in ("rel_error", "max_rel_error", "sqnr_db"):
        assert sg[k] == pytest.approx(sc[k], rel=1e-5), k


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("fmt", ("mxfp4", "nvfp4"))
def test_dequantize_arbitrary_bytes_matches_cpu(fmt, dtype):
    """Every code and scale byte (NaN scales, negative E4M3 scales, subnormal E8M0 2^-127)."""
    g = torch.Generator().manual_seed(7)
    for shape in [(5, 64), (3, 33), (2, 4096), (1, 1)]:
        rows, k = math.prod(shape[:-1]), shape[-1]
        b = 32 if fmt == "mxfp4" else 16
        codes = torch.randint(0, 256, (*shape[:-1], (k + 1) // 2), generator=g, dtype=torch.uint8)
        scales = torch.randint(0, 256, (*shape[:-1], -(-k // b)), generator=g, dtype=torch.uint8)
        scales.view(-1)[: min(256, scales.numel())] = torch.arange(min(256, scales.numel()), dtype=torch.uint8)
        gs = torch.tensor(448.0 / 3.7, dtype=torch.float32) if fmt == "nvfp4" else None
        t = aqn_rs.QuantizedTensor(codes, scales, gs, shape, fmt, "f32", "floor" if fmt == "mxfp4" else None)
        want = cpu_quantizer(fmt, "floor").dequantize(t, dtype=dtype)
        for gsv in ([None] if fmt == "mxfp4" else [gs.cuda(), float(gs)]):
            got = _cuda.dequantize(codes.cuda(), scales.cuda(), gsv, shape, fmt, dtype)
            assert_bits_equal(got, want, f"dequantize {fmt} {dtype} {shape} gs={type(gsv).__name__}")
        del rows


@gpu
def test_misaligned_views_take_the_scalar_path():
    """Inputs/outputs that start off a 16-byte boundary (a view at offset 1) still match."""
    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        base = torch.randn(1 + 4 * 64, generator=g).to(dtype).cuda()
        x = base[1:].view(4, 64)
        assert x.data_ptr() % 16 != 0
        for fmt, mode in (("mxfp4", "rceil"), ("nvfp4", "floor")):
            assert_bits_equal(_cuda.fake_quant(x, fmt, mode, None), cpu_fake_quant(x, fmt, mode), f"{fmt} {dtype}")
            assert_bits_equal(_cuda.amax(x), torch.tensor(float(x.float().abs().max().cpu())), "amax")


@gpu
@pytest.mark.parametrize("pdl", (True, False), ids=("pdl", "no_pdl"))
def test_grid_stride_loops(pdl):
    """A small grid: every CTA loops over many vectors/blocks (and builds its rule once);
    with and without the programmatic dependent launch after the amax pass."""
    old = _rs.cuda_set_tuning()
    try:
        _rs.cuda_set_tuning(1, 1, pdl)
        g = torch.Generator().manual_seed(11)
        for dtype in (torch.bfloat16, torch.float32):
            for shape in [(512, 4096), (300, 4097)]:
                x = torch.randn(shape, generator=g).to(dtype).cuda()
                for fmt, mode in (("mxfp4", "floor"), ("nvfp4", "floor")):
                    what = f"{fmt} {dtype} {shape}"
                    assert_bits_equal(_cuda.fake_quant(x, fmt, mode, None), cpu_fake_quant(x, fmt, mode), what)
                codes, scales, gs = _cuda.quantize(x, "nvfp4", "floor", None)
                want = cpu_quantize(x, "nvfp4", "floor")
                assert_bits_equal(codes, want.codes, f"codes {dtype} {shape}")
                assert_bits_equal(scales, want.scales, f"scales {dtype} {shape}")
    finally:
        _rs.cuda_set_tuning(*old)


@gpu
def test_quantizer_api_dispatches_cuda_tensors():
    """The user API sends CUDA tensors here and returns CUDA tensors; its checks of a CUDA
    tensor (done here, on the hot path) say what the CPU path says."""
    x = torch.randn(8, 96, device="cuda", dtype=torch.bfloat16)
    for q in (aqn_rs.Mxfp4Quantizer(scale_mode="even"), aqn_rs.Nvfp4Quantizer()):
        y = q.fake_quant(x)
        assert y.is_cuda and y.dtype == x.dtype and y.shape == x.shape
        assert_bits_equal(y, q.fake_quant(x.cpu()), type(q).__name__)
        t = q.quantize(x)
        assert t.codes.is_cuda
        assert_bits_equal(q.dequantize(t), y, type(q).__name__ + " roundtrip")
        for bad, err, msg in ((x.double(), TypeError, "unsupported dtype"), (x.t(), ValueError, "contiguous"),
                              (x[0, 0], ValueError, "0-d")):
            for dev in ("cuda", "cpu"):
                with pytest.raises(err, match=msg):
                    q.fake_quant(bad.to(dev))


@gpu
def test_exchange_path_equals_attribute_path():
    """fake_quant through the DLPack exchange API (what torch >= 2.10 runs) and through the
    attribute-reading path (torch < 2.10, and the inputs the former declines) agree bit for
    bit, on shapes of 1 to 3 dimensions, views at an offset, empty tensors and Parameters."""
    if getattr(torch.Tensor, "__dlpack_c_exchange_api__", None) is not None:
        assert _cuda._xapi, "torch has the exchange API but _cuda did not register it"
    g = torch.Generator().manual_seed(21)
    base = torch.randn(1 + 3 * 97, generator=g)
    cases = [torch.randn(s, generator=g) for s in ((7,), (3, 33), (2, 3, 64), (0, 32), (4, 0))]
    cases += [base[1:].view(3, 97), torch.nn.Parameter(torch.randn(8, 64, generator=g))]
    amax_t = torch.tensor(2.5, device="cuda")
    for dtype in DTYPES:
        for c in cases:
            x = c.detach().to(dtype).cuda() if not isinstance(c, torch.nn.Parameter) else torch.nn.Parameter(c.detach().to(dtype).cuda())
            for fmt, mode, amax in (("mxfp4", "even", None), ("nvfp4", "floor", None), ("nvfp4", "floor", amax_t), ("nvfp4", "floor", 3.0)):
                what = f"{fmt} {dtype} {tuple(x.shape)} {type(x).__name__}"
                y = _cuda.fake_quant(x, fmt, mode, amax)
                assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device and not y.requires_grad, what
                assert_bits_equal(y, _cuda._fake_quant_attrs(x, fmt, mode, amax), what)
    # A wrong `out` is an error, not a launch.
    x = torch.randn(4, 64, device="cuda")
    for out in (torch.empty(4, 63, device="cuda"), torch.empty(4, 64, device="cuda", dtype=torch.float16),
                torch.empty(64, 4, device="cuda").t(), torch.empty(4, 64)):
        with pytest.raises(ValueError, match="out must be"):
            _rs.cuda_fake_quant_t(x, out, "mxfp4", "floor", 0, None, 0)
    # Declined inputs take the checked path and its messages.
    for bad, err, msg in ((x.double(), TypeError, "unsupported dtype"), (x.t(), ValueError, "contiguous"),
                          (x[0, 0], ValueError, "0-d")):
        assert _rs.cuda_fake_quant_t(bad, torch.empty_like(bad), "mxfp4", "floor", 0, None, 0) is False
        with pytest.raises(err, match=msg):
            _cuda.fake_quant(bad, "mxfp4", "floor", None)


@gpu
def test_cuda_graph_capture_and_replay():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 512, generator=g).to(torch.bfloat16).cuda()
    amax_t = torch.tensor(3.0, device="cuda")
    calls = [
        lambda: _cuda.fake_quant(x, "mxfp4", "floor", None),
        lambda: _cuda.fake_quant(x, "nvfp4", "floor", None),
        lambda: _cuda.fake_quant(x, "nvfp4", "floor", amax_t),
        lambda: _cuda.quantize(x, "nvfp4", "floor", None)[0],
    ]
    for fn in calls:
        fn()  # load the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn() for fn in calls]
    for trial in range(3):
        x.copy_((torch.randn(256, 512, generator=g) * (trial + 1)).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        for i, (fn, o) in enumerate(zip(calls, outs)):
            assert_bits_equal(o, fn(), f"graph replay {trial} call {i}")


@gpu
def test_other_stream_orders_with_torch():
    """Launches go on the current stream: work on a side stream stays ordered."""
    s = torch.cuda.Stream()
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    want = cpu_fake_quant(x, "nvfp4", "floor")
    with torch.cuda.stream(s):
        y = torch.empty_like(x).copy_(x)  # on s
        z = _cuda.fake_quant(y, "nvfp4", "floor", None)
    s.synchronize()
    assert_bits_equal(z, want, "side stream")


@gpu
def test_errors_are_exceptions():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="CPU tensor"):
        _cuda.fake_quant(x.cpu(), "mxfp4", "floor", None)
    with pytest.raises(TypeError):
        _cuda.fake_quant(x.double(), "mxfp4", "floor", None)
    with pytest.raises(ValueError, match="contiguous"):
        _cuda.fake_quant(x.t(), "mxfp4", "floor", None)
    stream = torch.cuda.current_stream().cuda_stream
    # Pointers the Rust side must refuse on its own (bypassing _cuda's checks).
    host = torch.randn(4, 64)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="not CUDA memory|not device memory"):
        _rs.cuda_fake_quant("mxfp4", "floor", "f32", 0, stream, host.data_ptr(), out.data_ptr(), 4, 64, 0, None, 0)
    pinned = host.pin_memory()
    with pytest.raises(ValueError, match="host memory"):
        _rs.cuda_fake_quant("mxfp4", "floor", "f32", 0, stream, pinned.data_ptr(), out.data_ptr(), 4, 64, 0, None, 0)
    # The amax of an empty tensor (the benchmark's launch baseline) checks its output too,
    # and writes 0.0 there.
    with pytest.raises(ValueError, match="host memory"):
        _rs.cuda_amax("f32", 0, stream, 0, 0, 0, pinned.data_ptr())
    _rs.cuda_amax("f32", 0, stream, 0, 0, 0, out.data_ptr())
    torch.cuda.synchronize()
    assert out.view(-1)[0].item() == 0.0
    with pytest.raises(ValueError, match="past the end"):  # past the allocation
        _rs.cuda_fake_quant("mxfp4", "floor", "f32", 0, stream, x.data_ptr(), out.data_ptr(), 1 << 28, 64, 0, None, 0)
    with pytest.raises(ValueError, match="aligned"):
        _rs.cuda_fake_quant("mxfp4", "floor", "f32", 0, stream, x.data_ptr() + 2, out.data_ptr(), 1, 32, 0, None, 0)
    with pytest.raises(ValueError):
        _rs.cuda_fake_quant("mxfp4", "floor", "f32", 99, stream, x.data_ptr(), out.data_ptr(), 4, 64, 0, None, 0)
    with pytest.raises(ValueError, match="global_scale"):
        _cuda.dequantize(*_cuda.quantize(x, "nvfp4", "floor", None)[:2], 0.0, (4, 64), "nvfp4", torch.float32)
    with pytest.raises(ValueError, match="bytes"):
        codes, scales, _ = _cuda.quantize(x, "mxfp4", "floor", None)
        _cuda.dequantize(codes[:2], scales, None, (4, 64), "mxfp4", torch.float32)
    # The caller's context survives every call, failing or not.
    torch.cuda.synchronize()
    assert torch.equal((x + 1).cpu(), x.cpu() + 1)


@two_gpus
def test_second_device_and_wrong_stream():
    x1 = torch.randn(16, 128, device="cuda:1", dtype=torch.bfloat16)
    assert_bits_equal(_cuda.fake_quant(x1, "nvfp4", "floor", None), cpu_fake_quant(x1, "nvfp4", "floor"), "cuda:1")
    assert _cuda.fake_quant(x1, "mxfp4", "floor", None).device == x1.device
    assert_bits_equal(_cuda.amax(x1), torch.tensor(float(x1.float().abs().max().cpu())), "amax cuda:1")
    x0 = torch.randn(16, 128, device="cuda:0", dtype=torch.bfloat16)
    out0 = torch.empty_like(x0)
    s1 = torch.cuda.current_stream(1).cuda_stream
    s1_side = torch.cuda.Stream(device=1).cuda_stream
    for s in (s1_side,) + ((s1,) if s1 != 0 else ()):
        with pytest.raises(ValueError, match="stream"):
            _rs.cuda_fake_quant("mxfp4", "floor", "bf16", 0, s, x0.data_ptr(), out0.data_ptr(), 16, 128, 0, None, 0)
    with pytest.raises(ValueError, match="cuda:1"):
        _rs.cuda_fake_quant("mxfp4", "floor", "bf16", 0, torch.cuda.current_stream(0).cuda_stream,
                            x1.data_ptr(), out0.data_ptr(), 16, 128, 0, None, 0)
    # amax given on the other device is moved over.
    y = _cuda.fake_quant(x0, "nvfp4", "floor", torch.tensor(2.0, device="cuda:1"))
    assert_bits_equal(y, cpu_fake_quant(x0, "nvfp4", "floor", 2.0), "amax from cuda:1")


@gpu
@pytest.mark.skipif(QUICK, reason="multi-GB test skipped in quick mode")
@pytest.mark.parametrize("k", (4096, 4097))
def test_more_than_2_pow_31_elements(k):
    """64-bit indexing: the blocks past element 2^31 match the CPU on those rows."""
    free, _ = torch.cuda.mem_get_info()
    rows = (1 << 31) // k + 2
    if free < 3 * rows * k * 2:
        pytest.skip("not enough GPU memory")
    x = torch.empty(rows, k, device="cuda", dtype=torch.bfloat16)
    x.normal_()
    x[-1, -5] = 1000.0
    tail = x[-2:]
    for fmt, amax in (("mxfp4", None), ("nvfp4", 7.0)):
        y = _cuda.fake_quant(x, fmt, "floor", amax)
        assert_bits_equal(y[-2:], cpu_fake_quant(tail, fmt, "floor", amax), f"{fmt} k={k} tail")
        del y
    codes, scales, _ = _cuda.quantize(x, "mxfp4", "floor", None)
    want = cpu_quantize(tail, "mxfp4", "floor")
    assert_bits_equal(codes[-2:], want.codes, "codes tail")
    assert_bits_equal(scales[-2:], want.scales, "scales tail")
    assert float(_cuda.amax(x)) == 1000.0


@gpu
@pytest.mark.skipif(QUICK, reason="subprocess test skipped in quick mode")
def test_expandable_segments_allocations():
    """torch's expandable segments map one tensor in several pieces: pointer validation must
    walk them."""
    script = textwrap.dedent(
        """
        import torch, aqn_rs
        from aqn_rs import _cuda
        xs = [torch.randn(64 << 20, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for x in xs:
            y = _cuda.fake_quant(x, "nvfp4", "floor", None)
            z = _cuda.fake_quant(x, "mxfp4", "floor", None)
            want = aqn_rs.Nvfp4Quantizer().fake_quant(x[-4096:].cpu(), amax=float(x.float().abs().max()))
            assert torch.equal(y[-4096:].cpu().view(torch.int16), want.view(torch.int16))
            assert torch.equal(z[-4096:].cpu().view(torch.int16), aqn_rs.Mxfp4Quantizer().fake_quant(x[-4096:].cpu()).view(torch.int16))
        print("ok")
        """
    )
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
