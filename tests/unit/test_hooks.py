"""quantize_model: hooked forward == reference-quantized weights, master weights never
written, STE gradients, cache per weight version, remove(), torch.compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import aqn_rs
from aqn_rs import reference as ref

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, tie: bool = False, inter: int = 112):
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    return model


def ids(batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, seq), generator=g)


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def state_bits(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def manual_reference(model, fmt, mode="floor", skip=("lm_head", "embed_tokens"), fused=True):
    """A copy whose selected Linear weights are replaced by reference.py's fake quant. For
    NVFP4 with `fused`, the members of q/k/v and gate/up share the max of their amaxes (vLLM
    keeps one global scale per fused layer)."""
    m = copy.deepcopy(model)
    amax = {}
    if fmt == "nvfp4" and fused:
        for name, mod in m.named_modules():
            for group in FUSED:
                if name.rpartition(".")[2] == group[0]:
                    parent = name.rpartition(".")[0]
                    a = max(float(m.get_submodule(f"{parent}.{g}").weight.detach().abs().max()) for g in group)
                    amax.update({f"{parent}.{g}": a for g in group})
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and not any(name.endswith(s) for s in skip):
                w = mod.weight
                q = ref.mxfp4_fake_quant(w, mode) if fmt == "mxfp4" else ref.nvfp4_fake_quant(w, amax.get(name))
                w.copy_(q)
    return m


QUANTIZERS = [aqn_rs.Mxfp4Quantizer("floor"), aqn_rs.Mxfp4Quantizer("rceil"), aqn_rs.Nvfp4Quantizer()]


@pytest.mark.parametrize("q", QUANTIZERS, ids=repr)
def test_hooked_forward_equals_reference_weights(q):
    model = tiny_llama()
    x = ids()
    want = manual_reference(model, q.format, getattr(q, "scale_mode", "floor"))(x).logits
    h = aqn_rs.quantize_model(model, q)
    got = model(x).logits
    assert torch.equal(bits(got), bits(want))
    rows = {d.name: d for d in h.summary()}
    assert not rows["lm_head"].selected and "lm_head" in rows["lm_head"].rule
    assert not rows["model.embed_tokens"].selected
    assert rows["model.layers.0.self_attn.q_proj"].selected
    assert rows["model.layers.1.mlp.down_proj"].selected
    assert len(h.modules) == 2 * 7
    assert "14 of" in h.format_summary()


def test_nvfp4_per_weight_global_scales_when_not_fused():
    model = tiny_llama()
    x = ids()
    want = manual_reference(model, "nvfp4", fused=False)(x).logits
    h = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer(), fuse_global_scales=False)
    assert torch.equal(bits(model(x).logits), bits(want))
    assert not torch.equal(bits(want), bits(manual_reference(model, "nvfp4")(x).logits))
    h.remove()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_hooked_weights_equal_the_exported_checkpoint(tmp_path, fmt):
    """What the actor trains with is what vLLM would compute from our exported checkpoint."""
    from aqn_rs.export import dequantize_checkpoint, export_checkpoint

    model = tiny_llama(inter=128)  # whole MX blocks: export keeps partial-block layers dense
    q = aqn_rs.Nvfp4Quantizer() if fmt == "nvfp4" else aqn_rs.Mxfp4Quantizer()
    h = aqn_rs.quantize_model(model, q)
    export_checkpoint(model, tmp_path / "ckpt", format=fmt, dtype=None)
    dense = dequantize_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    captured = {}
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        captured["w"] = w.detach().clone()
        return orig(x, w, b)

    for name in h.modules:
        mod = model.get_submodule(name)
        torch.nn.functional.linear = spy
        try:
            with torch.no_grad():
                mod(torch.zeros(1, mod.in_features))
        finally:
            torch.nn.functional.linear = orig
        assert torch.equal(bits(captured["w"]), bits(dense[f"{name}.weight"])), name
    h.remove()


def test_master_weights_never_written_under_no_grad_and_inference_mode():
    model = tiny_llama()
    before = state_bits(model)
    keys = list(model.state_dict())
    h = aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer())
    x = ids()
    for i in range(10):
        with torch.no_grad():
            model(x)
        with torch.inference_mode():
            model(x)
    model.train()
    model(x).logits.sum().backward()  # a training forward/backward, no optimizer step
    after = model.state_dict()
    assert list(after) == keys
    for k in keys:
        assert torch.equal(bits(after[k]), bits(before[k])), k
    h.remove()


def test_ste_gradient_reaches_master_weight():
    model = tiny_llama().train()
    refm = manual_reference(model, "nvfp4").train()
    h = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer())
    x = ids()
    model(x, labels=x).loss.backward()
    refm(x, labels=x).loss.backward()
    for (n, p), (n2, p2) in zip(model.named_parameters(), refm.named_parameters()):
        assert n == n2 and p.grad is not None
        # identity STE: d loss / d master weight == d loss / d quantized weight
        assert torch.equal(p.grad, p2.grad), n
    h.remove()


def test_clipped_ste_zeroes_clipped_elements():
    torch.manual_seed(0)
    w = torch.randn(4, 64, requires_grad=True)
    with torch.no_grad():
        w[0, 0] = 50.0  # block amax; floor scale makes values in (6, 8)*2^e saturate
        w[0, 1] = 49.0
    q = aqn_rs.Mxfp4Quantizer("floor")
    y = aqn_rs.hooks.fake_quant(w, q, ste="clipped")
    y.sum().backward()
    t = q.quantize(w.detach())
    # top of each block's grid: 6 * 2^e, from the E8M0 scale bytes, expanded to elements
    top = (6 * torch.pow(2.0, t.scales.double() - 127)).repeat_interleave(32, dim=1)
    want = (w.detach().double().abs() <= top).float()
    assert w.grad[0, 0] == 0 and w.grad[0, 1] == 0  # 50 and 49 > 6 * 2^3 = 48
    assert torch.equal(w.grad, want)
    assert 0 < (want == 0).sum() < 20  # floor mode clips a few large elements, not many


def test_cache_per_weight_version():
    model = tiny_llama().train()
    h = aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = ids()
    for _ in range(3):  # three micro-batches, one optimizer step
        model(x, labels=x).loss.backward()
    assert h.cache_stats() == {"hits": 2 * 14, "misses": 14}
    opt.step()
    with torch.no_grad():
        y1 = model(x).logits
    assert h.cache_stats()["misses"] == 2 * 14  # the step bumped every weight's version
    with torch.no_grad():  # a write that bypasses the version counter needs invalidate()
        w = model.model.layers[0].mlp.up_proj.weight
        w.data.mul_(0.5)
        h.invalidate()
        model(x)  # recomputes every cached weight
    assert h.cache_stats()["misses"] == 3 * 14
    with torch.no_grad():
        w.data.mul_(2.0)
        h.invalidate()
        assert torch.equal(bits(model(x).logits), bits(y1))
    h.remove()
    with torch.no_grad():
        want = manual_reference(model, "mxfp4")(x).logits
    assert torch.equal(bits(y1), bits(want))


def test_remove_restores_exact_behaviour():
    model = tiny_llama()
    x = ids()
    plain = model(x).logits
    h = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer(), injection_point="both")
    assert not torch.equal(model(x).logits, plain)
    h.remove()
    assert torch.equal(bits(model(x).logits), bits(plain))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_activation_injection_quantizes_linear_inputs():
    lin = torch.nn.Linear(48, 8)
    seq = torch.nn.Sequential(lin)
    x = torch.randn(3, 48)
    h = aqn_rs.quantize_model(seq, aqn_rs.Mxfp4Quantizer(), injection_point="activation", exclude=())
    want = torch.nn.functional.linear(ref.mxfp4_fake_quant(x), lin.weight, lin.bias)
    assert torch.equal(seq(x), want)
    h.remove()
    h = aqn_rs.quantize_model(seq, aqn_rs.Mxfp4Quantizer(), injection_point="both", exclude=())
    want = torch.nn.functional.linear(ref.mxfp4_fake_quant(x), ref.mxfp4_fake_quant(lin.weight), lin.bias)
    assert torch.equal(seq(x), want)


def test_tied_embeddings_and_include_patterns():
    model = tiny_llama(tie=True)
    h = aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer(), include=["re:.*mlp.*"])
    assert sorted(h.modules) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down"))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="injection_point"):
        aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer(), injection_point="input")
    with pytest.raises(ValueError, match="ste"):
        aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer(), ste="smooth")
    with pytest.raises(TypeError, match="quantizer"):
        aqn_rs.quantize_model(model, "mxfp4")
    with pytest.raises(ValueError, match="rmsnorm|AqnNoise"):
        aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer(), layer_types=("rmsnorm",))
    h = aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer())
    with pytest.raises(ValueError, match="already"):
        aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer())
    h.remove()


def test_torch_compile_fullgraph_matches_eager():
    model = tiny_llama()
    x = ids()
    h = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer())
    eager = model(x).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x).logits
    assert torch.equal(bits(got), bits(eager))
    h.remove()


# ---- AQN in the training forward ------------------------------------------------------------


def _noised_reference(model, noise, step, quantized=None):
    """Copy of `model` with the selected weights replaced by (Q(w) or w) + noise_for(step)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name and noise.selects(name, mod):
                w = mod.weight
                base = ref.nvfp4_fake_quant(w) if quantized and name in quantized else w.clone()
                w.copy_(base + noise.noise_for(name, w, step))
    return m


