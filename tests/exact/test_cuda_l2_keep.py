"""The L2 eviction hints of the NVFP4 amax pass and the kernel after it
(`cuda_set_tuning(l2_keep_bytes=)`) change no bit: fake quant, quantize and the multi-tensor
fake quant with the hints on equal the CPU kernels (and the hint-free CUDA run) for budgets
of nothing, less than one vector, part of a tensor, part of a launch and more than everything.
GPU tests skip themselves without a usable CUDA build and device; the knob's plumbing is also
checked without one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
aqn_rs = pytest.importorskip("aqn_rs")
from aqn_rs import _aqn_rs as _rs  # noqa: E402
from aqn_rs import _cuda  # noqa: E402

gpu = pytest.mark.skipif(not _cuda.available(), reason="needs the CUDA kernels and a CUDA device")
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# Bytes: none, under one 16-byte vector, one vector, 48 KiB (part of one amax chunk row of
# CTAs), 3 MiB (part of the larger tensors), and more than any launch here.
BUDGETS = (0, 8, 16, 48 << 10, 3 << 20, 1 << 40)


def bits(t):
    """The raw bits of a float tensor as integers (other dtypes, e.g. FP8 scales, as bytes)."""
    return t.view(INT_VIEW.get(t.dtype, torch.uint8))


@pytest.fixture
def keep():
    """Sets the budget for one test and restores every knob after it."""
    old = _rs.cuda_set_tuning()
    try:
        yield lambda b: _rs.cuda_set_tuning(l2_keep_bytes=b)
    finally:
        _rs.cuda_set_tuning(*old)


def test_knob_without_the_kernels_says_so():
    """Without the kernels the knob raises like every CUDA function; with them it returns
    the five values in force, the budget last."""
    if not _rs.cuda_built():
        with pytest.raises(RuntimeError, match="CUDA"):
            _rs.cuda_set_tuning(l2_keep_bytes=1 << 20)
        return
    old = _rs.cuda_set_tuning()
    try:
        got = _rs.cuda_set_tuning(l2_keep_bytes=5 << 20)
        assert len(got) == 5 and got[4] == 5 << 20 and got[:4] == old[:4]
    finally:
        _rs.cuda_set_tuning(*old)
    assert _rs.cuda_set_tuning() == old


@gpu
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_fake_quant_and_quantize_incl_amax_keep_their_bits(keep, dtype, budget):
    g = torch.Generator().manual_seed(budget % 1000 + 7)
    shapes = [(4096, 1024), (257, 160), (3, 64)]
    xs = [(torch.randn(s, generator=g) * 10.0 ** (i - 1)).to(dtype) for i, s in enumerate(shapes)]
    xs[1].view(-1)[33] = float("nan")
    xs[2].view(-1)[0] = float("-inf")
    plain = [(_cuda.fake_quant(x.cuda(), "nvfp4", "floor", None), _cuda.quantize(x.cuda(), "nvfp4", "floor", None))
             for x in xs]
    keep(budget)
    for x, (want_fq, want_q) in zip(xs, plain):
        xc = x.cuda()
        assert torch.equal(bits(_cuda.fake_quant(xc, "nvfp4", "floor", None)), bits(want_fq)), (x.shape, budget)
        for got, want in zip(_cuda.quantize(xc, "nvfp4", "floor", None), want_q):  # codes, scales, gs
            assert got.dtype == want.dtype and torch.equal(bits(got), bits(want)), (x.shape, budget)
    # The CPU kernels agree (so the hint-free CUDA run above is not the only reference).
    cpu = aqn_rs.Nvfp4Quantizer().fake_quant(xs[0])
    assert torch.equal(bits(_cuda.fake_quant(xs[0].cuda(), "nvfp4", "floor", None).cpu()), bits(cpu))


@gpu
@pytest.mark.parametrize("budget", BUDGETS)
def test_fake_quant_many_keeps_its_bits(keep, budget):
    """Groups across several launches (the batch cap on too), each with the hints on."""
    g = torch.Generator(device="cuda").manual_seed(5)
    xs = [torch.randn(16 + 64 * (i % 7), 128, generator=g, device="cuda", dtype=torch.bfloat16) * (1 + i)
          for i in range(140)]
    xs[9].view(-1)[3] = float("nan")
    q = aqn_rs.Nvfp4Quantizer()
    groups = [i // 2 for i in range(140)]
    want = q.fake_quant_many(xs, groups=groups)
    keep(budget)
    for cap in (0, 1 << 20):  # the fixture restores the cap too
        _rs.cuda_set_tuning(many_batch_bytes=cap)
        got = q.fake_quant_many(xs, groups=groups)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(bits(a), bits(b)), (i, budget, cap)
