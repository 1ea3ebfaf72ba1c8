"""The straight-through estimator survives every forward mode and every interleaving.

The weight cache of `quantize_model` serves one fake-quantized weight to all forwards between
two weight updates. If a value computed under `inference_mode` (an inference tensor) or inside
some other context were handed to a training forward, the weight would silently get no
gradient. These tests drive the cached hooks and an *uncached reference* through the same
random sequences of forwards (train, eval, no_grad, inference_mode, autocast), backwards,
optimizer steps, in-place weight edits and `invalidate()`, and require after every step:

* every gradient (quantized weights, biases, norms) equal to the reference's bit for bit,
* the master weights equal to the reference's bit for bit (never written by the hooks),
* every forward's output equal to the reference's bit for bit.

The reference recomputes the fake quant from the current weight on every call with the
pure-torch `aqn_rs.reference` (independent of the Rust/CUDA core) inside its own autograd
Function (identity STE, or the clipped STE's mask from the reference's own block scales), and
adds AQN noise as `weight + noise_for(name, weight, step)`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import aqn_rs
from aqn_rs import reference as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

CUDA = torch.cuda.is_available()


# ---- models ---------------------------------------------------------------------------------


class Attn(torch.nn.Module):
    def __init__(self, d: int, kv: int):
        super().__init__()
        self.q_proj = torch.nn.Linear(d, d, bias=True)
        self.k_proj = torch.nn.Linear(d, kv, bias=False)
        self.v_proj = torch.nn.Linear(d, kv, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        rep = q.shape[-1] // k.shape[-1]
        gate = torch.sigmoid(k).repeat_interleave(rep, dim=-1)
        return self.o_proj(q * gate + v.repeat_interleave(rep, dim=-1))


class Mlp(torch.nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, f, bias=False)
        self.up_proj = torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(torch.nn.Module):
    def __init__(self, d: int, kv: int, f: int):
        super().__init__()
        self.input_layernorm = torch.nn.RMSNorm(d, eps=1e-6)
        self.self_attn = Attn(d, kv)
        self.post_attention_layernorm = torch.nn.RMSNorm(d, eps=1e-6)
        self.mlp = Mlp(d, f)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Tiny(torch.nn.Module):
    """Llama-shaped names (fused q/k/v and gate/up groups, RMSNorms, an excluded lm_head) at a
    size where one forward+backward takes well under a millisecond. f=48 gives MXFP4 a
    partial block along in_features of down_proj."""

    def __init__(self, d: int = 32, kv: int = 16, f: int = 48, layers: int = 2, out: int = 24):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(d, kv, f) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(d, eps=1e-6)
        self.lm_head = torch.nn.Linear(d, out, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def tiny(seed: int = 0, device: str = "cpu") -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 2:
                # heavy-tailed rows: blocks whose max sits far above the rest exercise clipping
                p.mul_(1.0 + 3.0 * (torch.rand_like(p) < 0.03))
    return m.to(device)


# ---- the uncached reference -----------------------------------------------------------------


def _ref_block_top(w: torch.Tensor, fmt: str, mode: str, amax) -> torch.Tensor:
    """6 x the decoded block scale per element, from the reference's own quantize (on the CPU,
    see `_RefSTE`)."""
    x = w.detach().cpu()
    if fmt == "mxfp4":
        _, s = ref.mxfp4_quantize(x, mode)
        d = ref.e8m0_decode(s)
        block = ref.MX_BLOCK
    else:
        _, s, gs = ref.nvfp4_quantize(x, amax)
        d = ref.e4m3_decode(s) / gs
        block = ref.NV_BLOCK
    return (6.0 * d).repeat_interleave(block, dim=-1)[..., : x.shape[-1]].to(w.device)


class _RefSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, fmt, mode, ste, amax):
        ctx.ste = ste
        if ste == "clipped":
            ctx.fmt, ctx.mode, ctx.amax = fmt, mode, amax
            ctx.save_for_backward(w)
        # The reference runs on the CPU whatever the weight's device: on CUDA, torch computes
        # `tensor / scalar` as a multiplication by the reciprocal, which is not IEEE division,
        # so the pure-torch reference is bit-exact only on the CPU.
        x = w.detach().cpu()
        q = ref.mxfp4_fake_quant(x, mode) if fmt == "mxfp4" else ref.nvfp4_fake_quant(x, amax)
        return q.to(w.device)

    @staticmethod
    def backward(ctx, grad):
        if ctx.ste == "identity":
            return grad, None, None, None, None
        (w,) = ctx.saved_tensors
        keep = w.abs() <= _ref_block_top(w, ctx.fmt, ctx.mode, ctx.amax)
        return grad * keep.to(grad.dtype), None, None, None, None


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def reference_hooks(model, fmt: str, mode: str, ste: str, noise=None, linear_noise: bool = False,
                    skip=("lm_head",)):
    """Patch `model` in place: every Linear but `skip` computes with `_RefSTE` of its current
    weight (NVFP4: the fused group's amax, read from the members' current weights); with
    `noise`, RMSNorms (and with `linear_noise` the quantized Linears) add `noise_for` of the
    current step in training mode."""
    mods = dict(model.named_modules())

    def group_of(name):
        parent, _, leaf = name.rpartition(".")
        for g in FUSED:
            if leaf in g:
                return [mods[f"{parent}.{m}"] for m in g if f"{parent}.{m}" in mods]
        return None

    for name, mod in mods.items():
        if isinstance(mod, torch.nn.Linear) and not any(name.endswith(s) for s in skip):
            members = group_of(name) if fmt == "nvfp4" else None

            def fwd(x, mod=mod, name=name, members=members):
                amax = None
                if members:
                    amax = max(float(m.weight.detach().abs().amax()) for m in members)
                w = _RefSTE.apply(mod.weight, fmt, mode, ste, amax)
                if linear_noise and noise is not None and mod.training and noise.sigma() != 0.0:
                    w = w + noise.noise_for(name, mod.weight)
                return F.linear(x, w, mod.bias)

            mod.forward = fwd
        elif noise is not None and type(mod).__name__.endswith("RMSNorm") and name != "norm":
            def fwd(x, mod=mod, name=name):
                w = mod.weight
                if mod.training and noise.sigma() != 0.0:
                    w = w + noise.noise_for(name, w)
                return F.rms_norm(x, mod.normalized_shape, w, mod.eps)

            mod.forward = fwd
    return model


# ---- the pair under test --------------------------------------------------------------------


QUANTIZERS = {
    "nvfp4": lambda: aqn_rs.Nvfp4Quantizer(),
    "mxfp4-floor": lambda: aqn_rs.Mxfp4Quantizer("floor"),
    "mxfp4-rceil": lambda: aqn_rs.Mxfp4Quantizer("rceil"),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32) if t.dtype == torch.float32 else t.detach().view(torch.int16)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


class Pair:
    """The model under test (cached hooks) and the reference, driven in lockstep."""

    def __init__(self, qname: str = "nvfp4", ste: str = "identity", aqn: str = "off", seed: int = 0,
                 device: str = "cpu", compile_model: bool = False, prefill: bool = False):
        self.device = device
        q = QUANTIZERS[qname]()
        self.fmt, self.mode = q.format, getattr(q, "scale_mode", "floor")
        self.test = tiny(seed, device)
        self.ref = copy.deepcopy(self.test)
        self.noise = self.noise_ref = None
        if aqn != "off":
            sched = dict(sigma_start=0.02, sigma_end=0.002, num_stages=3, total_steps=6)
            layer_types = ("rmsnorm", "linear") if aqn == "norm+linear" else ("rmsnorm",)
            kw = dict(layer_types=layer_types, apply_to="actor", seed=seed + 7, exclude=("norm", "lm_head"))
            self.noise = aqn_rs.AqnNoise(sched, **kw)
            self.noise_ref = aqn_rs.AqnNoise(sched, **kw)
        self.handle = aqn_rs.quantize_model(self.test, q, ste=ste, exclude=("lm_head",), prefill=prefill)
        self.noise_handle = aqn_rs.attach_noise(self.test, self.noise) if self.noise is not None else None
        reference_hooks(self.ref, self.fmt, self.mode, ste, self.noise_ref, linear_noise=aqn == "norm+linear")
        self.run = torch.compile(self.test, backend="aot_eager") if compile_model else self.test
        self.opt = torch.optim.SGD(self.test.parameters(), lr=0.05, momentum=0.9)
        self.opt_ref = torch.optim.SGD(self.ref.parameters(), lr=0.05, momentum=0.9)
        self.step = 0
        self.batch = 0
        self.log = []

    def x(self) -> torch.Tensor:
        self.batch += 1
        g = torch.Generator().manual_seed(1000 + self.batch)
        return torch.randn(3, 5, 32, generator=g).to(self.device)

    def _both(self, ctx, train: bool, backward: bool):
        x = self.x()
        outs = []
        for m, run in ((self.test, self.run), (self.ref, self.ref)):
            m.train(train)
            with ctx():
                y = run(x)
                if backward:
                    (y.float().square().mean() + y.float().mean()).backward()
            outs.append(y)
        assert same(outs[0], outs[1]), f"forward outputs differ after {self.log}"
        return outs

    # the operations ------------------------------------------------------------------------
    def train_backward(self):
        self.log.append("train")
        self._both(torch.enable_grad, True, True)
        self.check_grads()

    def autocast_backward(self):
        self.log.append("autocast")
        dt = torch.bfloat16
        self._both(lambda: torch.autocast(self.device, dtype=dt), True, True)
        self.check_grads()

    def eval_forward(self):
        self.log.append("eval")
        self._both(torch.enable_grad, False, False)

    def eval_backward(self):
        self.log.append("eval-bwd")  # log-prob passes with grad in eval mode (no noise)
        self._both(torch.enable_grad, False, True)
        self.check_grads()

    def no_grad_forward(self, train: bool):
        self.log.append(f"no_grad-{'train' if train else 'eval'}")
        self._both(torch.no_grad, train, False)

    def inference_forward(self, train: bool):
        self.log.append(f"inference-{'train' if train else 'eval'}")
        self._both(torch.inference_mode, train, False)

    def optimizer_step(self):
        self.log.append("step")
        for o in (self.opt, self.opt_ref):
            o.step()
            o.zero_grad(set_to_none=True)
        self.step += 1
        if self.noise is not None:
            self.noise.set_step(self.step)
            self.noise_ref.set_step(self.step)
        self.check_weights()

    def inplace_edit(self, k: int, inference: bool):
        """An in-place edit outside the optimizer (bumps `_version`), under no_grad or
        inference_mode (in-place ops on normal tensors bump the version there too)."""
        self.log.append(f"edit-{k}-{'inf' if inference else 'nograd'}")
        for m in (self.test, self.ref):
            p = [p for n, p in m.named_parameters() if n.endswith("proj.weight")][k]
            with (torch.inference_mode() if inference else torch.no_grad()):
                p.mul_(1.0 - 0.25 * (k % 3)).add_(0.01 * (k + 1))
        self.check_weights()

    def data_copy_invalidate(self, k: int):
        """`param.data.copy_` does not bump the version: `invalidate()` is what makes it seen."""
        self.log.append(f"data-copy-{k}")
        for m in (self.test, self.ref):
            p = [p for n, p in m.named_parameters() if n.endswith("proj.weight")][k]
            g = torch.Generator().manual_seed(77 + k)
            p.data.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.2)
        self.handle.invalidate()
        self.check_weights()

    def invalidate(self):
        self.log.append("invalidate")
        self.handle.invalidate()

    # the checks ----------------------------------------------------------------------------
    def check_grads(self):
        ref_params = dict(self.ref.named_parameters())
        for n, p in self.test.named_parameters():
            r = ref_params[n]
            assert (p.grad is None) == (r.grad is None), f"{n}: grad presence differs after {self.log}"
            if p.grad is not None:
                assert same(p.grad, r.grad), f"{n}: gradient differs from the reference after {self.log}"

    def check_weights(self):
        ref_params = dict(self.ref.named_parameters())
        for n, p in self.test.named_parameters():
            assert same(p, ref_params[n]), f"{n}: master weight differs after {self.log}"


def quantized_weights(pair: Pair):
    return [p for n, p in pair.test.named_parameters() if n.endswith("proj.weight")]


# ---- the regression: the report's exact sequence -------------------------------------------


@pytest.mark.parametrize("qname", ["nvfp4", "mxfp4-floor"])
def test_inference_mode_then_training_linear(qname):
    """An inference_mode forward, then a training forward: the quantized Linear weight must get
    the reference STE gradient (it was silently None)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    lin = model[0]
    rlin = copy.deepcopy(lin)
    q = QUANTIZERS[qname]()
    h = aqn_rs.quantize_model(model, q, exclude=())
    assert h.modules == ["0"]
    x = torch.randn(4, 64)
    with torch.inference_mode():
        model(x)
    y = model(x)
    y.square().sum().backward()
    assert lin.weight.grad is not None, "the inference_mode forward cut the weight gradient"
    w = _RefSTE.apply(rlin.weight, q.format, getattr(q, "scale_mode", "floor"), "identity", None)
    F.linear(x, w, rlin.bias).square().sum().backward()
    assert same(y, F.linear(x, w, rlin.bias))
    assert same(lin.weight.grad, rlin.weight.grad)
    assert same(lin.bias.grad, rlin.bias.grad)


