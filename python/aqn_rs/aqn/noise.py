"""`AqnNoise`: where the noise goes. Out of place in the training forward (``apply_to="actor"``,
`actor_weight`) or in place on a rollout model (``apply_to="rollout"``, `apply_` / `restore_`,
clean weights cached so that noise never accumulates), or both."""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .._aqn_rs import SigmaScheduler
from ..constants import APPLY_TO, DEFAULT_EXCLUDE
from ..selection import ModuleSelector, canonical_name, class_name_of
from .gaussian import (
    _u64,
    gaussian_noise,
)


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
