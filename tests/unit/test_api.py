"""The public API's contract: types, shapes and dtypes back, packed layout, and clear Python
exceptions (never a crash) for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aqn_rs
from aqn_rs import _aqn_rs

QUANTIZERS = [aqn_rs.Mxfp4Quantizer(m) for m in aqn_rs.SCALE_MODES] + [aqn_rs.Nvfp4Quantizer()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("q", QUANTIZERS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5,), (3, 40), (2, 3, 17), (0, 16), (4, 0)])
def test_same_type_shape_dtype_back(q, dtype, shape):
    x = torch.randn(shape).to(dtype)
    y = q.fake_quant(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == dtype
    assert y.data_ptr() != x.data_ptr() or x.numel() == 0
    t = q.quantize(x)
    k = shape[-1]
    assert tuple(t.codes.shape) == (*shape[:-1], (k + 1) // 2) and t.codes.dtype == torch.uint8
    assert tuple(t.scales.shape) == (*shape[:-1], -(-k // q.block_size)) and t.scales.dtype == torch.uint8
    assert t.shape == tuple(shape) and t.format == q.format
    if q.format == "nvfp4":
        assert isinstance(t.global_scale, torch.Tensor) and t.global_scale.dtype == torch.float32
        assert t.global_scale.dim() == 0
    else:
        assert t.global_scale is None
    back = q.dequantize(t)
    assert back.dtype == dtype and back.shape == x.shape
    assert torch.equal(bits(back), bits(y))
    assert q.dequantize(t, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("q", QUANTIZERS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_in_numpy_out(q, dtype):
    x = np.random.default_rng(0).standard_normal((7, 33)).astype(dtype)
    y = q.fake_quant(x)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
    # numpy and torch inputs give the same bits
    yt = q.fake_quant(torch.from_numpy(x.copy()))
    assert np.array_equal(y.view(np.uint16 if dtype == np.float16 else np.uint32),
                          yt.numpy().view(np.uint16 if dtype == np.float16 else np.uint32))
    t = q.quantize(x)
    assert isinstance(t.codes, np.ndarray) and t.codes.dtype == np.uint8
    if q.format == "nvfp4":
        assert isinstance(t.global_scale, np.float32)
    back = q.dequantize(t)
    assert isinstance(back, np.ndarray) and back.dtype == dtype
    assert np.array_equal(back.view(np.uint8), y.view(np.uint8))


def test_input_not_modified_and_grad_ignored():
    x = torch.randn(8, 64, requires_grad=True)
    before = x.detach().clone()
    y = aqn_rs.Nvfp4Quantizer().fake_quant(x)
    assert torch.equal(x.detach(), before)
    assert not y.requires_grad


def test_caller_storage_stays_resizable():
    # Tensor.numpy() would pin the storage's size for good (FSDP2 frees unsharded params by
    # resizing storage to 0); the core reads through a plain pointer view instead.
    x = torch.randn(4, 64)
    for q in QUANTIZERS:
        q.fake_quant(x)
        q.dequantize(q.quantize(x))
    assert x.untyped_storage().resizable()
    x.untyped_storage().resize_(0)


def test_mixed_device_quantized_tensor_is_an_error():
    q = aqn_rs.Mxfp4Quantizer()
    t = q.quantize(torch.randn(2, 32))
    bad = aqn_rs.QuantizedTensor(t.codes, t.scales.to("meta"), None, t.shape, "mxfp4")
    with pytest.raises(ValueError, match="CPU tensor"):
        q.dequantize(bad)


def test_packing_low_nibble_first():
    # Block amax 6 -> MX scale 2^0 with floor: elements are their own codes.
    x = torch.tensor([[6.0, 0.5, -1.0, 3.0, 0.0]])
    t = aqn_rs.Mxfp4Quantizer("floor").quantize(x)
    assert t.scales.tolist() == [[127]]
    assert t.codes.tolist() == [[0x7 | (0x1 << 4), 0xA | (0x5 << 4), 0x0]]


def test_nvfp4_amax_forms_agree():
    x = torch.randn(4, 48)
    n = aqn_rs.Nvfp4Quantizer()
    a = float(x.abs().max())
    assert n.amax(x) == a
    ref = n.fake_quant(x)
    for amax in (a, torch.tensor(a), np.float32(a), torch.tensor([a])):
        assert torch.equal(bits(n.fake_quant(x, amax=amax)), bits(ref))
    # A smaller amax saturates more but still runs; a larger one changes the scales.
    assert not torch.equal(n.fake_quant(x, amax=a * 10), ref)
    assert n.global_scale(6.0) == 448.0


def test_nan_inf_blocks_become_nan_and_rest_is_untouched():
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    for q in QUANTIZERS:
        y = q.fake_quant(x)
        b = q.block_size
        assert torch.isnan(y[0, :b]).all() and not torch.isnan(y[0, b:]).any()
        blk = 40 // b
        assert torch.isnan(y[1, blk * b:(blk + 1) * b]).all()
        assert not torch.isnan(y[1, :blk * b]).any()


def test_quantizers_are_plain_keyword_objects():
    q = aqn_rs.Mxfp4Quantizer(scale_mode="rceil")
    assert q == aqn_rs.Mxfp4Quantizer(**q.config()) and "rceil" in repr(q)
    assert aqn_rs.Nvfp4Quantizer() == aqn_rs.Nvfp4Quantizer(**aqn_rs.Nvfp4Quantizer().config())
    assert len({aqn_rs.Mxfp4Quantizer("floor"), aqn_rs.Mxfp4Quantizer("floor")}) == 1


def test_build_info():
    info = aqn_rs.build_info()
    assert info["version"] == aqn_rs.__version__ == "0.1.0"
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], list)
    assert info["cpu_threads"] >= 1


def test_cli_without_torch():
    """torch is an optional dependency: `aqn-rs info` works without it, and `aqn-rs export`
    says what it needs in one line."""
    import json
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from aqn_rs.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    info = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["version"] == aqn_rs.__version__
    exp = subprocess.run([sys.executable, "-c", code, "export", "m", "out"], capture_output=True, text=True, timeout=120)
    assert exp.returncode == 2 and exp.stderr.strip() == "aqn-rs: error: export needs torch: pip install torch"


# ---- bad input: a Python exception with a useful message, never a crash -------------------


@pytest.mark.parametrize("q", QUANTIZERS, ids=repr)
def test_bad_inputs(q):
    with pytest.raises(TypeError, match="float32, torch.bfloat16 or torch.float16"):
        q.fake_quant(torch.zeros(4, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="unsupported dtype"):
        q.fake_quant(torch.zeros(4, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="numpy has no bfloat16|float32 or float16"):
        q.fake_quant(np.zeros((4, 32), np.float64))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        q.fake_quant([1.0, 2.0])
    with pytest.raises(ValueError, match="0-d"):
        q.fake_quant(torch.tensor(1.0))
    with pytest.raises(ValueError, match="0-d"):
        q.fake_quant(np.array(1.0, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        q.fake_quant(torch.randn(32, 16).t())
    with pytest.raises(ValueError, match="contiguous"):
        q.fake_quant(np.random.rand(32, 16).astype(np.float32).T)
    with pytest.raises(ValueError, match="device"):
        q.fake_quant(torch.empty(4, 32, device="meta"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale_mode"):
        aqn_rs.Mxfp4Quantizer("nearest")
    n = aqn_rs.Nvfp4Quantizer()
    with pytest.raises(ValueError, match="amax must be >= 0"):
        n.fake_quant(torch.randn(4, 16), amax=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        n.fake_quant(torch.randn(4, 16), amax=torch.ones(3))
    with pytest.raises(TypeError, match="amax"):
        n.fake_quant(torch.randn(4, 16), amax="big")
    t = n.quantize(torch.randn(4, 16))
    with pytest.raises(ValueError, match="nvfp4"):
        aqn_rs.Mxfp4Quantizer().dequantize(t)
    bad = aqn_rs.QuantizedTensor(t.codes[:, :3], t.scales, t.global_scale, t.shape, "nvfp4")
    with pytest.raises(ValueError, match="do not match"):
        n.dequantize(bad)
    with pytest.raises(ValueError, match="global_scale"):
        n.dequantize(aqn_rs.QuantizedTensor(t.codes, t.scales, torch.tensor(0.0), t.shape, "nvfp4"))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        n.dequantize(t.codes)
    with pytest.raises(TypeError, match="bfloat16"):
        n.dequantize(n.quantize(np.ones((2, 16), np.float32)), dtype="bf16")


def test_non_finite_inputs_do_not_crash():
    for v in (float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-45):
        x = torch.full((3, 50), v)
        for q in QUANTIZERS:
            y = q.fake_quant(x)
            assert y.shape == x.shape


def test_huge_last_dimension_rejected_before_any_work():
    # 2^31 + 1 f16 elements: 4 GiB of untouched (lazily mapped) memory per buffer; the core
    # refuses the shape before reading or writing any of it.
    k = 2**31 + 1
    x = np.empty((1, k), np.uint16)
    out = np.empty((1, k), np.uint16)
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        _aqn_rs.mxfp4_fake_quant(x, out, "f16", "floor")
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        _aqn_rs.nvfp4_fake_quant(x, out, "f16", None)


def test_low_level_binding_validates():
    x = np.zeros((2, 32), np.float32)
    with pytest.raises(TypeError, match="dtype"):
        _aqn_rs.mxfp4_fake_quant(x, np.zeros((2, 32), np.float32), "f64", "floor")
    with pytest.raises(ValueError, match="does not match"):
        _aqn_rs.mxfp4_fake_quant(x, np.zeros((2, 31), np.float32), "f32", "floor")
    with pytest.raises(TypeError, match="uint16"):
        _aqn_rs.mxfp4_fake_quant(x, np.zeros((2, 32), np.float32), "bf16", "floor")
    with pytest.raises(ValueError, match="codes: expected 32 elements"):
        _aqn_rs.mxfp4_quantize(x, "f32", "floor", np.zeros(31, np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="cannot write|read-only|writeable"):
        ro = np.zeros((2, 32), np.float32)
        ro.flags.writeable = False
        _aqn_rs.mxfp4_fake_quant(x, ro, "f32", "floor")
    with pytest.raises(ValueError):  # input and output the same buffer: refused, not raced
        _aqn_rs.mxfp4_fake_quant(x, x, "f32", "floor")
