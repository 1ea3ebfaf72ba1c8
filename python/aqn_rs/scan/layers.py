"""The per-layer plan of a scan: each module's projection type and layer index, which layers are
scanned, the device and dtype a weight is read to, and the fused groups' shared amax."""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional

from .. import _cuda
from ..errors import ScanError
from ..quantizers import Nvfp4Quantizer
from ..selection import ModuleSelector
from .metrics import _LAYER_INDEX, PROJ_TYPES


def proj_type(module_name: str) -> str:
    """q/k/v/o/gate/up/down (and qkv, gate_up, embed, lm_head) from a module name; else its
    last component."""
    leaf = module_name.rpartition(".")[2]
    return PROJ_TYPES.get(leaf, leaf)


def layer_index(module_name: str) -> Optional[int]:
    """The transformer block index in a module name (`model.layers.12.mlp.up_proj` -> 12)."""
    m = _LAYER_INDEX.search(module_name)
    return int(m.group(1)) if m else None


class _Progress:
    """tqdm if it is installed, else a one-line counter on stderr."""

    def __init__(self, total: int, enabled: bool, desc: str = "scan", unit: str = "layer") -> None:
        self.total, self.enabled, self.n, self._bar = total, enabled, 0, None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._desc = desc

    def update(self, label: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label[-40:], refresh=False)
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last > 0.5 or self.n == self.total:
            self._last = now
            width = 30
            fill = int(width * self.n / max(self.total, 1))
            end = "\n" if self.n == self.total else ""
            print(f"\r{self._desc} [{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} {label[-40:]:<40}",
                  end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ScanError(f"unknown device {device!r}; expected cpu or cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ScanError("--device cuda: torch sees no CUDA device here; use --device cpu")
        if not _cuda.available():
            raise ScanError("--device cuda: this aqn-rs build has no usable CUDA kernels "
                            "(aqn_rs.build_info()); reinstall with the kernels or use --device cpu")
    return device


def _prep(t, dtype: str, device: str):
    """The tensor the quantizer sees: floating (f32/bf16/f16), cast to `dtype` unless "keep",
    contiguous, on `device`."""
    import torch

    if device != "cpu":
        t = t.to(device)
    if dtype != "keep":
        t = t.to(getattr(torch, dtype))
    elif t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    return t.contiguous()


def _plan_layers(reader, classes, selector, skip_excluded: bool):
    """Layers to scan, in module order: (module, tensor, selected, rule, layer type) and the
    modules skipped with a reason."""
    typed = ModuleSelector(exclude=(), layer_types=("linear", "embedding"))
    names = set(reader.names)
    layers, skipped = [], []
    for mod, cls in classes.items():
        ok, _ = typed.decide(mod, cls)
        if not ok:
            continue
        ltype = ModuleSelector.layer_type(cls)
        tname = f"{mod}.weight"
        if tname not in names:
            skipped.append({"name": mod, "reason": "no weight tensor of its own (tied or absent)"})
            continue
        dt, shape = reader.meta(tname)
        if len(shape) != 2 or not dt.is_floating_point:
            skipped.append({"name": mod, "reason": f"weight is {dt} {list(shape)}, not a 2-D float matrix"})
            continue
        selected, rule = selector.decide(mod, cls)
        if not selected and skip_excluded:
            skipped.append({"name": mod, "reason": f"excluded ({rule})"})
            continue
        layers.append((mod, tname, selected, rule, ltype, shape, dt))
    return layers, skipped


def _group_amaxes(reader, layers, specs, fuse: bool, dtype: str, device: str, timing: Dict[str, float]) -> Dict[str, float]:
    """NVFP4: the shared tensor amax of each vLLM-fused group (q/k/v, gate/up) among the
    selected Linear layers, as training (`quantize_model`) and export use. One extra read of
    each member, one tensor at a time."""
    if not fuse or not any(s.format == "nvfp4" for s in specs):
        return {}
    from ..export import fused_weight_groups

    chosen = {mod: tname for mod, tname, sel, _, lt, _, _ in layers if sel and lt == "linear"}
    out: Dict[str, float] = {}
    q = Nvfp4Quantizer()
    for members in fused_weight_groups(chosen):
        amaxes = []
        for m in members:
            t0 = time.perf_counter()
            t = reader.read(chosen[m])
            t1 = time.perf_counter()
            x = _prep(t, dtype, device)
            amaxes.append(float(q.amax(x)))
            del x, t
            timing["read_s"] += t1 - t0
            timing["compute_s"] += time.perf_counter() - t1
        a = math.nan if any(math.isnan(v) for v in amaxes) else max(amaxes)
        out.update({m: a for m in members})
    return out


