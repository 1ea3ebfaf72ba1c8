"""`aqn-rs run PRESET --engine verl`: the research plan's GRPO runs on verl (Ray, FSDP actor,
vLLM rollout) with the aqn_rs plugin (`aqn_rs.integrations.verl`), from one command.

    aqn-rs run 1E --engine verl --gpus 8 --data /path/to/gsm8k [--model PATH] [--dry-run]

* Data: GSM8K-format jsonl (a folder with train.jsonl and test.jsonl, or one file whose last
  10% validate) -- or, without `--data`, openai/gsm8k from the Hugging Face Hub -- written
  as verl's parquet (the rows of verl's examples/data_preprocess/gsm8k.py: data_source
  openai/gsm8k, one user message ending in verl's instruction, ground truth for the rule
  reward) to `runs/<name>/data/`. The jsonl is read where it is, never copied.
* Command: `python -m verl.trainer.main_ppo` with the plan's GRPO settings (Qwen2.5-1.5B-
  Instruct, lr 5e-7, 128 prompts a step, 3 epochs), the remaining values from verl's GSM8K
  GRPO example (examples/grpo_trainer/run_qwen2-7b.sh), N GPUs per node, the plugin loaded
  through `actor_rollout_ref.model.external_lib` and `VERL_USE_EXTERNAL_MODULES`
  (`ray_kwargs.ray_init.runtime_env.env_vars`), and the preset's blocks as
  `+trainer.quantization.*` / `+trainer.noise_injection.*`. `--set verl.KEY=VALUE` adds or
  replaces any verl override (`--set verl.trainer.total_epochs=1`). `--dry-run` prints it.
* Outputs: `runs/<name>/{config.yaml, command.sh, data/, verl_metrics.jsonl (verl's file
  logger), metrics.jsonl, summary.json, curves.png, checkpoints/}`; metrics.jsonl and
  summary.json have the local engine's keys, so `aqn-rs compare` reads verl runs too.

`aqn-rs run | sweep` (aqn_rs.cli.run) dispatches `--engine verl` here (`run_cli(args)`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..integrations.verl import parse_config
from . import outputs
from .data import BUILTIN, SYSTEM_PROMPT, load_data, parse_mix, prompt_messages, read_gsm8k
from .env import parse_gpus, parse_sigmas, visible_gpus
from .errors import ExperimentError
from .reward import GSM8K_SUFFIX, ground_truth

PLUGIN = "aqn_rs.integrations.verl"
DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
HUB_DATASET = "openai/gsm8k"
DATA_SOURCE = "openai/gsm8k"  # selects verl's GSM8K rule reward (verl/utils/reward_score/gsm8k.py)
PLAN_GPUS = 8  # the plan's runs: 8 GPUs on one node (used by --dry-run when none is visible)

# The plan's GRPO settings, then verl's GSM8K GRPO example (run_qwen2-7b.sh) for the rest. The
# example's mini-batch ratio (256 of 1024 prompts) gives 32 of 128; the micro-batch (20 samples a
# GPU) divides the per-GPU mini-batch (32 * 5 / N) for N = 1, 2, 4 and 8 GPUs. Tensor parallel 1:
# a 1.5B model fits one GPU (the example's 2 is for 7B).
PLAN_OVERRIDES: Tuple[Tuple[str, Any], ...] = (
    ("algorithm.adv_estimator", "grpo"),
    ("data.train_batch_size", 128),
    ("data.max_prompt_length", 512),
    ("data.max_response_length", 1024),
    ("data.filter_overlong_prompts", True),
    ("data.truncation", "error"),
    ("actor_rollout_ref.model.use_remove_padding", True),
    ("actor_rollout_ref.model.enable_gradient_checkpointing", True),
    # FSDP2 (verl's recommended strategy): the actor's AQN stands in for the RMSNorm weight
    # Parameter during the forward, which FSDP1 without use_orig_params does not keep.
    ("actor_rollout_ref.actor.strategy", "fsdp2"),
    ("actor_rollout_ref.actor.optim.lr", 5e-7),
    ("actor_rollout_ref.actor.ppo_mini_batch_size", 32),
    ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", 20),
    ("actor_rollout_ref.actor.use_kl_loss", True),
    ("actor_rollout_ref.actor.kl_loss_coef", 0.001),
    ("actor_rollout_ref.actor.kl_loss_type", "low_var_kl"),
    ("actor_rollout_ref.actor.entropy_coeff", 0),
    ("actor_rollout_ref.actor.fsdp_config.param_offload", False),
    ("actor_rollout_ref.actor.fsdp_config.optimizer_offload", False),
    ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", 40),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size", 1),
    ("actor_rollout_ref.rollout.name", "vllm"),
    ("actor_rollout_ref.rollout.gpu_memory_utilization", 0.6),
    ("actor_rollout_ref.rollout.n", 5),
    ("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", 40),
    ("actor_rollout_ref.ref.fsdp_config.param_offload", True),
    ("algorithm.use_kl_in_reward", False),
    ("trainer.critic_warmup", 0),
    ("trainer.logger", ["console", "file"]),
    ("trainer.project_name", "aqn_rs"),
    ("trainer.nnodes", 1),
    ("trainer.save_freq", 20),
    ("trainer.test_freq", 5),
    ("trainer.total_epochs", 3),
)
# Preset keys forwarded to the plugin (aqn_rs.integrations.verl.QUANT_DEFAULTS / NOISE_DEFAULTS).
QUANT_KEYS = ("format", "scale_mode", "injection_point", "layer_types", "exclude", "include", "ste",
              "fuse_global_scales")
NOISE_KEYS = ("enabled", "sigma_start", "sigma_end", "num_stages", "layer_types", "decay", "zero_first_stage",
              "apply_to", "relative", "seed", "exclude", "include")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def verl_rows(records: Sequence[Dict[str, Any]], split: str, system_prompt: Optional[str] = None
              ) -> List[Dict[str, Any]]:
    """GSM8K records ({question, answer}) as verl's parquet rows, field for field what verl's
    examples/data_preprocess/gsm8k.py writes; with `system_prompt`, the prompt is the local
    engine's (that system message, then the same user message)."""
    rows = []
    for idx, r in enumerate(records):
        question, answer = str(r["question"]), str(r["answer"])
        prompt = (prompt_messages(question, system_prompt) if system_prompt is not None
                  else [{"role": "user", "content": question + " " + GSM8K_SUFFIX}])
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": prompt,
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ground_truth(answer)},
            "extra_info": {"split": split, "index": idx, "answer": answer, "question": question},
        })
    return rows