def test_attach_noise_rmsnorm_actor_mode():
    model = tiny_llama().train()
    before = state_bits(model)
    sched = aqn_rs.SigmaScheduler(0.05, 5e-4, 10, 100)
    noise = aqn_rs.AqnNoise(sched, layer_types=("rmsnorm",), apply_to="actor", seed=3)
    h = aqn_rs.attach_noise(model, noise)
    assert len(h.modules) == 2 * 2 + 1  # two norms per layer and the final norm
    x = ids()
    noise.set_step(0)  # stage 0: sigma 0, no noise
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m.__dict__.pop("forward", None)
    assert torch.equal(model(x).logits, plain(x).logits)
    noise.set_step(40)
    assert noise.sigma() > 0
    want = _noised_reference(plain, noise, 40)(x).logits
    got = model(x).logits
    assert torch.equal(bits(got), bits(want))
    model.eval()  # validation draws no noise
    assert torch.equal(model(x).logits, plain.eval()(x).logits)
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(before[k])), k
    h.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_attach_noise_on_quantized_linear_is_q_plus_n_and_grads_flow():
    model = tiny_llama().train()
    qh = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer(), fuse_global_scales=False)
    noise = aqn_rs.AqnNoise(aqn_rs.SigmaScheduler(1e-3, 1e-5, 10, 50), layer_types=("linear",), seed=1)
    nh = aqn_rs.attach_noise(model, noise)
    assert sorted(nh.modules) == sorted(qh.modules)
    noise.set_step(20)
    x = ids()
    plain = copy.deepcopy(model)
    for m in plain.modules():
        for k in ("forward", "_aqn_rs_noise", "_aqn_rs_handle", "_aqn_rs_noise_handle"):
            m.__dict__.pop(k, None)
    want = _noised_reference(plain, noise, 20, quantized=set(qh.modules))(x).logits
    got = model(x, labels=x)
    assert torch.equal(bits(got.logits), bits(want))
    got.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "proj" in n)
    nh.remove()
    qh.remove()


