"""The single-machine engine: TRL's `GRPOTrainer` with the package's fake quant and AQN.

The policy generates its own rollouts, so the rollout sees the quantized (and, per the preset,
noised) model. Fake quant is `aqn_rs.quantize_model` on the policy (STE backward, master weights
untouched); in LoRA mode the adapters sit on top of the frozen fake-quantized base (QeRL's
mode): quantize first, then wrap with peft, so the adapters themselves stay in full precision.

AQN advances once per optimizer step (QeRL: `sigma(global_step)` at generation time): a trainer
callback moves the noise to step `state.global_step` when a step begins (`NoiseDriver` says
where the noise goes for each `apply_to`); master weights are never noised when the optimizer
updates them. Validation (greedy, strict and flexible GSM8K accuracy) runs without noise.

Multi-GPU: `aqn-rs run ... --gpus N` relaunches this module under `accelerate launch`
(`python -m aqn_rs.experiments.local RUN_DIR`); each rank reads the resolved
`RUN_DIR/config.yaml`, validation is sharded over ranks and summed, rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .._aqn_rs import __version__
from ..aqn import AqnNoise
from ..models import converted_folder, load_model_and_tokenizer, resolve_model
from . import data as data_mod
from . import outputs, presets
from .errors import ExperimentError
from .reward import Gsm8kReward, compute_score

# ---- validation ------------------------------------------------------------------------------


def evaluate(model, tok, records: Sequence[Dict[str, Any]], max_new_tokens: int, batch_size: int = 32,
             rank: int = 0, world: int = 1, gather=None) -> Dict[str, Any]:
    """Greedy strict and flexible GSM8K accuracy of `model` on `records` (TRL prompt rows).

    Args:
        records: rows with "prompt" (messages) and "answer" (ground truth), optional "level".
        rank, world, gather: shard over ranks; `gather(tensor)` sums the counts (accelerate).

    Returns:
        {"strict": float, "flexible": float, "format": float (share with a strict `#### n`),
         "n": int, "by_level": {level: strict}, "sample": first completion}
    """
    import torch

    mine = list(records)[rank::world]
    counts = torch.zeros(3 + 2 * 4, dtype=torch.float64)  # strict, flexible, format, per level (n, ok)
    sample = None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            comps = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, c in zip(chunk, comps):
                s = compute_score(c, r["answer"], "strict")
                counts[0] += s
                counts[1] += compute_score(c, r["answer"], "flexible")
                counts[2] += compute_score(c, r["answer"], "strict", format_score=1.0)
                lv = int(r.get("level", 0))
                if 1 <= lv <= 3:
                    counts[3 + 2 * lv] += 1
                    counts[4 + 2 * lv] += s
                if sample is None:
                    sample = c
    finally:
        model.train(was_training)
    if gather is not None and world > 1:
        counts = gather(counts.to(device)).reshape(world, -1).sum(0).cpu()
    n = len(records)
    res = {"strict": float(counts[0] / n), "flexible": float(counts[1] / n), "format": float(counts[2] / n), "n": n,
           "by_level": {}, "sample": sample}
    for lv in (1, 2, 3):
        if counts[3 + 2 * lv] > 0:
            res["by_level"][str(lv)] = float(counts[4 + 2 * lv] / counts[3 + 2 * lv])
    return res


# ---- SFT warm-up -----------------------------------------------------------------------------


def sft_warmup(model, tok, records: Sequence[Dict[str, Any]], steps: int, lr: float, batch_size: int, seed: int,
               device, autocast_bf16: bool = False, log=None) -> List[float]:
    """Supervised steps on worked answers before GRPO (docs/guides/EXPERIMENTS.md, "Training
    modes": W4A16 SmolLM2 starts with so little strict-format output that GRPO gets no reward
    signal). Trains exactly what GRPO trains (all weights through the STE, or the LoRA
    adapters), on the same chat prompt; the loss covers the answer tokens only. Returns the
    loss of every step.
    """
    import random

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    r = random.Random(seed)
    model.train()
    losses: List[float] = []
    pad = tok.pad_token_id
    for i in range(steps):
        batch = r.sample(list(records), min(batch_size, len(records)))
        ids, labels = [], []
        for rec in batch:
            prompt = tok.apply_chat_template(data_mod.prompt_messages(str(rec["question"])), tokenize=False,
                                             add_generation_prompt=True)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tok(str(rec["answer"]) + tok.eos_token, add_special_tokens=False)["input_ids"]
            ids.append(p_ids + a_ids)
            labels.append([-100] * len(p_ids) + a_ids)
        n = max(len(x) for x in ids)
        mask = [[1] * len(x) + [0] * (n - len(x)) for x in ids]
        ids = [x + [pad] * (n - len(x)) for x in ids]
        labels = [x + [-100] * (n - len(x)) for x in labels]
        t = lambda v: torch.tensor(v, device=device)  # noqa: E731
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = model(input_ids=t(ids), attention_mask=t(mask), labels=t(labels)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log is not None and (i == 0 or (i + 1) % 10 == 0 or i + 1 == steps):
            log(f"SFT warm-up step {i + 1}/{steps}: loss {losses[-1]:.4f}")
    del opt
    return losses


# ---- AQN driver ------------------------------------------------------------------------------


class NoiseDriver:
    """Drives an `aqn_rs.AqnNoise` on the policy, one noise draw per optimizer step, in the
    phases its `apply_to` names (docs/reference/NOISE.md, "Where noise goes"):

    * `actor` / `both`: `aqn_rs.hooks.attach_noise` adds the step's noise out of place in the
      modules' forward (master weights untouched; modules in eval mode draw none). TRL
      generates in train mode, so `both` also noises the rollouts; `actor` switches the noise
      off around generation.
    * `rollout` (QeRL): `noise.apply_(model, step)` in place just before generation and
      `noise.restore_(model)` right after, so the training forward and the optimizer update
      see the clean weights.
    """

    def __init__(self, model, noise) -> None:
        from ..hooks import attach_noise

        self.model, self.noise, self.apply_to = model, noise, noise.apply_to
        self.handle = attach_noise(model, noise) if noise.applies_to("actor") else None
        self.mode = {"actor": "forward hook", "both": "forward hook", "rollout": "in place around generation"}[self.apply_to]

    def begin_step(self, step: int) -> None:
        self.noise.set_step(int(step))

    @contextlib.contextmanager
    def generation(self):
        """Around rollout generation."""
        if self.apply_to == "actor":
            with self.noise.disabled():
                yield
        elif self.apply_to == "rollout":
            self.noise.apply_(self.model, self.noise.step)
            try:
                yield
            finally:
                self.noise.restore_(self.model)
        else:
            yield

    @contextlib.contextmanager
    def off(self):
        """Validation: no noise."""
        with self.noise.disabled():
            yield

    def sigma(self, step: int) -> float:
        return float(self.noise.scheduler.sigma(int(step)))

    def stage(self, step: int) -> int:
        return int(self.noise.scheduler.stage(int(step)))

    def remove(self) -> None:
        self.noise.restore_(self.model)
        if self.handle is not None:
            self.handle.remove()


# ---- the run ---------------------------------------------------------------------------------


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log(msg: str) -> None:
    if _is_main():
        print(f"[aqn-rs] {msg}", file=sys.stderr, flush=True)


def save_checkpoint(model, tok, path: pathlib.Path) -> None:
    """A transformers folder (config + safetensors + tokenizer) of the master weights; LoRA
    adapters are merged into a copy of the state dict (the live model is not changed)."""
    path.mkdir(parents=True, exist_ok=True)
    base = model
    sd = None
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        base = model.get_base_model()
        sd = _merged_lora_state_dict(model)
    base.save_pretrained(path, state_dict=sd, safe_serialization=True)
    tok.save_pretrained(path)


def _merged_lora_state_dict(peft_model) -> Dict[str, Any]:
    import torch

    deltas = {}
    for name, mod in peft_model.get_base_model().named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and getattr(mod, "active_adapters", None):
            d = None
            for a in mod.active_adapters:
                if a in getattr(mod, "lora_A", {}):
                    dd = mod.get_delta_weight(a)
                    d = dd if d is None else d + dd
            if d is not None:
                deltas[f"{name}.weight"] = d
    out = {}
    for k, v in peft_model.get_base_model().state_dict().items():
        if "lora_" in k:
            continue
        k2 = k.replace(".base_layer.", ".")
        if k2 in deltas:
            with torch.no_grad():
                v = (v.float() + deltas[k2].float()).to(v.dtype)
        out[k2] = v.detach().cpu().contiguous()
    return out


def build_trainer_args(t: Dict[str, Any], run_dir: pathlib.Path, gpus: int, lr: float):
    from trl import GRPOConfig

    world = max(1, gpus)
    per_step = t["prompts_per_step"] * t["generations"]
    if per_step % world:
        raise ExperimentError(f"{t['prompts_per_step']} prompts x {t['generations']} completions = {per_step} "
                              f"is not divisible by {world} GPUs; change training.prompts_per_step")
    on_gpu = gpus > 0
    return GRPOConfig(
        output_dir=str(run_dir / "trainer"),
        max_steps=int(t["steps"]),
        per_device_train_batch_size=per_step // world,
        gradient_accumulation_steps=1,  # one rollout batch per optimizer step: AQN step = update
        num_generations=int(t["generations"]),
        max_completion_length=int(t["max_new_tokens"]),
        learning_rate=float(lr),
        lr_scheduler_type=t.get("lr_scheduler", "linear"),
        warmup_steps=0,
        beta=float(t["beta"]),
        temperature=float(t["temperature"]),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=int(t["seed"]),
        data_seed=int(t["seed"]),
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,  # 135M parameters fit; checkpointing only slows it down
        disable_tqdm=not _is_main(),
        dataloader_num_workers=0,
        log_completions=False,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )


def run_local(cfg: Dict[str, Any], run_dir: pathlib.Path) -> Dict[str, Any]:
    """Train one preset with TRL's GRPOTrainer on this process (one rank under accelerate).

    Args:
        cfg: the resolved config (`presets.load_preset` plus the `run` block the CLI adds:
            gpus, model, data).
        run_dir: where config.yaml, metrics.jsonl, summary.json, curves.png and checkpoints go.

    Returns:
        The summary dict (also written to summary.json on rank 0).
    """
    import torch
    from transformers import TrainerCallback, set_seed

    # Everything is read from local files; never wait on a hub that is not reachable.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = cfg["run"]
    gpus = int(run["gpus"])
    on_gpu = gpus > 0
    if on_gpu:
        avoid_cudnn_attention()
    t = presets.effective_training(cfg, on_gpu)
    set_seed(int(t["seed"]))
    folder, gguf, model_desc = resolve_model(run.get("model"))
    train_recs, eval_recs, data_desc = data_mod.load_data(run.get("data"), eval_size=int(t["eval_size"]),
                                                          mix=(cfg.get("data") or {}).get("builtin_mix"))
    train_rows = data_mod.to_prompt_records(train_recs)
    eval_rows = data_mod.to_prompt_records(eval_recs)

    # Rank 0 converts the GGUF once; the other ranks wait for it.
    if gguf is not None and gpus > 1:
        from accelerate import PartialState

        with PartialState().main_process_first():
            folder = converted_folder(folder, gguf, log=_log)
    else:
        folder = converted_folder(folder, gguf, log=_log)
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(folder)
    _log(f"model {model_desc}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
         f"loaded in {time.perf_counter() - t0:.1f} s")

    qhandle = None
    quantizer = presets.quantizer_from(cfg)
    if quantizer is not None:
        from ..hooks import quantize_model  # torch

        qhandle = quantize_model(model, quantizer, **presets.quantize_kwargs(cfg))
        _log(f"fake quant: {len(qhandle.modules)} modules, {quantizer!r}, {cfg['quantization']['injection_point']}")

    lr = float(t["learning_rate"])
    if t.get("mode", "full") == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = t.get("lora") or {}
        model = get_peft_model(model, LoraConfig(
            r=int(lcfg.get("r", 32)), lora_alpha=int(lcfg.get("alpha", 64)), lora_dropout=float(lcfg.get("dropout", 0.0)),
            target_modules=lcfg.get("target_modules", "all-linear"), task_type="CAUSAL_LM"))
        lr = float(lcfg.get("learning_rate", lr))

    sft_losses: List[float] = []
    n_sft = int(t.get("sft_warmup_steps") or 0)
    if n_sft > 0:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
        model.to(device)
        sft_losses = sft_warmup(model, tok, train_recs, n_sft, float(t.get("sft_learning_rate", 1e-5)),
                                int(t.get("sft_batch_size", 16)), int(t["seed"]), device, autocast_bf16=on_gpu, log=_log)

    driver = None
    nk = presets.noise_kwargs(cfg)
    if nk is not None:
        noise = AqnNoise.from_config(nk, total_steps=int(t["steps"]))
        driver = NoiseDriver(model, noise)
        _log(f"AQN: {presets.describe(cfg)[1]}, apply_to={driver.apply_to} ({driver.mode})")

    from datasets import Dataset
    from trl import GRPOTrainer

    args = build_trainer_args(t, run_dir, gpus, lr)
    reward = Gsm8kReward(cfg["reward"]["correct"], cfg["reward"]["format"])
    writer = outputs.MetricsWriter(run_dir / "metrics.jsonl") if _is_main() else None

    class _Trainer(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            ctx = driver.generation() if driver is not None else contextlib.nullcontext()
            with ctx:
                return super()._generate_single_turn(*a, **kw)

    state: Dict[str, Any] = {"val": {}, "pending": {}, "step_t0": None, "step_times": [], "skipped": []}

    def validate(step: int, trainer) -> None:
        acc = trainer.accelerator
        m = acc.unwrap_model(trainer.model_wrapped if hasattr(trainer, "model_wrapped") else trainer.model)
        ctx = driver.off() if driver is not None else contextlib.nullcontext()
        tv = time.perf_counter()
        with ctx:
            res = evaluate(m, tok, eval_rows, int(t["max_new_tokens"]), int(t.get("eval_batch_size", 32)),
                           rank=acc.process_index, world=acc.num_processes, gather=acc.gather)
        res["seconds"] = time.perf_counter() - tv
        state["val"][step] = res
        state["pending"].update({"val_strict": res["strict"], "val_flexible": res["flexible"],
                                 "val_format": res["format"], "val_seconds": res["seconds"],
                                 **{f"val_strict_level{k}": v for k, v in res["by_level"].items()}})
        _log(f"step {step}: validation strict {res['strict'] * 100:.1f}%, flexible {res['flexible'] * 100:.1f}% "
             f"({res['n']} problems, {res['seconds']:.1f} s)")

    def checkpoint(name: str, trainer) -> None:
        if trainer.accelerator.is_main_process:
            m = trainer.accelerator.unwrap_model(trainer.model)
            save_checkpoint(m, tok, run_dir / "checkpoints" / name)
        trainer.accelerator.wait_for_everyone()

    class _Callback(TrainerCallback):
        def on_train_begin(self, args_, st, control, **kw):
            validate(0, trainer)
            if writer is not None:
                rec = {"step": 0, **state["pending"]}
                if driver is not None:
                    rec.update({"sigma": driver.sigma(0), "stage": driver.stage(0)})
                writer.write(rec)
            state["pending"] = {}

        def on_step_begin(self, args_, st, control, **kw):
            state["step_t0"] = time.perf_counter()
            if driver is not None:
                driver.begin_step(st.global_step)
                state["pending"].update({"sigma": driver.sigma(st.global_step), "stage": driver.stage(st.global_step),
                                         "aqn_step": st.global_step})

        def on_pre_optimizer_step(self, args_, st, control, **kw):
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            if drop_nonfinite_grads(params):
                state["skipped"].append(st.global_step + 1)
                state["pending"]["skipped_nonfinite_grad"] = 1
                _log(f"step {st.global_step + 1}: non-finite gradient, optimizer step skipped "
                     f"({len(state['skipped'])} so far)")

        def on_step_end(self, args_, st, control, **kw):
            dt = time.perf_counter() - state["step_t0"]
            state["step_times"].append(dt)
            state["pending"]["step_time"] = dt
            k = int(t["eval_every"])
            if k and st.global_step % k == 0 and st.global_step < int(t["steps"]):
                validate(st.global_step, trainer)
            s = int(t["save_every"])
            if s and st.global_step % s == 0 and st.global_step < int(t["steps"]):
                checkpoint(f"step-{st.global_step:06d}", trainer)

        def on_log(self, args_, st, control, logs=None, **kw):
            logs = dict(logs or {})
            if "train_runtime" in logs:
                state["train_log"] = logs
                return
            if writer is not None and "reward" in logs:
                rec = {"step": st.global_step, **outputs.pick_train_metrics(logs), **state["pending"]}
                writer.write(rec)
            state["pending"] = {}

    trainer = _Trainer(model=model, reward_funcs=[reward], args=args, train_dataset=_dataset(Dataset, train_rows),
                       processing_class=tok, callbacks=[_Callback()])
    _log(f"GRPO: {t['steps']} steps x {t['prompts_per_step']} prompts x {t['generations']} completions, "
         f"{t['max_new_tokens']} new tokens, lr {lr:g}, beta {t['beta']}, mode {t.get('mode', 'full')}, "
         f"{'%d GPU(s)' % gpus if on_gpu else 'CPU'}; data: {data_desc}")
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train
    final_step = trainer.state.global_step
    validate(final_step, trainer)
    if writer is not None:
        writer.write({"step": final_step, "final": True, **state["pending"]})
    checkpoint("final", trainer)
    if driver is not None:
        driver.remove()

    summary: Dict[str, Any] = {}
    if _is_main():
        records = outputs.read_metrics(run_dir / "metrics.jsonl")
        summary = outputs.summarize(cfg, records, extra={
            "engine": "local (TRL GRPOTrainer)",
            "device": (torch.cuda.get_device_name(0) if on_gpu else "cpu") + (f" x{gpus}" if gpus > 1 else ""),
            "gpus": gpus,
            "model": model_desc,
            "data": data_desc,
            "training": t,
            "train_seconds": train_seconds,
            "mean_step_seconds": (sum(state["step_times"]) / len(state["step_times"])) if state["step_times"] else None,
            "quantized_modules": len(qhandle.modules) if qhandle is not None else 0,
            "aqn_mode": driver.mode if driver is not None else None,
            "sft_warmup": {"steps": len(sft_losses), "loss_first": sft_losses[0], "loss_last": sft_losses[-1]}
            if sft_losses else None,
            "checkpoints": sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").iterdir())
            if (run_dir / "checkpoints").is_dir() else [],
            "sample_completion": state["val"].get(final_step, {}).get("sample"),
            "skipped_nonfinite_steps": state["skipped"],
            "processes": trainer.accelerator.num_processes,
            "aqn_rs_version": __version__,
        })
        outputs.write_summary(run_dir, summary)
        outputs.plot_curves(run_dir, records, title=cfg["name"])
        _log(f"done: {run_dir} (strict {summary['val_strict_initial'] * 100:.1f}% -> {summary['val_strict_final'] * 100:.1f}%, "
             f"collapse verdict: {summary['collapse']['verdict']})")
    return summary


def _dataset(Dataset, rows):
    """`Dataset.from_list(rows)` with a fingerprint computed from the rows themselves.

    datasets otherwise fingerprints a new Dataset by pickling its Arrow table with dill, which
    fails on the GPU image's datasets 5.2 / dill 0.4.1 / pyarrow 26 (`Can't pickle
    MonthDayNano`, seen on the H100, docs/results/RESULTS.md); a content hash is just as
    unique here.
    """
    import hashlib

    from datasets.table import InMemoryTable

    digest = hashlib.sha1(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Dataset(InMemoryTable.from_pylist(rows), fingerprint=f"aqn-rs-{digest}")


def avoid_cudnn_attention() -> None:
    """Turn off the cuDNN backend of `scaled_dot_product_attention` in this process.

    torch 2.11's default SDPA backend on Hopper (cuDNN) returns NaN in grad_q for query rows
    that attend to nothing (the left padding of the prompts) when the padded length is 64 mod
    128 (pytorch/pytorch#196678, huggingface/trl#7181); the forward stays finite. On 2 H100s it
    hit exactly the 13 of 100 steps whose batch padded to 192 tokens (docs/results/RESULTS.md). The
    flash and memory-efficient backends are correct, and SDPA falls back to them.
    """
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def drop_nonfinite_grads(params) -> bool:
    """Drop every gradient when any is NaN/Inf, so the optimizer skips the step; True if dropped.

    A NaN in one gradient turns every gradient NaN through the global-norm clip, and one optimizer
    step on them makes the weights NaN and the next sampling fail with a device-side assert in
    `torch.multinomial` (seen once in 100 H100 baseline steps, docs/results/RESULTS.md). AdamW
    leaves a parameter whose `.grad` is None untouched. Under DDP the gradients are already
    all-reduced, so every rank takes the same decision. One device sync per optimizer step.
    """
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return False
    norms = torch._foreach_norm(grads)
    if bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()):
        return False
    for p in params:
        p.grad = None
    return True


def main(argv: Optional[List[str]] = None) -> int:
    """Worker entry under `accelerate launch`: `python -m aqn_rs.experiments.local RUN_DIR`."""
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m aqn_rs.experiments.local RUN_DIR (with RUN_DIR/config.yaml)", file=sys.stderr)
        return 2
    run_dir = pathlib.Path(argv[0])
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    try:
        run_local(cfg, run_dir)
    except ExperimentError as e:
        print(f"aqn-rs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