def read_records(data: Optional[str], mix: Any = None) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], str]:
    """(train, test, description) from `--data` (folder or jsonl file, or `builtin`: the local
    engine's arithmetic task) or the Hub's openai/gsm8k."""
    if data == BUILTIN:
        return load_data(None, mix=mix)
    if data is None:
        try:
            import datasets
        except ImportError:
            raise ExperimentError("without --data the verl engine reads openai/gsm8k from the Hugging Face Hub, "
                                  "which needs the datasets package (pip install datasets), or pass --data") from None
        try:
            ds = datasets.load_dataset(HUB_DATASET, "main")
        except Exception as e:
            raise ExperimentError(f"cannot load {HUB_DATASET} from the Hub ({type(e).__name__}); pass --data "
                                  "with a folder holding train.jsonl and test.jsonl") from None
        return list(ds["train"]), list(ds["test"]), f"{HUB_DATASET} (Hugging Face Hub)"
    return read_gsm8k(data)


def write_parquet(rows: Sequence[Dict[str, Any]], path: pathlib.Path) -> None:
    """Rows to a parquet file (pyarrow, which verl itself depends on)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExperimentError("writing verl's parquet data needs pyarrow (pip install pyarrow)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    tmp.replace(path)


def prepare_data(data: Optional[str], out_dir: pathlib.Path, mix: Any = None
                 ) -> Tuple[pathlib.Path, pathlib.Path, str]:
    """Write train.parquet and test.parquet for verl into `out_dir`; returns their paths and a
    description of the source (`mix`: the built-in task's levels, preset key data.builtin_mix)."""
    train, test, desc = read_records(data, mix)
    # The built-in task keeps the local engine's prompt: its worked example is what lets a
    # 135M model write `#### n` at all (data.py), so verl's strict GSM8K reward can score it.
    system = SYSTEM_PROMPT if data == BUILTIN else None
    out_dir = pathlib.Path(out_dir)
    tr, te = out_dir / "train.parquet", out_dir / "test.parquet"
    write_parquet(verl_rows(train, "train", system), tr)
    write_parquet(verl_rows(test, "test", system), te)
    return tr, te, desc


def describe_data(data: Optional[str]) -> str:
    """What `prepare_data` will read, checked without reading it (for --dry-run)."""
    if data == BUILTIN:
        return "builtin arithmetic word problems (the local engine's task and prompt), scored by verl's GSM8K rule"
    if data is None:
        return f"{HUB_DATASET} from the Hugging Face Hub (pass --data for a local GSM8K jsonl folder)"
    p = pathlib.Path(data)
    if p.is_dir():
        missing = [f for f in ("train.jsonl", "test.jsonl") if not (p / f).is_file()]
        if missing:
            raise ExperimentError(f"data folder {p} needs train.jsonl and test.jsonl (GSM8K layout); missing {missing}")
        return f"{p.resolve()} (train.jsonl, test.jsonl)"
    if not p.is_file():
        raise ExperimentError(f"data path {p} does not exist")
    return f"{p.resolve()} (last 10% validate)"


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_./@-]+")