@pytest.mark.parametrize("qname", ["nvfp4", "mxfp4-floor"])
def test_inference_mode_then_training_llama(qname):
    """The same on a transformers Llama (the backward raised 'Inference tensors cannot be saved
    for backward')."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float()
    refm = copy.deepcopy(model)
    q = QUANTIZERS[qname]()
    aqn_rs.quantize_model(model, q)
    reference_hooks(refm, q.format, getattr(q, "scale_mode", "floor"), "identity", skip=("lm_head", "embed_tokens"))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.inference_mode():
        model(ids)
    model.train()
    refm.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    rout = refm(ids, labels=ids)
    rout.loss.backward()
    assert same(out.logits, rout.logits)
    rp = dict(refm.named_parameters())
    n_quant = 0
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n}: no gradient after an inference_mode forward"
        assert same(p.grad, rp[n].grad), f"{n}: gradient differs from the reference STE"
        n_quant += n.endswith("proj.weight")
    assert n_quant == 14


# ---- fixed sequences: every operation, every configuration ---------------------------------


CONFIGS = [
    ("nvfp4", "identity", "off"),
    ("nvfp4", "clipped", "off"),
    ("mxfp4-floor", "identity", "off"),
    ("mxfp4-floor", "clipped", "off"),
    ("mxfp4-rceil", "identity", "norm"),
    ("nvfp4", "identity", "norm"),
    ("nvfp4", "clipped", "norm+linear"),
    ("mxfp4-floor", "identity", "norm+linear"),
]

ALL_OPS = [
    ("inference_forward", (False,)), ("train_backward", ()), ("no_grad_forward", (True,)),
    ("train_backward", ()), ("optimizer_step", ()), ("inference_forward", (True,)),
    ("autocast_backward", ()), ("eval_forward", ()), ("train_backward", ()),
    ("inplace_edit", (3, True)), ("train_backward", ()), ("optimizer_step", ()),
    ("no_grad_forward", (False,)), ("eval_backward", ()), ("data_copy_invalidate", (5,)),
    ("inference_forward", (True,)), ("train_backward", ()), ("invalidate", ()),
    ("autocast_backward", ()), ("optimizer_step", ()), ("inplace_edit", (7, False)),
    ("inference_forward", (False,)), ("train_backward", ()), ("optimizer_step", ()),
]


def drive(pair: Pair, ops):
    for name, args in ops:
        getattr(pair, name)(*args)
    pair.check_weights()


@pytest.mark.parametrize("prefill", (False, True))
@pytest.mark.parametrize("qname,ste,aqn", CONFIGS)
def test_every_operation_in_one_sequence(qname, ste, aqn, prefill):
    pair = Pair(qname, ste, aqn, prefill=prefill)
    drive(pair, ALL_OPS)
    assert pair.step == 4
    # the clipped STE really zeroed some gradient entries (the test's inputs clip)
    if ste == "clipped":
        w = quantized_weights(pair)[0]
        top = _ref_block_top(w, pair.fmt, pair.mode, None if pair.fmt == "mxfp4" else
                             max(float(m.detach().abs().amax()) for m in quantized_weights(pair)[:3]))
        assert bool((w.detach().abs() > top).any())


# ---- random sequences (hypothesis) ----------------------------------------------------------


class GradModes(RuleBasedStateMachine):
    """Random interleavings, random configuration; the checks run inside every rule."""

    @initialize(cfg=st.sampled_from(CONFIGS), seed=st.integers(0, 3), prefill=st.booleans())
    def setup(self, cfg, seed, prefill):
        self.pair = Pair(*cfg, seed=seed, prefill=prefill)

    @rule()
    def train(self):
        self.pair.train_backward()

    @rule()
    def autocast(self):
        self.pair.autocast_backward()

    @rule()
    def eval_forward(self):
        self.pair.eval_forward()

    @rule()
    def eval_backward(self):
        self.pair.eval_backward()

    @rule(train=st.booleans())
    def no_grad(self, train):
        self.pair.no_grad_forward(train)

    @rule(train=st.booleans())
    def inference(self, train):
        self.pair.inference_forward(train)

    @rule()
    def step(self):
        self.pair.optimizer_step()

    @rule(k=st.integers(0, 13), inference=st.booleans())
    def edit(self, k, inference):
        self.pair.inplace_edit(k, inference)

    @rule(k=st.integers(0, 13))
    def data_copy(self, k):
        self.pair.data_copy_invalidate(k)

    @rule()
    def invalidate(self):
        self.pair.invalidate()

    @invariant()
    def masters(self):
        if hasattr(self, "pair"):
            self.pair.check_weights()


GradModes.TestCase.settings = settings(
    max_examples=1000, stateful_step_count=8, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_random_sequences = GradModes.TestCase


# ---- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("qname,ste", [("nvfp4", "identity"), ("mxfp4-floor", "clipped")])
def test_compiled_sequence(qname, ste):
    """The compiled model (aot_eager) through the same interleaving, against the eager reference."""
    torch._dynamo.reset()
    pair = Pair(qname, ste, "off", compile_model=True)
    ops = [op for op in ALL_OPS if op[0] not in ("autocast_backward",)]
    drive(pair, ops)


# ---- the cost: no re-quantization between optimizer steps -----------------------------------


def _count_fake_quants(monkeypatch):
    """Count the quantizers' fake_quant calls (every kernel launch that quantizes a weight)."""
    calls = {"n": 0}
    for cls in (aqn_rs.Nvfp4Quantizer, aqn_rs.Mxfp4Quantizer):
        real = cls.fake_quant

        def counted(self, *a, _real=real, **k):
            calls["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(cls, "fake_quant", counted)
    return calls


@pytest.mark.parametrize("qname,ste", [("nvfp4", "identity"), ("mxfp4-floor", "identity"), ("nvfp4", "clipped")])
def test_cache_quantizes_once_per_weight_version(monkeypatch, qname, ste):
    """The clipped STE too: its forward reuses the cache (its mask is computed in backward)."""
    calls = _count_fake_quants(monkeypatch)
    pair = Pair(qname, ste, "off")
    h = pair.handle
    n = len(h.modules)
    assert n == 14
    pair.inference_forward(False)  # fills the cache with normal tensors
    assert h.cache_stats()["misses"] == n and calls["n"] == n
    for _ in range(3):  # micro-batches: training forwards and backwards reuse the cache
        pair.train_backward()
    pair.no_grad_forward(False)
    pair.eval_forward()
    assert h.cache_stats() == {"hits": 5 * n, "misses": n} and calls["n"] == n
    pair.optimizer_step()  # every weight moved: one quantization each, then hits
    pair.train_backward()
    pair.inference_forward(True)
    pair.no_grad_forward(True)  # a no-grad pass after training: no recompute
    assert h.cache_stats()["misses"] == 2 * n and calls["n"] == 2 * n
    pair.inplace_edit(3, False)  # o_proj (no fused group): it and nothing else is re-quantized
    pair.train_backward()
    assert calls["n"] == 2 * n + 1
    pair.invalidate()
    pair.no_grad_forward(False)
    assert calls["n"] == 3 * n + 1


def test_fused_group_member_edit_requantizes_the_group():
    """NVFP4: editing k_proj moves the q/k/v group's amax, so all three are re-quantized."""
    pair = Pair("nvfp4", "identity", "off")
    pair.train_backward()
    with torch.no_grad():
        for m in (pair.test, pair.ref):
            m.layers[0].self_attn.k_proj.weight.mul_(4.0)
    before = pair.handle.cache_stats()["misses"]
    pair.train_backward()
    assert pair.handle.cache_stats()["misses"] - before == 3
    pair.check_grads()


def test_inference_tensor_weights_are_served_uncached():
    """A model built under inference_mode holds inference tensors (no version counter): it is
    quantized correctly and never cached."""
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(32, 16))
        lin = model[0]
        h = aqn_rs.quantize_model(model, aqn_rs.Nvfp4Quantizer(), exclude=())
        x = torch.randn(2, 32)
        y = model(x)
        want = F.linear(x, ref.nvfp4_fake_quant(lin.weight), lin.bias)
        assert same(y, want)
        model(x)
    assert h.cache_stats() == {"hits": 0, "misses": 2}


