"""The fake-quantized weight sync: `quant_sync` turns verl's `(name, tensor)` stream into the
one vLLM loads and measures its quantization error; rank 0 of the actor publishes those
statistics in Ray's key-value store, where the trainer reads them when it logs the step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from ... import _cuda
from ...errors import VerlPluginError
from ...selection import normalize_name
from .config import PLUGIN

# The plugin's one logger, named after the package that verl imports.
logger = logging.getLogger(PLUGIN)


# Weights per batch of quant_sync's error norms (see there).
_STATS_BATCH_BYTES = 256 << 20


def quant_sync(
    named_tensors: Iterable[Tuple[str, Any]],
    quantizer: Any,
    modules: Iterable[str],
    groups: Optional[Mapping[str, Tuple[str, ...]]] = None,
    param_dtype: Any = None,
    on_done: Optional[Callable[[Dict[str, float]], None]] = None,
) -> Iterator[Tuple[str, Any]]:
    """Fake-quantize the selected Linear weights of a `(name, tensor)` weight-sync stream.

    Args:
        named_tensors: verl's stream (HF names, full tensors, any device).
        quantizer: an `Mxfp4Quantizer` / `Nvfp4Quantizer`.
        modules: the quantized module names (normalized, see `normalize_name`); `X.weight` of
            each is replaced by its fake quant, everything else passes through unchanged.
        groups: module -> its fused group (NVFP4 q/k/v, gate/up): the members are held until
            the group is complete and quantized with `amax = max` of the members' amax.
        param_dtype: the actor's compute dtype (FSDP mixed precision `param_dtype`): weights
            are cast to it before the fake quant, as the actor's forward sees them, so the
            rollout gets bit for bit the weights the actor computes with.
        on_done: called at the end of the stream with the error statistics
            (`rel_error` = ||w - q(w)|| / ||w|| over all quantized weights, `max_rel_error`,
            `sqnr_db`, `tensors`) and `fake_quant_s`: the wall time the stream spent in this
            function's own work (casts, amax, fake quant, error sums; the last step waits for the
            GPU), i.e. what the plugin adds to verl's weight sync.

    Yields:
        `(name, tensor)` in the input's order (group members once their group is complete),
        under the input's names.

    Raises:
        VerlPluginError: at the end of the stream if a selected module's weight never came
            (the stream's names do not match the model's: nothing would be quantized).
    """
    import torch

    expected = set(modules)
    groups = dict(groups or {})
    pending: Dict[Tuple[str, ...], Dict[str, Tuple[str, Any]]] = {}
    seen: set = set()
    sums: List[Any] = []  # per batch, [tensors, 2] float64: sum (w - q(w))^2, sum w^2
    # The error sums are taken a batch of tensors at a time: on CUDA by `_cuda.sq_err_many`
    # (one read of w and of q(w) per tensor, f32 sums per CTA, one float64 fold per batch),
    # elsewhere by torch's multi-tensor (`_foreach_*`) kernels (a subtraction and two norms).
    # Per tensor, casts to f32, a subtraction and two sums were ~10 launches and ~90% of this
    # function's time on a 1.5B model (docs/results/BENCHMARKS.md). `w - q` is exact in the weights'
    # own dtype (q is w rounded to a coarser grid, so q/2 <= w <= 2q, or q == 0: Sterbenz), and
    # the sums accumulate in f32. A batch holds at most _STATS_BATCH_BYTES of weights, which
    # bounds the memory the statistics keep alive.
    batch_w: List[Any] = []
    batch_q: List[Any] = []
    batch_bytes = [0]
    spent = [0.0]
    nvfp4 = quantizer.format == "nvfp4"

    def stats_flush():
        if not batch_w:
            return
        with torch.no_grad():
            if batch_w[0].is_cuda and _cuda.available():  # a batch is of one device and dtype
                sums.append(_cuda.sq_err_many(batch_w, batch_q))
            else:
                e = torch._foreach_norm(torch._foreach_sub(batch_w, batch_q), 2, dtype=torch.float32)
                r = torch._foreach_norm(batch_w, 2, dtype=torch.float32)
                sums.append(torch.stack([torch.stack(e), torch.stack(r)], 1).double().square())
        batch_w.clear()
        batch_q.clear()
        batch_bytes[0] = 0

    def prep(w):
        w = w.detach()
        if param_dtype is not None and w.dtype != param_dtype:
            w = w.to(param_dtype)
        return w.contiguous()

    def record(w, qw):
        if batch_w and (batch_w[0].device != w.device or batch_w[0].dtype != w.dtype):
            stats_flush()  # a multi-tensor batch is of one device and dtype
        batch_w.append(w)
        batch_q.append(qw)
        batch_bytes[0] += w.numel() * w.element_size()
        if batch_bytes[0] >= _STATS_BATCH_BYTES:
            stats_flush()
        return qw

    def fq(w):
        t0 = time.perf_counter()
        w = prep(w)
        qw = record(w, quantizer.fake_quant(w))
        spent[0] += time.perf_counter() - t0
        return qw

    def flush(members: Dict[str, Tuple[str, Any]]) -> Iterator[Tuple[str, Any]]:
        # A fused group (NVFP4 q/k/v, gate/up) is quantized with one amax, the max of its
        # members'. `fake_quant_many` does it in one pass per kind of work (on CUDA: an amax
        # pass over every member, one fold, one fake quant of every member, no host sync, not
        # two launches per member and a fold); off CUDA it takes the group's amax and one
        # fake quant per member, same bits.
        t0 = time.perf_counter()
        names = [n for n, _ in members.values()]
        ws = [prep(t) for _, t in members.values()]
        with torch.no_grad():
            if nvfp4 and len({(w.device, w.dtype) for w in ws}) == 1:
                qs = quantizer.fake_quant_many(ws, groups=[0] * len(ws))
            elif nvfp4:  # members of mixed dtypes (no actor sends these): torch's amax, one fold
                amax = torch.stack([w.abs().amax().float().to(ws[0].device) for w in ws]).amax()
                qs = [quantizer.fake_quant(w, amax=amax if w.is_cuda else float(amax)) for w in ws]
            else:
                qs = [quantizer.fake_quant(w) for w in ws]
        out = [(n, record(w, q)) for n, w, q in zip(names, ws, qs)]
        spent[0] += time.perf_counter() - t0
        yield from out

    for name, t in named_tensors:
        key = normalize_name(name)
        mod, _, leaf = key.rpartition(".")
        if leaf != "weight" or mod not in expected:
            yield name, t
            continue
        seen.add(mod)
        group = groups.get(mod)
        if group is None or len(group) < 2:
            yield name, fq(t)
            continue
        bucket = pending.setdefault(group, {})
        bucket[mod] = (name, t)
        if len(bucket) == len(group):
            yield from flush(pending.pop(group))
    for group in list(pending):
        yield from flush(pending.pop(group))
    missing = sorted(expected - seen)
    if missing:
        raise VerlPluginError(
            f"the weight sync sent no weight for {len(missing)} of {len(expected)} fake-quantized modules "
            f"(first: {missing[0]}.weight): the sync's names do not match the actor model's, so the "
            "rollout would run unquantized weights"
        )
    t0 = time.perf_counter()
    stats_flush()
    both = torch.cat([x.to(sums[0].device) for x in sums]) if sums else None
    stats: Dict[str, float] = {"tensors": float(0 if both is None else len(both))}
    if both is not None:
        e, r = both[:, 0], both[:, 1]
        tot_e, tot_r = float(e.sum()), float(r.sum())
        per = (e / r.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        stats["rel_error"] = math.sqrt(tot_e / tot_r) if tot_r > 0 else 0.0
        stats["max_rel_error"] = float(per.max())
        stats["sqnr_db"] = 10 * math.log10(tot_r / tot_e) if tot_e > 0 else float("inf")
    stats["fake_quant_s"] = spent[0] + time.perf_counter() - t0
    if on_done is not None:
        on_done(stats)


def _stats_key() -> Optional[bytes]:
    ray = sys.modules.get("ray")
    try:  # only inside a Ray job: get_runtime_context() would start a local Ray instance
        if ray is None or not ray.is_initialized():
            return None
        return f"aqn_rs/quant_stats/{ray.get_runtime_context().get_job_id()}".encode()
    except Exception:
        return None


def _publish_stats(stats: Dict[str, float]) -> None:
    """Rank 0 of the actor puts the last sync's statistics in Ray's cluster key-value store,
    where the trainer reads them when it logs the step."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        key = _stats_key()
        if key is None:
            return
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            internal_kv._internal_kv_put(key, json.dumps(stats).encode(), overwrite=True)
    except Exception as e:  # statistics are best effort; training goes on
        logger.warning("aqn_rs: could not publish quantization statistics: %s", e)


def _read_stats() -> Optional[Dict[str, float]]:
    try:
        key = _stats_key()
        if key is None:
            return None
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            return None
        raw = internal_kv._internal_kv_get(key)
        return None if raw is None else json.loads(raw)
    except Exception:
        return None