def hydra_value(v: Any) -> str:
    """A Python value in Hydra's override grammar (lists, quoted strings, true/false/null)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ExperimentError(f"cannot pass {v} to verl")
        return repr(v)
    if isinstance(v, str):
        if _PLAIN.fullmatch(v) and v.lower() not in ("true", "false", "null") and not _looks_numeric(v):
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    raise ExperimentError(f"cannot pass a {type(v).__name__} to verl")


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _flatten(d: Dict[str, Any], prefix: str = "") -> Iterable[Tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def plugin_blocks(cfg: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """The preset's quantization and noise blocks as the plugin reads them (None when off)."""
    q = cfg.get("quantization") or {}
    n = cfg.get("noise_injection") or {}
    quant = {k: q[k] for k in QUANT_KEYS if k in q} if q.get("format", "none") != "none" else None
    if quant is not None and quant.get("format") == "nvfp4":
        quant.pop("scale_mode", None)
    noise = {k: n[k] for k in NOISE_KEYS if k in n} if n.get("enabled") else None
    return quant, noise


def overrides(cfg: Dict[str, Any], run_dir: str, gpus: int, data_dir: str, model: Optional[str] = None,
              steps: Optional[int] = None) -> List[str]:
    """The Hydra overrides of one run, in order: the plan's settings, run-specific paths, the
    plugin, then `--set verl.*` overrides (which replace a default of the same key)."""
    run_dir, data_dir = str(run_dir), str(data_dir)
    items: List[Tuple[str, Any]] = list(PLAN_OVERRIDES)
    items += [
        ("data.train_files", os.path.join(data_dir, "train.parquet")),
        ("data.val_files", os.path.join(data_dir, "test.parquet")),
        ("actor_rollout_ref.model.path", model or DEFAULT_MODEL),
        ("trainer.n_gpus_per_node", int(gpus)),
        ("trainer.experiment_name", cfg["name"]),
        ("trainer.default_local_dir", os.path.join(run_dir, "checkpoints")),
        ("+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH", os.path.join(run_dir, "verl_metrics.jsonl")),
    ]
    if steps is not None:
        items.append(("trainer.total_training_steps", int(steps)))
    quant, noise = plugin_blocks(cfg)
    if quant is not None or noise is not None:
        try:  # the plugin's own check, so a bad preset fails here and not in a Ray worker
            parse_config(quant, noise)
        except Exception as e:
            raise ExperimentError(str(e)) from None
        items += [
            ("actor_rollout_ref.model.external_lib", PLUGIN),
            ("+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES", PLUGIN),
        ]
        # the read-back of the rollout's weights (integrations/verl_probe.py) in every process
        for var in ("AQN_RS_PROBE_DIR", "AQN_RS_PROBE_STEPS"):
            if os.environ.get(var):
                items.append((f"+ray_kwargs.ray_init.runtime_env.env_vars.{var}", os.environ[var]))
        items += [(f"+trainer.quantization.{k}", v) for k, v in (quant or {}).items()]
        items += [(f"+trainer.noise_injection.{k}", v) for k, v in (noise or {}).items()]
    user = dict(_flatten(cfg.get("verl") or {}))
    if not has_flash_attn():
        # verl's remove-padding path calls flash-attn's varlen kernels; without the package the
        # actor would fail at its first forward. sdpa on padded batches computes the same loss.
        items = [(k, False if k == "actor_rollout_ref.model.use_remove_padding" else v) for k, v in items]
        items.append(("+actor_rollout_ref.model.override_config.attn_implementation", "sdpa"))
    # Set for every Ray worker through verl's runtime env rather than left to inheritance (a Ray
    # cluster started elsewhere does not carry the driver's environment); a value the user
    # exported here is passed on instead.
    for var, value in worker_env().items():
        items.append((f"+ray_kwargs.ray_init.runtime_env.env_vars.{var}", os.environ.get(var, value)))
    index = {k.lstrip("+"): i for i, (k, _) in enumerate(items)}
    for k, v in user.items():
        i = index.get(k.lstrip("+"))
        if i is not None:
            items[i] = (items[i][0], v)
        else:
            items.append((k, v))
    return [f"{k}={hydra_value(v)}" for k, v in items]