def test_inference_mode_inplace_bumps_version():
    """The cache relies on it: an in-place op under inference_mode on a normal tensor bumps it."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    v = p._version
    with torch.inference_mode():
        p.add_(1.0)
    assert p._version > v


# ---- CUDA -----------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the GPU machine)")
@pytest.mark.parametrize("qname,ste,aqn", CONFIGS)
def test_every_operation_in_one_sequence_cuda(qname, ste, aqn):
    """The cached hooks run the CUDA kernels; the reference runs the pure-torch reference on
    the GPU tensors. Outputs, gradients and master weights must still agree bit for bit."""
    pair = Pair(qname, ste, aqn, device="cuda")
    ops = [op if op[0] != "autocast_backward" else ("train_backward", ()) for op in ALL_OPS]
    drive(pair, ops)
    # and under CUDA autocast (bf16)
    pair.device = "cuda"
    pair._both(lambda: torch.autocast("cuda", dtype=torch.bfloat16), True, True)
    pair.check_grads()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the GPU machine)")
def test_random_sequences_cuda():
    import random

    rnd = random.Random(1234)
    names = ["train_backward", "eval_forward", "eval_backward", "optimizer_step", "invalidate"]
    for i in range(40):
        pair = Pair(*CONFIGS[i % len(CONFIGS)], seed=i, device="cuda")
        for _ in range(8):
            r = rnd.random()
            if r < 0.2:
                pair.inference_forward(rnd.random() < 0.5)
            elif r < 0.3:
                pair.no_grad_forward(rnd.random() < 0.5)
            elif r < 0.4:
                pair.inplace_edit(rnd.randrange(14), rnd.random() < 0.5)
            else:
                getattr(pair, rnd.choice(names))()
        pair.check_weights()
