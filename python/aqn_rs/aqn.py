"""Adaptive Quantization Noise (AQN, after QeRL): the sigma schedule, the deterministic noise
and where it is added (DESIGN.md, "AQN").

- `SigmaScheduler` (Rust, `aqn_core::schedule`): QeRL's staged exponential decay, bit for bit,
  plus linear / cosine / constant decays.
- `gaussian_noise(shape, seed, step, name, sigma)`: N(0, sigma^2) noise keyed by
  ``(seed, step, module name)`` through Philox4x32-10, generated in f32 and then cast. The
  same key gives bit-identical noise in every process and on every device, so the actor and
  every rollout worker draw the same noise without sending tensors. The algorithm is written
  down in docs/NOISE.md; the CPU path runs in Rust, CUDA in one kernel (cuda/noise.cu), other
  devices (and CUDA builds without kernels) use `_reference_gaussian`
  (pure torch, the same algorithm op for op), which the tests compare bit for bit.
- `AqnNoise`: adds the step's noise to the selected weights, either out of place in the
  training forward (``apply_to="actor"``, through `actor_weight`, master weights untouched)
  or in place on a rollout model (``apply_to="rollout"``, `apply_` / `restore_`, clean weights
  cached so that noise never accumulates), or both.

torch is imported lazily, inside the functions that need it, so ``import aqn_rs`` works
without it.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _aqn_rs, _cuda
from ._aqn_rs import SigmaScheduler
from .constants import APPLY_TO, DEFAULT_EXCLUDE
from .selection import ModuleSelector, canonical_name, class_name_of

__all__ = [
    "APPLY_TO",
    "AqnNoise",
    "SigmaScheduler",
    "gaussian_noise",
    "noise_key",
]


# ---------------------------------------------------------------------------------------------
# The noise algorithm (docs/NOISE.md). Constants are given by their f32 bit patterns, the same
# table as `aqn_core::noise` and the CUDA port.
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
    """Pure-torch reference of the noise (docs/NOISE.md), op for op the algorithm of
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
    dtype written directly; bit-identical to the CPU path (tests/test_noise.py)."""
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
    ``(seed, step, name)`` (docs/NOISE.md).

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


# ---------------------------------------------------------------------------------------------
# AqnNoise
# ---------------------------------------------------------------------------------------------


def _channel_rms(w):
    """Per-output-channel RMS of a weight, float32: over all dims but the first for a matrix
    (one value per row, broadcastable), over the whole tensor for a vector (an RMSNorm gain is
    one channel of scale). Accumulated in float64, then rounded once to float32."""
    import torch

    w64 = w.detach().to(torch.float64)
    if w.ndim >= 2:
        rms = w64.square().mean(dim=tuple(range(1, w.ndim)), keepdim=True).sqrt()
    else:
        rms = w64.square().mean().sqrt()
    return rms.to(torch.float32)


def _fingerprints(ws) -> List[Tuple[int, int]]:
    """Per tensor, two int64 sums over its raw bits (wrapping): equal for the same contents,
    different, in practice always, once anyone else has written the tensor. One host sync per
    device for all of them (a rollout model has a hundred or more noised tensors)."""
    import torch

    by_device: Dict[Any, List[int]] = {}
    sums = []
    for i, w in enumerate(ws):
        t = w.detach()
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        v = t.contiguous().view(ints).to(torch.int64).reshape(-1)
        sums.append(torch.stack([v.sum(), (v * (v | 1)).sum()]))
        by_device.setdefault(t.device, []).append(i)
    out: List[Tuple[int, int]] = [(0, 0)] * len(sums)
    for idx in by_device.values():
        for i, pair in zip(idx, torch.stack([sums[i] for i in idx]).tolist()):
            out[i] = tuple(pair)
    return out


def _is_dtensor(w) -> bool:
    return hasattr(w, "placements") and hasattr(w, "to_local") and hasattr(w, "device_mesh")


class _CleanEntry:
    __slots__ = ("param", "clean", "noisy_fp")

    def __init__(self, param, clean):
        self.param = weakref.ref(param)
        self.clean = clean
        self.noisy_fp = None


class AqnNoise:
    """Adds the AQN noise of the current step to the selected weights.

    Args:
        scheduler: a `SigmaScheduler`, or a mapping of its keyword arguments.
        layer_types: which modules get noise (``("rmsnorm",)`` as in QeRL, or ``("linear",)``).
        apply_to: ``"actor"`` (in the training forward, through `actor_weight`; master weights
            untouched), ``"rollout"`` (in place on the rollout model: `apply_` / `restore_`),
            or ``"both"``.
        seed: run seed; with the step and the module's canonical name it keys the noise.
        relative: scale sigma by the per-output-channel RMS of the weight (`_channel_rms`:
            per row of a matrix, the whole vector for an RMSNorm gain). Absolute sigma 0.05 on
            Linear weights (~50x smaller than norm gains) collapses training; relative does not
            depend on the weights' scale.
        exclude, include: selection patterns (see `aqn_rs.selection`); ``exclude=None`` means
            the defaults ``("lm_head", "embed_tokens")``.
        enabled: ``False`` makes every method a no-op that adds no noise.
        noise_cache_max_numel: in actor mode the noise of a weight is generated once per step
            and reused by every micro-batch when the weight has at most this many elements
            (norm gains); larger weights regenerate it per forward to save memory.

    The noise of a module at a step is ``gaussian_noise(weight.shape, seed, step,
    canonical_name(module_name), sigma(step))`` (times the RMS if relative), cast to the
    weight's dtype. It is the same in the actor and in every rollout worker whenever the
    module has the same canonical name and shape there (true for RMSNorm gains, QeRL's
    default; vLLM's fused ``qkv_proj`` / ``gate_up_proj`` have their own names and draws).
    Eval: `actor_weight` adds nothing for ``training=False``, and nothing adds noise inside
    ``with aqn.disabled():``; `clean_weights` gives a rollout model its clean weights for
    validation.
    """

    def __init__(
        self,
        scheduler: Union[SigmaScheduler, Mapping[str, Any]],
        layer_types: Union[str, Sequence[str]] = ("rmsnorm",),
        apply_to: str = "actor",
        seed: int = 0,
        relative: bool = False,
        exclude: Optional[Union[str, Sequence[str]]] = DEFAULT_EXCLUDE,
        include: Optional[Union[str, Sequence[str]]] = None,
        enabled: bool = True,
        noise_cache_max_numel: int = 1 << 20,
    ):
        if isinstance(scheduler, SigmaScheduler):
            self.scheduler = scheduler
        elif isinstance(scheduler, Mapping) or hasattr(scheduler, "keys"):
            self.scheduler = SigmaScheduler(**{str(k): scheduler[k] for k in scheduler.keys()})
        else:
            raise TypeError(
                f"scheduler must be a SigmaScheduler or a mapping of its arguments, got {type(scheduler).__name__}"
            )
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {type(relative).__name__}")
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.seed = _u64(seed, "seed")
        self.apply_to = apply_to
        self.relative = relative
        self.selector = ModuleSelector(include=include, exclude=exclude, layer_types=layer_types)
        self.noise_cache_max_numel = int(noise_cache_max_numel)
        self._enabled = enabled
        self._disabled_depth = 0
        self._step = 0
        self._clean: Dict[str, _CleanEntry] = {}
        self._noise_cache: Dict[Tuple, Any] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], total_steps: int, **kwargs: Any) -> "AqnNoise":
        """From the plan's block ``{enabled, sigma_start, sigma_end, num_stages, layer_types}``
        (plus optional ``decay``, ``zero_first_stage``, ``apply_to``, ``seed``, ``relative``,
        ``exclude``, ``include``); ``kwargs`` override the block's AqnNoise keys."""
        block = {str(k): config[k] for k in config.keys()}
        scheduler = SigmaScheduler.from_config(block, total_steps)
        args = {
            k: block[k]
            for k in ("layer_types", "apply_to", "seed", "relative", "exclude", "include", "noise_cache_max_numel")
            if k in block and block[k] is not None
        }
        args["enabled"] = bool(block.get("enabled", True))
        args.update(kwargs)
        return cls(scheduler, **args)

    # -- state ---------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The current optimizer step (what methods use when no step is given)."""
        return self._step

    def set_step(self, step: int) -> None:
        """Set the current optimizer step; the actor noise cache is dropped when it changes."""
        step = _u64(step, "step")
        if step != self._step:
            self._noise_cache.clear()
        self._step = step

    @property
    def enabled(self) -> bool:
        """Whether noise is drawn at all now (constructor flag, and not inside `disabled()`)."""
        return self._enabled and self._disabled_depth == 0

    @contextlib.contextmanager
    def disabled(self) -> Iterator["AqnNoise"]:
        """Within this context no method adds noise (evaluation)."""
        self._disabled_depth += 1
        try:
            yield self
        finally:
            self._disabled_depth -= 1

    def sigma(self, step: Optional[int] = None) -> float:
        """Sigma at ``step`` (default: the current step); 0 when disabled."""
        if not self.enabled:
            return 0.0
        return self.scheduler.sigma(self._step if step is None else step)

    def applies_to(self, where: str) -> bool:
        """Whether noise goes to ``"actor"`` or ``"rollout"`` models."""
        return self.apply_to in (where, "both")

    def state_dict(self) -> Dict[str, Any]:
        """Scheduler state, step and configuration (for exact resume)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "step": self._step,
            "seed": self.seed,
            "apply_to": self.apply_to,
            "relative": self.relative,
            "layer_types": list(self.selector.layer_types),
            "exclude": list(self.selector.exclude),
            "include": None if self.selector.include is None else list(self.selector.include),
            "enabled": self._enabled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.seed = _u64(state.get("seed", self.seed), "seed")
        apply_to = state.get("apply_to", self.apply_to)
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
        self.apply_to = apply_to
        self.relative = bool(state.get("relative", self.relative))
        self.selector = ModuleSelector(
            include=state.get("include", self.selector.include),
            exclude=state.get("exclude", self.selector.exclude),
            layer_types=state.get("layer_types", self.selector.layer_types),
        )
        self._enabled = bool(state.get("enabled", self._enabled))
        self._noise_cache.clear()
        self._step = _u64(state.get("step", self._step), "step")

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_clean"] = {}
        d["_noise_cache"] = {}
        d["_disabled_depth"] = 0
        return d

    def __repr__(self) -> str:
        return (
            f"AqnNoise({self.scheduler!r}, layer_types={self.selector.layer_types!r}, "
            f"apply_to={self.apply_to!r}, seed={self.seed}, relative={self.relative}, "
            f"exclude={self.selector.exclude!r}, include={self.selector.include!r}"
            + ("" if self._enabled else ", enabled=False")
            + ")"
        )

    # -- the noise -----------------------------------------------------------------------------

    def selects(self, name: str, module: Any) -> bool:
        """Whether ``module`` (named ``name``) gets noise."""
        return self.selector.decide(name, class_name_of(module))[0]

    def noise_for(self, name: str, weight: Any, step: Optional[int] = None):
        """The noise for module ``name``'s ``weight`` at ``step`` (default: the current step):
        a tensor of the weight's shape, dtype and device (zeros when sigma is 0), detached.
        A DTensor weight sharded on dim 0 (FSDP2) gets the noise of its local rows, as a
        DTensor with the same placements."""
        import torch

        step = self._step if step is None else _u64(step, "step")
        if not weight.is_floating_point():
            raise TypeError(f"{name}: AQN noise goes to floating-point weights, got dtype {weight.dtype}")
        sigma = self.sigma(step)
        with torch.no_grad():
            if _is_dtensor(weight):
                return self._dtensor_noise(name, weight, step, sigma)
            if sigma == 0.0:
                return torch.zeros_like(weight, memory_format=torch.contiguous_format).detach()
            z = gaussian_noise(
                tuple(weight.shape), self.seed, step, canonical_name(name), sigma, dtype=torch.float32, device=weight.device
            )
            if self.relative:
                z = z * _channel_rms(weight)
            return z.to(weight.dtype)

    def _dtensor_noise(self, name, weight, step, sigma):
        import torch
        from torch.distributed.tensor import DTensor, Replicate, Shard

        local = weight.to_local()
        placements = tuple(weight.placements)
        if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements):
            raise NotImplementedError(f"AQN noise for DTensor placements {placements}: only Shard(0) and Replicate")
        if sigma == 0.0:
            z = torch.zeros_like(local)
        else:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            _, global_offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, placements)
            row = math.prod(weight.shape[1:]) if weight.ndim > 1 else 1
            z = gaussian_noise(
                tuple(local.shape),
                self.seed,
                step,
                canonical_name(name),
                sigma,
                dtype=torch.float32,
                device=local.device,
                offset=(global_offset[0] if weight.ndim else 0) * row,
            )
            if self.relative:
                z = z * _channel_rms(local if weight.ndim >= 2 else weight.full_tensor())
            z = z.to(local.dtype)
        return DTensor.from_local(z, weight.device_mesh, placements, shape=weight.shape, stride=weight.stride())

    def actor_weight(self, name: str, weight: Any, step: Optional[int] = None, training: bool = True):
        """The weight the training forward should use: ``weight + noise`` (out of place; the
        master weight is never written), or ``weight`` itself when no noise applies (not
        ``apply_to`` actor/both, ``training=False``, disabled, or sigma 0 at this step).
        Gradients flow to ``weight`` unchanged (the noise is a constant)."""
        if not (training and self.enabled and self.applies_to("actor")):
            return weight
        step = self._step if step is None else _u64(step, "step")
        if self.sigma(step) == 0.0:
            return weight
        return weight + self._actor_noise(name, weight, step)

    def _actor_noise(self, name, weight, step):
        key = (canonical_name(name), step, tuple(weight.shape), weight.dtype, str(weight.device))
        noise = self._noise_cache.get(key)
        if noise is None:
            import torch

            # The cached noise serves later forwards in any grad mode, so it must not be an
            # inference tensor (one made under inference_mode cannot enter a training forward's
            # autograd graph safely); leaving inference mode for its generation costs nothing.
            with torch.inference_mode(False):
                noise = self.noise_for(name, weight, step)
            if weight.numel() <= self.noise_cache_max_numel:
                if any(k[1] != step for k in self._noise_cache):
                    self._noise_cache.clear()
                self._noise_cache[key] = noise
        return noise

    # -- rollout models (in place) -------------------------------------------------------------

    def _selected_weights(self, model) -> Iterator[Tuple[str, Any]]:
        import torch

        for name, module in model.named_modules():
            if not self.selects(name, module):
                continue
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor):
                if not w.is_floating_point():
                    raise TypeError(
                        f"{name}.weight has dtype {w.dtype}: AQN noise goes to floating-point weights "
                        "(a quantized rollout model cannot be noised in place; noise its norms only)"
                    )
                if _is_dtensor(w):
                    raise TypeError(
                        f"{name}.weight is a DTensor: apply_ noises plain (rollout) weights in place; "
                        "for an FSDP actor use apply_to='actor' and actor_weight"
                    )
                yield canonical_name(name), w

    def apply_(self, model: Any, step: Optional[int] = None) -> int:
        """Add the noise of ``step`` (default: the current step; a given step becomes the
        current one) to the selected weights of ``model`` in place.

        The first time a weight is seen its clean value is cached. Each later call first puts
        the clean weight back, so noise never accumulates -- unless the weight was written by
        someone else since this object's last write (a weight sync): then the written value
        is the new clean weight and is cached instead. Returns the number of tensors noised
        (0 when sigma is 0, when disabled -- then clean weights are restored -- or when
        ``apply_to`` is ``"actor"``)."""
        import torch

        if step is not None:
            self.set_step(step)
        if not (self.enabled and self.applies_to("rollout")):
            self.restore_(model)
            return 0
        sigma = self.sigma()
        count = 0
        with torch.no_grad():
            weights = list(self._selected_weights(model))
            # Entries whose weight still holds what this object wrote last: put the clean
            # weight back. Any other weight (new, replaced, or written since: a weight sync) is
            # the new clean weight.
            cached = [(key, w) for key, w in weights if self._is_cached(key, w)]
            fps = _fingerprints([w for _, w in cached])
            ours = {key for (key, _), fp in zip(cached, fps) if fp == self._clean[key].noisy_fp}
            for key, w in weights:
                if key in ours:
                    entry = self._clean[key]
                    w.copy_(entry.clean)
                else:
                    entry = self._clean[key] = _CleanEntry(w, w.detach().clone())
                if sigma > 0.0:
                    w.add_(self.noise_for(key, entry.clean))
                    count += 1
            for (key, _), fp in zip(weights, _fingerprints([w for _, w in weights])):
                self._clean[key].noisy_fp = fp
        return count

    def _is_cached(self, key: str, w: Any) -> bool:
        entry = self._clean.get(key)
        return entry is not None and entry.param() is w and entry.noisy_fp is not None

    def restore_(self, model: Any = None) -> int:
        """Put back the clean weights cached by `apply_` (those of ``model`` only, if given)
        and forget them. A weight written by someone else since (a weight sync) is left as it
        is. Returns the number of tensors restored."""
        import torch

        mine = None if model is None else {id(w) for _, w in self._selected_weights(model)}
        count = 0
        with torch.no_grad():
            todo = []
            for key, entry in list(self._clean.items()):
                w = entry.param()
                if w is None:
                    del self._clean[key]
                elif mine is None or id(w) in mine:
                    todo.append((key, entry, w))
            noised = [(key, entry, w) for key, entry, w in todo if entry.noisy_fp is not None]
            for (key, entry, w), fp in zip(noised, _fingerprints([w for _, _, w in noised])):
                if fp == entry.noisy_fp:
                    w.copy_(entry.clean)
                    count += 1
            for key, _, _ in todo:
                del self._clean[key]
        return count

    @contextlib.contextmanager
    def clean_weights(self, model: Any) -> Iterator[Any]:
        """Clean weights inside the context (validation rollouts); the current step's noise is
        applied again on exit if it was applied before."""
        had = bool(self._clean)
        self.restore_(model)
        try:
            yield model
        finally:
            if had:
                self.apply_(model)