def build_command(cfg: Dict[str, Any], run_dir: str, gpus: int, data_dir: str, model: Optional[str] = None,
                  steps: Optional[int] = None, python: Optional[str] = None) -> List[str]:
    """argv of `python -m verl.trainer.main_ppo ...` for a loaded preset (see `overrides`)."""
    return [python or sys.executable, "-m", "verl.trainer.main_ppo",
            *overrides(cfg, run_dir, gpus, data_dir, model, steps)]


# ---------------------------------------------------------------------------------------------
# Metrics: verl's file logger -> the local engine's metrics.jsonl / summary.json
# ---------------------------------------------------------------------------------------------

# verl metric -> metrics.jsonl key (outputs.py). The GSM8K rule reward is 1 for an exact strict
# answer and 0 otherwise (format_score 0), so its validation mean is the strict accuracy.
VERL_KEYS = {
    "actor/entropy": "entropy",
    "critic/score/mean": "reward",
    "critic/score/std": "reward_std",
    "actor/kl_loss": "kl",
    "actor/pg_loss": "loss",
    "actor/grad_norm": "grad_norm",
    "actor/lr": "learning_rate",
    "response_length/mean": "completion_length",
    "response_length/clip_ratio": "clipped_ratio",
    "timing_s/step": "step_time",
    "timing_s/gen": "gen_time",
    "timing_s/update_weights": "sync_time",
    "timing_s/update_actor": "update_time",
    "aqn/sigma": "sigma",
    "aqn/stage": "stage",
    "quant/rel_error": "quant_rel_error",
    "quant/sqnr_db": "quant_sqnr_db",
    "quant/fake_quant_s": "sync_fake_quant_time",
}
VAL_KEY = re.compile(r"^val-core/.*gsm8k/(?:reward|acc)/mean@1$")


def convert_metrics(lines: Iterable[str]) -> List[Dict[str, Any]]:
    """verl file-logger lines (`{"step": s, "data": {...}}`) as metrics.jsonl records."""
    by_step: Dict[int, Dict[str, Any]] = {}
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        step, data = int(rec.get("step", 0)), rec.get("data") or {}
        out = by_step.setdefault(step, {"step": step})
        for k, v in data.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k in VERL_KEYS:
                out[VERL_KEYS[k]] = float(v)
            elif VAL_KEY.match(k):
                out["val_strict"] = float(v)
    return [by_step[s] for s in sorted(by_step)]


