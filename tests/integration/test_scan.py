"""The SRDD scanner (`aqn_rs.scan`, `aqn-rs scan`, scripts/srdd_quant_scanner.py).

The numbers are checked against an independent pure-torch computation of the same metrics
(docs/guides/SCANNER.md) built on `aqn_rs.reference`, on a small random Llama checkpoint written
here: counts exactly, SQNR to 1e-6 relative. The scanner's CUDA path (torch reductions over the
quantizer outputs) is run on CPU tensors and must equal the Rust core. Then the inputs (folder,
sharded, single file, verl, run folder), the errors, the CLIs, `--compare`, `--calib`, the
plot, and the memory bound (peak RSS growth <= largest tensor + a constant).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from aqn_rs import reference as ref  # noqa: E402
from aqn_rs import scan as S  # noqa: E402
from aqn_rs.cli import scan as scan_cli  # noqa: E402
from aqn_rs.export import fused_weight_groups  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ALL_MODES = ("floor", "rceil", "even", "ceil")


def _char_tokenizer():
    """A character-level tokenizer (printable ASCII + newline), so calibration runs offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = ["<unk>", "<pad>", "</s>", "\n"] + [chr(c) for c in range(32, 127)]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")


def _write_llama(path: Path, seed: int = 0, dtype=torch.bfloat16, tie: bool = False, shard: str = None,
                 perturb: float = 0.0) -> Path:
    """A tiny random Llama; intermediate 72 gives down_proj a short last block in both formats.
    Weights are Student-t(3) (heavier tails than init) so saturation shows."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=112,
                                   tie_word_embeddings=tie, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                t = torch.distributions.StudentT(3.0).sample(p.shape) * 0.02
                p.copy_(t * (1 + perturb * torch.randn(p.shape, generator=g)))
            if "layers.1.self_attn.v_proj" in n:
                p[:, 5] = 0.0  # zeros are not deadzone
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    _char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _write_llama(tmp_path_factory.mktemp("scan") / "tiny")


@pytest.fixture(scope="module")
def results(ckpt):
    return S.scan(ckpt, "all", scale_mode=list(ALL_MODES), progress=False)


# ---------------------------------------------------------------------------------------------
# Independent pure-torch metrics (docs/guides/SCANNER.md, "Metrics"), from aqn_rs.reference
# ---------------------------------------------------------------------------------------------


def _ref_metrics(x: torch.Tensor, fmt: str, mode: str, amax=None) -> dict:
    k = x.shape[-1]
    if fmt == "mxfp4":
        codes, scales = ref.mxfp4_quantize(x, mode)
        q = ref.mxfp4_fake_quant(x, mode)
        block = 32
        dec = ref.e8m0_decode(scales)  # [rows, nb]
        gs = None
    else:
        codes, scales, gs = ref.nvfp4_quantize(x, amax)
        q = ref.nvfp4_fake_quant(x, amax)
        block = 16
        dec = ref.e4m3_decode(scales) / gs
    nb = -(-k // block)
    idx = torch.arange(k) // block  # block of each column
    d_el = dec[:, idx]  # decode scale per element
    xf = x.float()
    if fmt == "mxfp4":
        y = xf * ref._pow2(127 - scales.to(torch.int64))[:, idx]  # x * 2^-e
    else:
        y = xf / d_el
    xd, qd = xf.double(), q.float().double()
    err = xd - qd
    el_codes = ref.unpack_nibbles(codes, k)
    out = {
        "sum_x2": float((xd * xd).sum()), "sum_err2": float((err * err).sum()),
        "max_abs_err": float(err.abs().max()),
        "deadzone": int(((xf != 0) & (qd == 0)).sum()), "saturated": int((y.abs() > 6).sum()),
        "zeros": int((xf == 0).sum()),
        "codes": torch.bincount(el_codes.flatten().long(), minlength=16).tolist(),
        "scale_bytes": torch.bincount(scales.flatten().long(), minlength=256).tolist(),
        "dec_min": float(dec.min()), "dec_max": float(dec.max()), "dec_sum": float(dec.double().sum()),
        "gs": None if gs is None else float(gs),
    }
    # gain scan: probes r * amax_b with the block's scale fixed
    pad = nb * block - k
    xb = torch.cat([xf, torch.zeros(xf.shape[0], pad)], 1).view(-1, nb, block)
    a = xb.abs().amax(-1)
    ok = a > 0
    lad = torch.tensor(S.gain_ladder(), dtype=torch.float32)
    A, D = a[ok].unsqueeze(-1), dec[ok].unsqueeze(-1)
    p = A * lad
    if fmt == "mxfp4":
        yy = p * ref._pow2(127 - scales.to(torch.int64))[ok].unsqueeze(-1)
    else:
        yy = p / D
    qq = ref.e2m1_decode(ref.e2m1_encode(yy)) * D
    out["response_sum"] = (qq.double() / A.double()).sum(0).tolist()
    out["probe_dead"] = (qq == 0).sum(0).tolist()
    out["probe_clipped"] = (yy.abs() > 6).sum(0).tolist()
    out["gain_blocks"] = int(ok.sum())
    return out


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def test_metrics_equal_pure_torch(ckpt, results):
    """Every layer, every format and MXFP4 scale mode: counts exact, sums to 1e-6 (SQNR too)."""
    sd = load_file(str(ckpt / "model.safetensors"))
    layers = {e["name"]: e for e in results["layers"]}
    names = [e["name"] for e in results["layers"]]
    assert "model.layers.0.mlp.down_proj" in names and "lm_head" in names and "model.embed_tokens" in names
    assert layers["lm_head"]["excluded"] and layers["model.embed_tokens"]["excluded"]
    groups = fused_weight_groups([n for n in names if not layers[n]["excluded"] and layers[n]["type"] == "linear"])
    assert len(groups) == 4  # q/k/v and gate/up in each of 2 blocks
    group_amax = {m: max(float(sd[f"{g}.weight"].float().abs().max()) for g in grp) for grp in groups for m in grp}
    ladder = results["settings"]["gain_ladder"]
    checked = 0
    for name, e in layers.items():
        x = sd[f"{name}.weight"]
        assert e["shape"] == list(x.shape) and e["dtype"] == "bfloat16"
        for key, m in e["metrics"].items():
            fmt, _, mode = key.partition("-")
            r = _ref_metrics(x, fmt, mode, group_amax.get(name) if fmt == "nvfp4" else None)
            c = m["counts"]
            assert (c["deadzone"], c["saturated"], c["zeros"]) == (r["deadzone"], r["saturated"], r["zeros"]), (name, key)
            assert m["code_hist"] == r["codes"], (name, key)
            hist = [0] * 256
            for b, n in m["scales"]["byte_hist"].items():
                hist[int(b)] = n
            assert hist == r["scale_bytes"], (name, key)
            assert m["max_abs_err"] == pytest.approx(r["max_abs_err"], rel=1e-7)
            assert _rel(m["sums"]["sum_x2"], r["sum_x2"]) < 1e-9
            assert _rel(m["sums"]["sum_err2"], r["sum_err2"]) < 1e-9
            sqnr = 10 * math.log10(r["sum_x2"] / r["sum_err2"])
            assert _rel(m["sqnr_db"], sqnr) < 1e-6, (name, key)
            assert _rel(m["rel_err"], math.sqrt(r["sum_err2"] / r["sum_x2"])) < 1e-6
            n = x.numel()
            assert m["deadzone_frac"] == pytest.approx(r["deadzone"] / n, rel=1e-6)
            assert m["saturation_frac"] == pytest.approx(r["saturated"] / n, rel=1e-6)
            assert m["scales"]["dec_min"] == pytest.approx(r["dec_min"], rel=1e-7)
            assert m["scales"]["dec_max"] == pytest.approx(r["dec_max"], rel=1e-7)
            blocks = m["scales"]["blocks"]
            assert m["scales"]["dec_mean"] == pytest.approx(r["dec_sum"] / blocks, rel=1e-7)
            if fmt == "nvfp4":
                assert m["scales"]["global_scale"] == r["gs"]
            g = m["gain"]
            assert g["blocks"] == r["gain_blocks"]
            assert [round(f * g["blocks"]) for f in g["dead_frac"]] == r["probe_dead"]
            assert [round(f * g["blocks"]) for f in g["clip_frac"]] == r["probe_clipped"]
            resp = [s / r["gain_blocks"] for s in r["response_sum"]]
            assert g["response"] == pytest.approx(resp, rel=1e-5, abs=1e-7)
            want = S._edges(ladder, [v / r["gain_blocks"] for v in r["probe_dead"]],
                            [v / r["gain_blocks"] for v in r["probe_clipped"]])
            for k2, v in want.items():
                assert g[k2] == pytest.approx(v, rel=1e-9) if v is not None else g[k2] is None
            checked += 1
    assert checked == len(layers) * 5
    # the down_proj weight [64, 72] has a short last block in both formats
    assert layers["model.layers.0.mlp.down_proj"]["metrics"]["nvfp4"]["scales"]["blocks"] == 64 * 5
    assert layers["model.layers.1.self_attn.v_proj"]["metrics"]["nvfp4"]["counts"]["zeros"] >= 32


def _rand_tensor(kind: str, shape, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 2)
    if kind == "special":
        flat = x.view(-1)
        flat[3] = float("nan")
        flat[70] = float("inf")
        flat[96:144] = 0.0  # row 2: zero blocks in both formats
        flat[200] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key", ["mxfp4-floor", "mxfp4-rceil", "nvfp4"])
@pytest.mark.parametrize("kind,shape", [("plain", (33, 100)), ("special", (5, 7, 48)), ("plain", (1, 1))])
def test_torch_path_equals_rust(dtype, key, kind, shape):
    """The CUDA path's torch reductions, run on CPU tensors, equal the Rust core: every count
    exactly, f64 sums to summation order."""
    spec = next(s for s in S.format_specs("all", ALL_MODES) if s.key == key)
    x = _rand_tensor(kind, shape, dtype, seed=len(shape) * 7 + len(key))
    a = S.rust_raw_stats(x, spec)
    b = S.torch_raw_stats(x, spec, chunk_elems=256)  # several chunks
    for k, v in a.items():
        if isinstance(v, float) and k.startswith(("sum", "dec_sum")):
            assert b[k] == pytest.approx(v, rel=1e-12, abs=1e-300), k
        elif k == "response_sum":
            assert b[k] == pytest.approx(v, rel=1e-12), k
        else:
            assert b[k] == v, k
    if kind == "special":
        assert a["nonfinite_blocks"] == 2 and a["zero_blocks"] >= 1
    # deterministic: a second pass gives the same bits
    assert S.rust_raw_stats(x, spec) == a


def test_empty_and_amax_override():
    spec = S.format_specs("nvfp4")[0]
    e = S.rust_raw_stats(torch.zeros(0, 16), spec)
    assert e["numel"] == 0 and e["blocks"] == 0
    x = torch.randn(4, 32)
    a = S.rust_raw_stats(x, spec, amax=100.0)
    assert a["global_scale"] == pytest.approx(26.88, rel=1e-6)
    assert S.torch_raw_stats(x, spec, amax=100.0)["codes"] == a["codes"]


# ---------------------------------------------------------------------------------------------
# Results: schema, summary, report, plot, compare
# ---------------------------------------------------------------------------------------------


def test_results_schema_summary_and_json_roundtrip(results, tmp_path):
    assert results["schema"] == S.SCHEMA and results["schema_version"] == S.SCHEMA_VERSION
    assert list(results["settings"]["formats"]) == ["mxfp4-floor", "mxfp4-rceil", "mxfp4-even", "mxfp4-ceil", "nvfp4"]
    s = results["summary"]
    assert s["excluded_layers"] == ["model.embed_tokens", "lm_head"]
    assert s["quantized_layers"] == 14
    inc = [e for e in results["layers"] if not e["excluded"]]
    for key, f in s["formats"].items():
        sx = sum(e["metrics"][key]["sums"]["sum_x2"] for e in inc)
        se = sum(e["metrics"][key]["sums"]["sum_err2"] for e in inc)
        assert f["totals"]["sqnr_db"] == pytest.approx(10 * math.log10(sx / se), rel=1e-7)
        assert set(f["by_proj"]) == {"q", "k", "v", "o", "gate", "up", "down"}
        assert f["by_proj"]["q"]["layers"] == 2
        sq = [w["sqnr_db"] for w in f["worst_layers"]]
        assert sq == sorted(sq) and f["worst_layers"][0]["sqnr_db"] == f["totals"]["min_layer_sqnr_db"]
        assert f["gain"]["blocks"] == sum(e["metrics"][key]["gain"]["blocks"] for e in inc)
    # rceil never clips (d >= amax / 6); NVFP4's RNE block scale clips about half the blocks' max
    assert s["formats"]["mxfp4-rceil"]["totals"]["saturation_frac"] == 0
    assert s["formats"]["mxfp4-rceil"]["gain"]["saturation_onset"] is None
    assert 0.3 < s["formats"]["nvfp4"]["gain"]["saturating_blocks_frac"] < 0.7
    assert 1 / 32 < s["formats"]["mxfp4-floor"]["gain"]["deadzone_edge"] <= 1 / 16 * 1.2
    p = S.write_results(results, tmp_path / "r.json")
    back = S.load_results(p)
    assert back["layers"][3]["metrics"]["nvfp4"]["code_hist"] == results["layers"][3]["metrics"]["nvfp4"]["code_hist"]
    assert back["summary"] == json.loads(json.dumps(back["summary"]))
    text = S.format_report(results)
    assert "mxfp4-floor" in text and "worst layers" in text and "gate" in text
    bad = json.loads(p.read_text())
    bad["schema_version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(S.ScanError, match="schema version 99"):
        S.load_results(tmp_path / "bad.json")


def test_plot(results, tmp_path):
    pytest.importorskip("matplotlib")
    out = S.plot_results(results, tmp_path / "scan.png", other=results)
    assert out is not None and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_command_line_and_compare(ckpt, tmp_path, capsys):
    """The plan's exact flags; then --compare with a scan of a perturbed checkpoint, in both
    forms (with --model, and two JSON files)."""
    a = tmp_path / "a.json"
    assert scan_cli.plan_main(["--model_path", str(ckpt), "--quant_type", "mxfp4", "--output", str(a), "--quiet"]) == 0
    ra = S.load_results(a)
    assert list(ra["settings"]["formats"]) == ["mxfp4-floor"]
    other = _write_llama(tmp_path / "other", seed=0, perturb=0.3)
    b = tmp_path / "b.json"
    assert scan_cli.plan_main(["--model_path", str(other), "--quant_type", "mxfp4", "--output", str(b),
                        "--compare", str(a), "--quiet"]) == 0
    rb = S.load_results(b)
    comp = rb["compare"]["formats"]["mxfp4-floor"]
    assert rb["compare"]["matched_layers"] == len(ra["layers"])
    row = next(r for r in comp["layers"] if r["name"] == "model.layers.0.mlp.up_proj")
    here = next(e for e in rb["layers"] if e["name"] == row["name"])["metrics"]["mxfp4-floor"]["sqnr_db"]
    there = next(e for e in ra["layers"] if e["name"] == row["name"])["metrics"]["mxfp4-floor"]["sqnr_db"]
    assert row["delta_sqnr_db"] == pytest.approx(here - there, abs=1e-6)
    t = comp["totals"]
    assert t["delta_sqnr_db"] == pytest.approx(t["sqnr_db"] - t["other_sqnr_db"], abs=1e-6)
    assert t["layers_better"] + t["layers_worse"] == 14
    # two-file form through `aqn-rs scan` arguments
    import argparse

    ap = argparse.ArgumentParser()
    scan_cli.add_cli(ap.add_subparsers(dest="cmd"))
    c = tmp_path / "c.json"
    args = ap.parse_args(["scan", "--compare", str(b), str(a), "--output", str(c), "--plot", str(tmp_path / "c.png")])
    capsys.readouterr()
    assert scan_cli.run_cli(args) == 0
    out = capsys.readouterr().out
    assert "compared with" in out
    assert S.load_results(c)["compare"]["formats"]["mxfp4-floor"]["totals"] == t


def test_script_runs_as_written(ckpt, tmp_path):
    """`python scripts/srdd_quant_scanner.py --model_path PATH --quant_type mxfp4 --output F`."""
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "srdd_quant_scanner.py"), "--model_path", str(ckpt),
                        "--quant_type", "mxfp4", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SQNR dB" in r.stdout and S.load_results(out)["summary"]["quantized_layers"] == 14


# ---------------------------------------------------------------------------------------------
# Inputs and errors
# ---------------------------------------------------------------------------------------------


def _sqnrs(r):
    return {e["name"]: e["metrics"]["nvfp4"]["sqnr_db"] for e in r["layers"]}


def test_inputs_sharded_single_file_verl_and_run_folders(ckpt, results, tmp_path):
    base = _sqnrs(results)
    sharded = _write_llama(tmp_path / "sharded", shard="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    src = S.resolve_model(sharded)
    assert src.kind == "safetensors-folder" and len(src.files) > 2
    assert _sqnrs(S.scan(sharded, "nvfp4", progress=False)) == base
    # a single file without a config next to it: Linear layers by name
    single = tmp_path / "loose" / "weights.safetensors"
    single.parent.mkdir()
    single.write_bytes((ckpt / "model.safetensors").read_bytes())
    r = S.scan(single, "nvfp4", progress=False)
    assert S.resolve_model(single).kind == "safetensors-file" and _sqnrs(r) == base
    # verl: global_step_N/actor/huggingface, found from the trainer folder, the step or actor
    hf = tmp_path / "ckpts" / "global_step_40" / "actor" / "huggingface"
    hf.mkdir(parents=True)
    (tmp_path / "ckpts" / "global_step_7").mkdir()
    for f in ckpt.iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    for p in (tmp_path / "ckpts", hf.parent.parent, hf.parent, hf):
        src = S.resolve_model(p)
        assert src.folder == hf and src.kind in ("verl", "safetensors-folder")
    assert _sqnrs(S.scan(tmp_path / "ckpts", "nvfp4", progress=False)) == base
    # one of our run folders
    final = tmp_path / "runs" / "r1" / "checkpoints" / "final"
    final.parent.mkdir(parents=True)
    os.symlink(ckpt, final)
    src = S.resolve_model(tmp_path / "runs" / "r1")
    assert src.kind == "run" and src.folder == final
    # GGUF is recognised (reading it is transformers' job; not exercised here: slow)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert S.resolve_model(tmp_path / "m.gguf").kind == "gguf"


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(S.ScanError, match="does not exist"):
        S.resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(S.ScanError, match="no model weights"):
        S.resolve_model(tmp_path / "empty")
    actor = tmp_path / "global_step_5" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "huggingface" / "config.json").write_text("{}")
    for r in range(2):
        (actor / f"model_world_size_2_rank_{r}.pt").write_bytes(b"")
    for p in (actor.parent, actor, actor / "model_world_size_2_rank_0.pt"):
        with pytest.raises(S.ScanError, match="verl.model_merger merge --backend fsdp") as e:
            S.resolve_model(p)
        assert str(actor) in str(e.value)
    with pytest.raises(S.ScanError, match="unknown quant type 'int4'"):
        S.format_specs("int4")
    with pytest.raises(S.ScanError, match="scale mode"):
        S.format_specs("mxfp4", "round")
    # on the command line: one line on stderr, exit 2 (argparse's own for bad choices)
    assert scan_cli.plan_main(["--model_path", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        scan_cli.plan_main(["--model_path", "x", "--quant_type", "int4"])
    assert e.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    assert scan_cli.plan_main(["--quiet"]) == 2
    assert "pass --model PATH" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert scan_cli.plan_main(["--model_path", str(tmp_path), "--device", "cuda", "--quiet"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_calib_without_tokenizer_is_a_clear_error(ckpt, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((ckpt / f).read_bytes())
    with pytest.raises(S.ScanError, match="needs the model's tokenizer"):
        S.scan(bare, "nvfp4", calib="builtin", calib_samples=2, progress=False)


def test_calibration_output_error_and_nll(ckpt):
    """--calib: the clean NLL equals the model's own per-sample teacher-forced loss (no padding
    involved), and a layer's output error equals a direct computation (embed_tokens: the rows
    of the fake-quantized table the calibration tokens pick)."""
    r = S.scan(ckpt, "nvfp4", calib="builtin", calib_samples=3, calib_batch_size=2, progress=False)
    c = r["calib"]
    texts, _ = S.calibration_texts("builtin", 3)
    assert c["samples"] == 3 and c["tokens"] == sum(len(t) - 1 for t in texts)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    total = 0.0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
    assert c["nll"]["clean"] == pytest.approx(total / c["tokens"], rel=1e-5)
    assert c["nll"]["nvfp4"]["delta"] == pytest.approx(c["nll"]["nvfp4"]["nll"] - c["nll"]["clean"])
    w = model.model.embed_tokens.weight.detach()
    wq = S.FormatSpec("nvfp4", "nvfp4").quantizer().fake_quant(w.contiguous())
    ids = torch.cat([tok(t, return_tensors="pt")["input_ids"][0] for t in texts])
    sy = float((w[ids].double() ** 2).sum())
    se = float(((wq[ids] - w[ids]).double() ** 2).sum())
    emb = next(e for e in r["layers"] if e["name"] == "model.embed_tokens")["metrics"]["nvfp4"]["output"]
    assert emb["tokens"] == len(ids) and emb["sqnr_db"] == pytest.approx(10 * math.log10(sy / se), rel=1e-5)
    for e in r["layers"]:
        o = e["metrics"]["nvfp4"]["output"]
        assert o["tokens"] == len(ids) and o["sqnr_db"] is not None and 5 < o["sqnr_db"] < 60, e["name"]
    assert "output_sqnr_db" in r["summary"]["formats"]["nvfp4"]["by_proj"]["q"]


def test_peak_memory_is_one_tensor(tmp_path):
    """A weights-only scan holds one tensor at a time: in a fresh process, after a warm-up scan
    of a small file (imports), the peak RSS growth of scanning a 160 MiB checkpoint is its
    largest tensor (32 MiB) plus a small constant: tensors are read with plain reads into one
    reusable buffer (no memory map, whose touched pages would stay resident; no fresh buffer
    per tensor, which the allocator would fragment)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 4096, generator=g) for i in range(8)}
    tensors["model.layers.8.mlp.down_proj.weight"] = torch.randn(2048, 4096, generator=g)  # 32 MiB
    big, small = tmp_path / "big.safetensors", tmp_path / "small.safetensors"
    save_file(tensors, str(big))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(64, 64, generator=g)}, str(small))
    del tensors
    code = textwrap.dedent(f"""
        from aqn_rs import scan as S
        def status():
            return {{k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
                    if k in ("VmRSS", "VmHWM")}}
        S.scan({str(small)!r}, "all", progress=False)
        base = status()["VmRSS"]
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        S.scan({str(big)!r}, "all", progress=False)
        print((status()["VmHWM"] - base) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    growth_mib = int(r.stdout.split()[-1])
    assert 31 <= growth_mib <= 32 + 16, growth_mib
