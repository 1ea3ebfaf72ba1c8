"""The multi-tensor fake quant (`fake_quant_many`) == one `fake_quant` per tensor with its
group's amax, bit for bit, on the GPU; and the hooks' prefill on CUDA == computing each
weight at its own forward. GPU tests skip themselves without a usable CUDA build and device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
aqn_rs = pytest.importorskip("aqn_rs")
from aqn_rs import _cuda  # noqa: E402

gpu = pytest.mark.skipif(not _cuda.available(), reason="needs the CUDA kernels and a CUDA device")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t):
    return t.view(INT_VIEW[t.dtype])


def tensors(dtype, g, n=9, block=32):
    """Shapes from one block to several chunks, scales 1e-3..1e3, one NaN and one Inf member,
    one empty tensor."""
    shapes = [(1, block), (3, 4 * block), (64, 96), (257, 160), (512, 1024), (0, 64), (1, 8192), (33, 2 * block), (1024, 1536)]
    xs = []
    for i, s in enumerate(shapes[:n]):
        x = torch.randn(s, generator=g, device="cuda") * 10.0 ** ((i % 7) - 3)
        xs.append(x.to(dtype))
    xs[2].view(-1)[17] = float("nan")
    xs[3].view(-1)[5] = float("inf")
    return xs


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_many_equals_per_tensor_with_group_amax(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = tensors(dtype, g)
    q = aqn_rs.Nvfp4Quantizer()
    groups = [0, 1, 1, 2, 0, 3, 4, 1, 5]
    outs, amaxes = q.fake_quant_many(xs, groups=groups, return_amax=True)
    for i, (x, o, a) in enumerate(zip(xs, outs, amaxes)):
        members = [y for y, gg in zip(xs, groups) if gg == groups[i]]
        want_a = q.amax_many(members)
        assert torch.equal(a.view(1).view(torch.int32), want_a.view(1).view(torch.int32)), i
        assert torch.equal(bits(o), bits(q.fake_quant(x, amax=want_a))), i
    for x, o in zip(xs, q.fake_quant_many(xs)):  # each its own amax
        assert torch.equal(bits(o), bits(q.fake_quant(x))), x.shape


@gpu
@pytest.mark.parametrize("mode", ("floor", "rceil", "even", "ceil"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mxfp4_many_equals_per_tensor(dtype, mode):
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = tensors(dtype, g)
    q = aqn_rs.Mxfp4Quantizer(mode)
    for x, o in zip(xs, q.fake_quant_many(xs)):
        assert torch.equal(bits(o), bits(q.fake_quant(x))), x.shape


@gpu
def test_many_batches_past_one_launch():
    """300 tensors (three launches of at most 126), groups of three that must not be split,
    and 130 members in one MXFP4 call."""
    g = torch.Generator(device="cuda").manual_seed(2)
    xs = [torch.randn(16 + 16 * (i % 5), 64, generator=g, device="cuda", dtype=torch.bfloat16) * (1 + i)
          for i in range(300)]
    q = aqn_rs.Nvfp4Quantizer()
    groups = [i // 3 for i in range(300)]
    outs = q.fake_quant_many(xs, groups=groups)
    for i in range(0, 300, 3):
        a = q.amax_many(xs[i:i + 3])
        for j in range(i, i + 3):
            assert torch.equal(bits(outs[j]), bits(q.fake_quant(xs[j], amax=a))), j
    mx = aqn_rs.Mxfp4Quantizer()
    for x, o in zip(xs[:130], mx.fake_quant_many(xs[:130])):
        assert torch.equal(bits(o), bits(mx.fake_quant(x)))


@gpu
def test_many_errors_and_fallbacks():
    x = torch.randn(4, 64, device="cuda")
    q = aqn_rs.Nvfp4Quantizer()
    # the raw call: the vector layout only, and slots in range
    with pytest.raises(ValueError, match="16-element blocks"):
        _cuda.fake_quant_many([torch.randn(4, 24, device="cuda")], "nvfp4", "floor", [0], 1)
    with pytest.raises(ValueError, match="aligned"):
        _cuda.fake_quant_many([x.view(-1)[2:66]], "nvfp4", "floor", [0], 1)
    with pytest.raises(ValueError, match="slot 1 of 1"):
        _cuda.fake_quant_many([x], "nvfp4", "floor", [1], 1)
    with pytest.raises(ValueError, match="share amax slot"):
        _cuda.fake_quant_many([x] * 127, "nvfp4", "floor", [0] * 127, 1)
    with pytest.raises(ValueError, match="one dtype"):
        _cuda.fake_quant_many([x, x.half()], "mxfp4", "floor")
    # the quantizer takes anything fake_quant takes: an odd k or an unaligned view go one by one
    ys = [torch.randn(4, 24, device="cuda"), x.view(-1)[2:66].view(4, 16), x]
    outs, amaxes = q.fake_quant_many(ys, groups=[0, 0, 1], return_amax=True)
    a = q.amax_many(ys[:2])
    assert torch.equal(bits(outs[0]), bits(q.fake_quant(ys[0], amax=a)))
    assert torch.equal(bits(outs[1]), bits(q.fake_quant(ys[1].contiguous(), amax=a)))
    assert torch.equal(bits(outs[2]), bits(q.fake_quant(x)))


@gpu
def test_many_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(3)
    xs = [torch.randn(64, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    q = aqn_rs.Nvfp4Quantizer()
    q.fake_quant_many(xs, groups=[0, 0, 1, 1])  # loads the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = q.fake_quant_many(xs, groups=[0, 0, 1, 1])
    for x in xs:
        x.mul_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    for i, (x, o) in enumerate(zip(xs, outs)):
        a = q.amax_many(xs[2 * (i // 2):2 * (i // 2) + 2])
        assert torch.equal(bits(o), bits(q.fake_quant(x, amax=a))), i


@gpu
@pytest.mark.parametrize("fmt", ("mxfp4", "nvfp4"))
def test_hooks_prefill_on_cuda_equals_per_module(fmt):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    runs = []
    for prefill in (True, False):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).train()
        quant = aqn_rs.Mxfp4Quantizer() if fmt == "mxfp4" else aqn_rs.Nvfp4Quantizer()
        h = aqn_rs.quantize_model(model, quant, prefill=prefill)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        seen = []
        for step in range(3):
            for mb in range(2):
                x = torch.randint(0, 128, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(step * 7 + mb))
                out = model(x, labels=x)
                out.loss.backward()
                seen.append(out.logits.detach().view(torch.int16).clone())
            seen += [p.grad.view(torch.int16).clone() for p in model.parameters() if p.grad is not None]
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((seen, h.cache_stats(), h._prefill.runs if h._prefill else None))
        h.remove()
    (a, sa, ra), (b, sb, _) = runs
    assert ra == 3 and sa == sb
    for x, y in zip(a, b):
        assert torch.equal(x, y)