def test_attach_noise_errors():
    model = tiny_llama()
    rollout_only = aqn_rs.AqnNoise(aqn_rs.SigmaScheduler(0.05, 5e-4, 10, 100), apply_to="rollout")
    with pytest.raises(ValueError, match="apply_to"):
        aqn_rs.attach_noise(model, rollout_only)
    none = aqn_rs.AqnNoise(aqn_rs.SigmaScheduler(0.05, 5e-4, 10, 100), include=["nothing_here"])
    with pytest.raises(ValueError, match="selects no module"):
        aqn_rs.attach_noise(model, none)
    with pytest.raises(TypeError, match="AqnNoise"):
        aqn_rs.attach_noise(model, object())
    lin_noise = aqn_rs.AqnNoise(aqn_rs.SigmaScheduler(1e-3, 1e-5, 10, 50), layer_types=("linear",))
    h = aqn_rs.attach_noise(model, lin_noise)
    with pytest.raises(ValueError, match="before attach_noise"):
        aqn_rs.quantize_model(model, aqn_rs.Mxfp4Quantizer())
    h.remove()


@pytest.mark.parametrize("reentrant", (False, True))
@pytest.mark.parametrize("fmt", ("mxfp4", "nvfp4"))
def test_cached_ste_under_gradient_checkpointing_and_micro_batches(fmt, reentrant):
    """The cached weight's STE link (one per weight version, reused by every micro-batch and by
    checkpointing's recomputed forward) gives the gradients of the uncached op, bit for bit:
    three micro-batches with gradient checkpointing (reentrant: the first forward runs under
    no_grad and the recompute under grad; non-reentrant: saved-tensor hooks), two optimizer
    steps, so the link is rebuilt after each."""
    quant = (lambda: aqn_rs.Mxfp4Quantizer()) if fmt == "mxfp4" else aqn_rs.Nvfp4Quantizer
    runs = []
    for cache in (True, False):
        model = tiny_llama().train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        h = aqn_rs.quantize_model(model, quant(), cache=cache)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        grads = []
        for step in range(2):
            for mb in range(3):
                x = ids(seed=10 * step + mb)
                model(x, labels=x).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((grads, h.cache_stats()))
        h.remove()
    (cached, stats), (uncached, _) = runs
    assert stats["hits"] > 0  # the cached run did reuse weights across micro-batches
    for a, b in zip(cached, uncached):
        assert sorted(a) == sorted(b) and len(a) > 10
        for n in a:
            assert torch.equal(bits(a[n]), bits(b[n])), n