def finish_run(cfg: Dict[str, Any], run_dir: pathlib.Path) -> Dict[str, Any]:
    """metrics.jsonl, summary.json and curves.png of a finished verl run."""
    src = run_dir / "verl_metrics.jsonl"
    if not src.is_file():
        raise ExperimentError(f"verl wrote no metrics ({src} missing): see its output above")
    records = convert_metrics(src.read_text().splitlines())
    writer = outputs.MetricsWriter(run_dir / "metrics.jsonl")
    for r in records:
        writer.write(r)
    times = [r["step_time"] for r in records if r.get("step_time") is not None]
    summary = outputs.summarize(cfg, records, {"engine": "verl",
                                               "mean_step_seconds": sum(times) / len(times) if times else None})
    outputs.write_summary(run_dir, summary)
    outputs.plot_curves(run_dir, records, title=f"{cfg['name']} (verl)")
    return summary


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


# import name -> pip name. transfer_queue: verl 0.9.1's default trainer (trainer.use_v1, TaskRunnerV1)
# imports it, and verl's [vllm] extra does not bring it.
RUN_PACKAGES = {"verl": "verl", "vllm": "vllm", "ray": "ray", "transfer_queue": "TransferQueue"}


def missing_packages() -> List[str]:
    """What a real (not --dry-run) verl run needs and this Python lacks (pip names)."""
    return [pip for mod, pip in RUN_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def has_flash_attn() -> bool:
    """Whether verl's remove-padding path (flash-attn's varlen kernels) can run here."""
    return importlib.util.find_spec("flash_attn") is not None


def has_flashinfer() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def worker_env() -> Dict[str, str]:
    """Environment the rollout and actor workers need on a machine without flash-attn/flashinfer.

    - `VLLM_USE_FLASHINFER_SAMPLER=0`: vLLM's sampler defaults to FlashInfer's top-k/top-p
      kernels on CUDA and raises ImportError at construction when the package is absent.
    - `TORCH_CUDNN_SDPA_DEPRIORITIZED=1`: without flash-attn the actor runs on sdpa, where torch
      2.11 puts cuDNN attention first on sm90; its backward gives NaN grad_q for left-padded rows
      at lengths 64 mod 128 (docs/guides/VERL.md, "Requirements and limits").
    """
    env = {}
    if not has_flashinfer():
        env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    if not has_flash_attn():
        env["TORCH_CUDNN_SDPA_DEPRIORITIZED"] = "1"
    return env


def _gpus(text: Any, dry_run: bool) -> Tuple[int, str]:
    present = visible_gpus()
    n = parse_gpus(text)
    if n is None:
        if present:
            return present, f"{present} GPU(s) (all visible)"
        if dry_run:
            return PLAN_GPUS, f"{PLAN_GPUS} GPUs (the plan's; none visible here)"
        raise ExperimentError("the verl engine needs GPUs (none visible); use --engine local for a CPU run")
    if n < 1:
        raise ExperimentError(f"the verl engine needs --gpus >= 1, got {n} (use --engine local for a CPU run)")
    if not dry_run and n > present:
        raise ExperimentError(f"--gpus {n} asked but {present} GPU(s) present on this machine")
    return n, f"{n} GPU(s) per node"


def plan_run(args: Any, extra_overrides: Sequence[str] = (), name: Optional[str] = None) -> Dict[str, Any]:
    """Every check of one verl run, cheapest first; the preset with its `run` block and command."""
    from . import presets

    ov = list(getattr(args, "overrides", None) or []) + list(extra_overrides)
    cfg = presets.load_preset(args.preset, ov)
    if getattr(args, "steps", None) is not None and args.steps < 1:
        raise ExperimentError(f"--steps must be >= 1, got {args.steps}")
    if args.model in ("embedded",):
        raise ExperimentError("the verl engine needs a transformers model vLLM can load: pass --model "
                              f"PATH_OR_HUB_ID (default {DEFAULT_MODEL})")
    if args.model is not None and args.model.endswith(".gguf"):
        raise ExperimentError("the verl engine needs a transformers model folder or Hub id, not a .gguf file")
    dry = bool(getattr(args, "dry_run", False))
    gpus, gpu_desc = _gpus(getattr(args, "gpus", "auto"), dry)
    data_desc = describe_data(args.data)
    if args.data == "builtin":  # its level mix is checked here, not in the Ray job
        parse_mix((cfg.get("data") or {}).get("builtin_mix"))
    run_name = name or args.name or cfg["name"]
    cfg["name"] = run_name
    run_dir = pathlib.Path(args.output).resolve() / run_name
    model = args.model if args.model is None or not os.path.exists(args.model) else str(pathlib.Path(args.model).resolve())
    cmd = build_command(cfg, str(run_dir), gpus, str(run_dir / "data"), model, getattr(args, "steps", None))
    cfg["run"] = {"preset": args.preset, "engine": "verl", "gpus": gpus, "gpu_description": gpu_desc,
                  "model": model or DEFAULT_MODEL, "data": data_desc, "output": str(run_dir), "overrides": ov,
                  "command": cmd}
    return cfg


def describe(cfg: Dict[str, Any]) -> str:
    from .presets import describe as preset_describe

    q, n = preset_describe(cfg)
    r = cfg["run"]
    attn = "" if has_flash_attn() else " (no flash-attn here: sdpa, use_remove_padding=false)"
    return (f"preset {r['preset']} -> {r['output']}\n"
            f"  quantization: {q}; AQN: {n}{attn}\n"
            f"  engine verl, {r['gpu_description']}, model: {r['model']}, data: {r['data']}\n"
            f"  command:\n{shlex.join(r['command'])}")


def execute(cfg: Dict[str, Any], data: Optional[str]) -> Dict[str, Any]:
    """Prepare the data, run verl, convert its metrics."""
    import yaml

    missing = missing_packages()
    if missing:
        raise ExperimentError(f"the verl engine needs {', '.join(missing)} in this Python: pip install "
                              f"{' '.join(missing)} (docs/guides/VERL.md lists the versions checked)")
    run_dir = pathlib.Path(cfg["run"]["output"])
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "summary.json", "curves.png", "verl_metrics.jsonl"):
        (run_dir / f).unlink(missing_ok=True)
    tr, te, desc = prepare_data(data, run_dir / "data", (cfg.get("data") or {}).get("builtin_mix"))
    print(f"[aqn-rs] data: {desc} -> {tr}, {te}", file=sys.stderr, flush=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = cfg["run"]["command"]
    (run_dir / "command.sh").write_text("#!/usr/bin/env bash\n" + shlex.join(cmd) + "\n")
    print("[aqn-rs] " + shlex.join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise ExperimentError(f"verl exited with status {rc} (see its output above)")
    return finish_run(cfg, run_dir)


def run_cli(args: Any) -> int:
    """`aqn-rs run|sweep ... --engine verl` (raises ExperimentError, which the CLI prints)."""
    cmd = getattr(args, "cmd", None) or getattr(args, "command", None)
    if cmd == "run":
        cfg = plan_run(args)
        print(describe(cfg), flush=True)
        if args.dry_run:
            return 0
        s = execute(cfg, args.data)
        print(outputs.summary_line(cfg, s))
        return 0
    if cmd == "sweep":
        from . import presets  # yaml

        base = presets.load_preset(args.preset, args.overrides)
        ratio = presets.sigma_ratio(base, args.preset)
        points = [presets.sweep_point(args.name or base["name"], s, ratio) for s in parse_sigmas(args.sigma)]
        cfgs = [plan_run(args, ov, name) for name, ov in points]
        for c in cfgs:
            print(describe(c), flush=True)
        if args.dry_run:
            return 0
        for c in cfgs:
            execute(c, args.data)
        res = outputs.compare([c["run"]["output"] for c in cfgs], pathlib.Path(args.output), f"sweep-{base['name']}")
        print(res["table"], end="")
        return 0
    raise ExperimentError(f"the verl engine runs `run` and `sweep`, not {cmd!r}")
