"""The rollout side: AQN on the vLLM model of each worker process, put on and taken off in place
(`vllm_worker_apply`, `vllm_worker_restore`); fused and tensor-parallel weights get the rows
and columns of the noise the actor draws for the unfused HF weights.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, List, Mapping, Optional

from ...aqn import AqnNoise, _channel_rms, gaussian_noise
from ...constants import VLLM_FUSED
from ...errors import VerlPluginError
from ...selection import canonical_name, class_name_of
from .config import NOISE_BLOCK, parse_config
from .names import _Layout, vllm_layout


def _vllm_noise_class():
    class VllmNoise(AqnNoise):
        """`AqnNoise` on a vLLM model: fused and tensor-parallel Linear weights get the rows
        (columns) of the noise the actor draws for the unfused HF weights."""

        def bind(self, model: Any) -> None:
            self._layouts: Dict[str, Optional[_Layout]] = {}
            for name, module in model.named_modules():
                w = getattr(module, "weight", None)
                if name and hasattr(w, "dim") and self.selects(name, module):
                    self._layouts[canonical_name(name)] = vllm_layout(canonical_name(name), module, w)

        def _member_selected(self, member: str) -> bool:
            return self.selector.decide(member, "Linear")[0]

        def selects(self, name: str, module: Any) -> bool:
            members = VLLM_FUSED.get(name.rpartition(".")[2])
            if members is None or "linear" not in self.selector.layer_types:
                return super().selects(name, module)
            if not self.selector.decide(name, class_name_of(module))[0]:
                return False
            parent = name.rpartition(".")[0]
            return any(self._member_selected(f"{parent}.{m}" if parent else m) for m in members)

        def noise_for(self, name, weight, step=None):
            import torch

            lay = getattr(self, "_layouts", {}).get(name)
            if lay is None:
                return super().noise_for(name, weight, step)
            step = self.step if step is None else int(step)
            sigma = self.sigma(step)
            with torch.no_grad():
                if sigma == 0.0:
                    return torch.zeros_like(weight, memory_format=torch.contiguous_format)
                parts = []
                for member, row0, n in lay.rows:
                    width = lay.cols[1] if lay.cols else lay.full_cols
                    if not self._member_selected(member):
                        parts.append(torch.zeros((n, width), dtype=torch.float32, device=weight.device))
                        continue
                    z = gaussian_noise((n, lay.full_cols), self.seed, step, canonical_name(member), sigma,
                                       dtype=torch.float32, device=weight.device, offset=row0 * lay.full_cols)
                    if lay.cols is not None:
                        z = z[:, lay.cols[0]: lay.cols[0] + lay.cols[1]]
                    parts.append(z)
                z = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
                if self.relative:
                    if lay.cols is not None and lay.cols[1] != lay.full_cols:
                        raise VerlPluginError(
                            f"{NOISE_BLOCK}.relative with Linear noise on the column-sharded {name} "
                            "(tensor parallelism): its per-row RMS spans other ranks; use "
                            "actor_rollout_ref.rollout.tensor_model_parallel_size=1 or relative=false"
                        )
                    z = z * _channel_rms(weight)
                return z.contiguous().to(weight.dtype)

    return VllmNoise


_VLLM_STATE: Dict[int, Dict[str, Any]] = {}
_VLLM_LOCK = threading.Lock()


def _worker_models(worker: Any) -> List[Any]:
    it = getattr(worker, "_iter_all_models", None)
    if callable(it):
        return list(it())
    return [worker.model_runner.model]


def vllm_worker_apply(worker: Any, step: int, noise_injection: Mapping[str, Any], total_steps: int) -> int:
    """`vLLMColocateWorkerExtension.aqn_rs_apply`: put the noise of global step `step` on the
    worker's rollout model(s) in place (clean weights cached; a weight written by a sync since
    is taken as the new clean weight). Returns the number of tensors noised."""
    cfg = parse_config(None, noise_injection, total_steps)
    if cfg.noise is None:
        return 0
    key = json.dumps(cfg.forwarded(), sort_keys=True)
    with _VLLM_LOCK:
        st = _VLLM_STATE.get(id(worker))
        models = _worker_models(worker)
        if st is None or st["key"] != key or len(st["noises"]) != len(models):
            if st is not None:  # config changed: put the old clean weights back first
                for noise, model in zip(st["noises"], models):
                    noise.restore_(model)
            cls = _vllm_noise_class()
            st = {"key": key, "noises": [cls.from_config(cfg.noise, int(total_steps), apply_to="rollout")
                                         for _ in models]}
            _VLLM_STATE[id(worker)] = st
        count = 0
        for noise, model in zip(st["noises"], models):
            noise.bind(model)
            count += noise.apply_(model, int(step))
        return count


def vllm_worker_restore(worker: Any) -> int:
    """`vLLMColocateWorkerExtension.aqn_rs_restore`: the clean weights back (validation)."""
    with _VLLM_LOCK:
        st = _VLLM_STATE.get(id(worker))
        if st is None:
            return 0
        return sum(noise.restore_(model) for noise, model in zip(st["noises"], _worker_models(worker)))