@pytest.mark.parametrize("fmt", ("mxfp4", "nvfp4"))
def test_prefill_equals_per_module_fake_quant(fmt):
    """The prefill (every changed weight fake-quantized at the first forward after a step)
    gives the bits, gradients and cache counts of computing each at its own forward: two
    steps of three micro-batches, a partial update (one weight of a fused group changed, so
    its group is refreshed and nothing else), invalidate(), and no_grad in between."""
    quant = (lambda: aqn_rs.Mxfp4Quantizer("even")) if fmt == "mxfp4" else aqn_rs.Nvfp4Quantizer
    runs = []
    for prefill in (True, False):
        model = tiny_llama().train()
        h = aqn_rs.quantize_model(model, quant(), prefill=prefill)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        seen = []
        for step in range(2):
            for mb in range(3):
                x = ids(seed=10 * step + mb)
                out = model(x, labels=x)
                out.loss.backward()
                seen.append(bits(out.logits.detach()).clone())
            seen += [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            seen.append(bits(model(ids(seed=97)).logits).clone())  # after the last step
        stats_steps = h.cache_stats()
        with torch.no_grad():
            model.model.layers[1].self_attn.k_proj.weight.add_(0.25)  # one member of q/k/v
            seen.append(bits(model(ids(seed=99)).logits).clone())
            refreshed = h.cache_stats()["misses"] - stats_steps["misses"]
            h.invalidate()
            seen.append(bits(model(ids(seed=98)).logits).clone())
        runs.append((seen, stats_steps, refreshed, h.cache_stats(), h._prefill))
        h.remove()
    (a, st_a, ref_a, end_a, pre), (b, st_b, ref_b, end_b, none) = runs
    assert none is None and pre is not None
    assert pre.runs == 5  # two steps' first forwards, the step before the edit, the edit, invalidate
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert st_a == st_b == {"hits": 2 * 2 * 14, "misses": 3 * 14}
    assert ref_a == ref_b == (3 if fmt == "nvfp4" else 1)  # the group, or k_proj alone
    assert end_a == end_b


def test_prefill_leaves_unready_weights_to_their_forward():
    """A weight the prefill does not take (an inference tensor here) is computed by its own
    forward, every time, and the others are still prefilled once per version."""
    model = tiny_llama().eval()
    h = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer(), prefill=True)
    down = model.model.layers[0].mlp.down_proj
    with torch.inference_mode():
        w_inf = down.weight.detach().clone()
    del down._parameters["weight"]
    down.weight = w_inf  # an inference tensor as the weight (no version counter)
    x = ids()
    with torch.no_grad():
        y = model(x).logits
        model(x)
    assert h._prefill.runs == 1
    stats = h.cache_stats()
    assert stats["misses"] == 13 + 2  # 13 cached once, the inference weight at both forwards
    h.remove()
    with torch.no_grad():
        want = manual_reference(model, "nvfp4")(x).logits
    assert torch.equal(bits(y), bits(want))


def test_fake_quant_many_cpu_equals_fake_quant_per_group():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 64, generator=g) * s for s in (1.0, 30.0, 0.01, 4.0)]
    xs[2][0, 5] = float("nan")
    q = aqn_rs.Nvfp4Quantizer()
    outs, amaxes = q.fake_quant_many(xs, groups=["a", "b", "a", "c"], return_amax=True)
    assert math.isnan(amaxes[0]) and math.isnan(amaxes[2]) and amaxes[1] == float(xs[1].abs().max())
    for x, o, a in zip(xs, outs, amaxes):
        assert torch.equal(bits(o), bits(q.fake_quant(x, amax=a)))
    for x, o in zip(xs, q.fake_quant_many(xs)):  # no groups: each its own amax
        assert torch.equal(bits(o), bits(q.fake_quant(x)))
    mx = aqn_rs.Mxfp4Quantizer("rceil")
    for x, o in zip(xs, mx.fake_quant_many(xs)):
        assert torch.equal(bits(o), bits(mx.fake_quant(x)))
    with pytest.raises(ValueError, match="2 group labels"):
        q.fake_quant_many(xs, groups=[0, 1])
    assert q.fake_quant_many([]) == [] and mx.fake_quant_many([]) == []
