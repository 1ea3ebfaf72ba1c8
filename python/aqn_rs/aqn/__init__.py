"""Adaptive Quantization Noise (AQN, after QeRL): the sigma schedule, the deterministic noise
and where it is added (docs/reference/NOISE.md).

- `SigmaScheduler` (Rust, `aqn_core::schedule`): QeRL's staged exponential decay, bit for bit,
  plus linear / cosine / constant decays.
- `gaussian_noise(shape, seed, step, name, sigma)`: N(0, sigma^2) noise keyed by
  ``(seed, step, module name)`` through Philox4x32-10, generated in f32 and then cast. The
  same key gives bit-identical noise in every process and on every device, so the actor and
  every rollout worker draw the same noise without sending tensors. The algorithm is written
  down in docs/reference/NOISE.md; the CPU path runs in Rust, CUDA in one kernel (cuda/noise.cu),
  other devices (and CUDA builds without kernels) use `_reference_gaussian`
  (pure torch, the same algorithm op for op), which the tests compare bit for bit.
- `AqnNoise`: adds the step's noise to the selected weights, either out of place in the
  training forward (``apply_to="actor"``, through `actor_weight`, master weights untouched)
  or in place on a rollout model (``apply_to="rollout"``, `apply_` / `restore_`, clean weights
  cached so that noise never accumulates), or both.

torch is imported lazily, inside the functions that need it, so ``import aqn_rs`` works
without it.

The package: `gaussian` (the noise and its key) and `noise` (`AqnNoise`, which uses it). Every
name is importable from `aqn_rs.aqn` as it was when AQN was one module.
"""

from __future__ import annotations

# The `x as x` imports re-export names the single module had outside __all__, which the tests
# (the pure-torch reference, the per-channel RMS) and the verl plugin import from aqn_rs.aqn.
from .._aqn_rs import SigmaScheduler
from ..constants import APPLY_TO
from .gaussian import _reference_gaussian as _reference_gaussian
from .gaussian import gaussian_noise, noise_key
from .noise import AqnNoise
from .noise import _channel_rms as _channel_rms

__all__ = [
    "APPLY_TO",
    "AqnNoise",
    "SigmaScheduler",
    "gaussian_noise",
    "noise_key",
]
