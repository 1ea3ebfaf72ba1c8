"""Export of packed FP4 checkpoints (compressed-tensors format) and reading them back.

The peer is the real `compressed-tensors` package (pinned 0.20.0 in CI): its own decompression
of our files must equal our `fake_quant` bit for bit, its own compressed checkpoints must read
back through ours to exactly its decompression, and our config must pass its parsing. Models are
tiny Llama / Qwen2 built from a transformers config (no downloads); everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
pytest.importorskip("safetensors")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.entrypoints.convert import convert_checkpoint  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import aqn_rs  # noqa: E402
from aqn_rs import export as E  # noqa: E402
from aqn_rs.cli import export as export_cli  # noqa: E402

PRESET = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
# Weight-sized magnitudes that differ by powers of two between layers, so the members of a
# fused group have different amax (fusing the global scale then matters).
MAG_POW2 = (-3, 4)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, intermediate: int = 96):
    """A 2-layer Llama or Qwen2 (Qwen2 has q/k/v biases) with per-layer weight magnitudes."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, tie_word_embeddings=True))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(2.0 ** torch.randint(*MAG_POW2, (), generator=g).item())
                if m.bias is not None:
                    m.bias.normal_(generator=g)
    return model.to(dtype).eval()


def load_dir(d) -> dict:
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def raw(t):
    """The bits of a tensor, comparable with torch.equal (NaN == NaN when the bits agree)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t


def ct_decompress(src, dst, dtype=torch.bfloat16) -> dict:
    """compressed-tensors' own decompression of a checkpoint folder (its model-free path)."""
    convert_checkpoint(src, dst, CompressedTensorsDequantizer(src, dtype=dtype), device="cpu", max_workers=1)
    return load_dir(dst)


def ct_compress(model, fmt: str, out, fuse: bool = False):
    """Quantize and save `model` with compressed-tensors' own scheme, calibration and compressor
    (what llm-compressor's QuantizationModifier does for a weight-only preset, minus the
    modifier): generate_gparam -> (llm-compressor's fused min over q/k/v and gate/up) ->
    calculate_qparams per group -> ModelCompressor.compress_model -> save -> update_config."""
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(PRESET[fmt], ["Linear"])},
                            ignore=["lm_head"])
    apply_quantization_config(model, qc, show_progress=False)
    mods = {n: m for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    if fmt == "nvfp4":
        for m in mods.values():
            m.weight_global_scale.data.copy_(generate_gparam(m.weight.data.min(), m.weight.data.max()))
        if fuse:  # llm-compressor's update_fused_layer_weight_global_scales
            for group in E.fused_weight_groups(mods):
                gs = torch.cat([mods[n].weight_global_scale.data for n in group]).min().reshape(1)
                for n in group:
                    mods[n].weight_global_scale.data.copy_(gs)
    for m in mods.values():
        args = m.quantization_scheme.weights
        w = m.weight.data.unflatten(-1, (-1, args.group_size))
        s, _ = calculate_qparams(w.amin(-1), w.amax(-1), args, global_scale=getattr(m, "weight_global_scale", None))
        m.weight_scale.data.copy_(s)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(str(out))
    comp.update_config(str(out))
    return Path(out)


def expected_fake_quant(model, fmt: str, scale_mode="floor", dtype=torch.bfloat16, fuse=True) -> dict:
    """{X.weight: fake_quant of the weight} as the export computes it: cast to `dtype`, NVFP4
    fused groups quantized with the group's common amax."""
    q = aqn_rs.Nvfp4Quantizer() if fmt == "nvfp4" else aqn_rs.Mxfp4Quantizer(scale_mode)
    names = [n for n in E.linear_module_names(model) if n != "lm_head"]
    sd = model.state_dict()
    ws = {n: sd[n + ".weight"].to(dtype).contiguous() for n in names}
    amax = {}
    if fmt == "nvfp4" and fuse:
        for group in E.fused_weight_groups(names):
            a = max(q.amax(ws[n]) for n in group)
            amax.update({n: a for n in group})
    return {f"{n}.weight": (q.fake_quant(w, amax.get(n)) if fmt == "nvfp4" else q.fake_quant(w))
            for n, w in ws.items()}


def leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.aqn-")]


# ---------------------------------------------------------------------------------------------
# compressed-tensors decompresses our files to exactly our fake quant
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,fmt,mode",
    [("llama", "nvfp4", None), ("qwen2", "nvfp4", None)]
    + [("llama", "mxfp4", m) for m in aqn_rs.SCALE_MODES]
    + [("qwen2", "mxfp4", "floor")],
)
def test_ct_decompression_of_our_export_equals_fake_quant(tmp_path, arch, fmt, mode):
    model = tiny_model(arch)
    out = E.export_checkpoint(model, tmp_path / "ckpt", fmt, mode, max_shard_size="40KB")
    assert len(glob.glob(str(out / "*.safetensors"))) > 1  # sharded, with an index
    deq = ct_decompress(str(out), str(tmp_path / "deq"))
    ours = E.dequantize_checkpoint(out)
    want = expected_fake_quant(model, fmt, mode or "floor")
    assert len(want) == 14
    for name, w in want.items():
        assert torch.equal(raw(deq[name]), raw(w)), name
        assert torch.equal(raw(ours[name]), raw(w)), name
    # Everything else: the model's tensors in bf16 (lm_head tied in Qwen2: written once).
    sd = {k: v for k, v in model.state_dict().items() if k not in want}
    if arch == "qwen2":
        assert "lm_head.weight" not in deq
        sd.pop("lm_head.weight")
    assert set(deq) == set(sd) | set(want)
    for name, t in sd.items():
        assert torch.equal(raw(deq[name]), raw(t.to(torch.bfloat16))), name


def test_fused_groups_share_one_global_scale(tmp_path):
    model = tiny_model()
    out = E.export_checkpoint(model, tmp_path / "ckpt")
    sd = load_dir(out)
    q = aqn_rs.Nvfp4Quantizer()
    for layer in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            part = "self_attn" if "q_proj" in group else "mlp"
            names = [f"model.layers.{layer}.{part}.{g}" for g in group]
            gss = {float(sd[n + ".weight_global_scale"]) for n in names}
            amax = max(q.amax(model.state_dict()[n + ".weight"].to(torch.bfloat16)) for n in names)
            assert gss == {q.global_scale(amax)}, names
    # The groups really differ in amax, so per-tensor scales would have differed.
    unfused = load_dir(E.export_checkpoint(model, tmp_path / "unfused", fuse_global_scales=False))
    qkv = [unfused[f"model.layers.0.self_attn.{p}.weight_global_scale"].item() for p in ("q_proj", "k_proj", "v_proj")]
    assert len(set(qkv)) > 1


# ---------------------------------------------------------------------------------------------
# Same layout, config and (for f32 weights) bytes as compressed-tensors' own compressor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,mode,fuse", [("nvfp4", None, True), ("nvfp4", None, False), ("mxfp4", "even", False)])
def test_bytes_equal_compressed_tensors_compressor_for_f32(tmp_path, fmt, mode, fuse):
    """For f32 weights our codes, block scales and global scales are compressed-tensors' own
    (docs/guides/EXPORT.md: its NVFP4 arithmetic; its MXFP4 scale is our `even` mode; `fuse` =
    llm-compressor's fused global scales). So the two checkpoints are identical tensor for tensor."""
    theirs = load_dir(ct_compress(tiny_model(), fmt, tmp_path / "ct", fuse=fuse))
    ours = load_dir(E.export_checkpoint(tiny_model(), tmp_path / "ours", fmt, mode, dtype=None, fuse_global_scales=fuse))
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        assert torch.equal(raw(ours[name]), raw(theirs[name])), name


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_names_dtypes_and_config_match_compressed_tensors(tmp_path, fmt):
    model = tiny_model(dtype=torch.bfloat16)
    theirs_dir = ct_compress(tiny_model(dtype=torch.bfloat16), fmt, tmp_path / "ct")
    ours_dir = E.export_checkpoint(model, tmp_path / "ours", fmt)
    theirs, ours = load_dir(theirs_dir), load_dir(ours_dir)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in ours.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in theirs.items()
    }
    q = "model.layers.0.self_attn.q_proj"
    assert ours[q + ".weight_packed"].dtype == torch.uint8 and tuple(ours[q + ".weight_packed"].shape) == (64, 32)
    if fmt == "nvfp4":
        assert ours[q + ".weight_scale"].dtype == torch.float8_e4m3fn
        assert ours[q + ".weight_global_scale"].dtype == torch.float32 and ours[q + ".weight_global_scale"].shape == (1,)
    else:
        assert ours[q + ".weight_scale"].dtype == torch.uint8 and q + ".weight_global_scale" not in ours
    cfg_t = json.loads((theirs_dir / "config.json").read_text())["quantization_config"]
    cfg_o = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    cfg_t.pop("version"), cfg_o.pop("version")
    assert cfg_o == cfg_t


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_config_passes_compressed_tensors_parsing(tmp_path, fmt):
    out = E.export_checkpoint(tiny_model(), tmp_path / "ckpt", fmt, exclude=["lm_head", "embed_tokens", "re:.*\\.1\\.mlp\\."])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    scheme = parsed.config_groups["group_0"]
    # (compared as serialized: compressed-tensors drops a symmetric scheme's zp_dtype itself)
    assert scheme.weights.model_dump() == preset_name_to_scheme(PRESET[fmt], ["Linear"]).weights.model_dump()
    assert infer_module_format(torch.nn.Linear, scheme).value == E.CT_FORMATS[fmt] == parsed.format
    assert parsed.ignore == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                             "model.layers.1.mlp.down_proj", "lm_head"]
    # transformers' config class and the ModelCompressor built from it (what from_pretrained does)
    hf_cfg = transformers.CompressedTensorsConfig.from_dict(qc)
    comp = ModelCompressor.from_compression_config(hf_cfg)
    assert comp.quantization_config.format == E.CT_FORMATS[fmt]
    assert E.quantization_config(fmt, parsed.ignore) == qc


def test_transformers_loads_our_checkpoint(tmp_path):
    """transformers' compressed-tensors integration loads and decompresses our checkpoint to our
    fake quant."""
    model = tiny_model()
    out = E.export_checkpoint(model, tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    sd = loaded.state_dict()
    for name, w in expected_fake_quant(model, "nvfp4").items():
        assert torch.equal(raw(sd[name]), raw(w)), name


# ---------------------------------------------------------------------------------------------
# Reading checkpoints that compressed-tensors wrote
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,arch", [("nvfp4", "llama"), ("mxfp4", "llama"), ("nvfp4", "qwen2")])
def test_we_read_compressed_tensors_checkpoints(tmp_path, fmt, arch):
    # bf16 weights: compressed-tensors computes part of its scales in bf16, so its codes differ
    # from ours; reading must still reproduce exactly its own decompression.
    src = ct_compress(tiny_model(arch, seed=3, dtype=torch.bfloat16), fmt, tmp_path / "ct", fuse=True)
    theirs = ct_decompress(str(src), str(tmp_path / "deq"))
    ours = E.dequantize_checkpoint(src)
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(raw(ours[name]), raw(theirs[name])), name
    qts = E.load_compressed_checkpoint(src)
    files = load_dir(src)
    n = "model.layers.1.mlp.down_proj"
    qt = qts[n + ".weight"]
    assert isinstance(qt, aqn_rs.QuantizedTensor) and qt.format == fmt and qt.shape == (64, 96)
    assert torch.equal(qt.codes, files[n + ".weight_packed"])
    assert torch.equal(qt.scales, raw(files[n + ".weight_scale"]))
    if fmt == "nvfp4":
        assert qt.global_scale.shape == () and qt.global_scale.item() == files[n + ".weight_global_scale"].item()


def test_load_round_trip_of_our_export(tmp_path):
    model = tiny_model()
    out = E.export_checkpoint(model, tmp_path / "ckpt", "mxfp4", "rceil")
    qts = E.load_compressed_checkpoint(out)
    n = "model.layers.0.mlp.up_proj.weight"
    want = aqn_rs.Mxfp4Quantizer("rceil").quantize(model.state_dict()[n].to(torch.bfloat16))
    got = qts[n]
    assert (got.format, got.dtype, got.scale_mode, got.shape) == ("mxfp4", "bf16", "rceil", want.shape)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert qts["model.norm.weight"].dtype == torch.bfloat16
    f32 = E.dequantize_checkpoint(out, dtype=torch.float32)
    assert f32[n].dtype == torch.float32
    assert torch.equal(f32[n], aqn_rs.Mxfp4Quantizer("rceil").fake_quant(model.state_dict()[n].to(torch.bfloat16)).float())


def test_reader_rejects_other_schemes(tmp_path):
    out = E.export_checkpoint(tiny_model(), tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not an FP4 W4A16 scheme"):
        E.load_compressed_checkpoint(out)
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a compressed-tensors checkpoint"):
        E.load_compressed_checkpoint(out)


# ---------------------------------------------------------------------------------------------
# Folder input, sharding, copied files, odd shapes
# ---------------------------------------------------------------------------------------------


def test_folder_export_equals_in_memory_export(tmp_path):
    model = tiny_model("qwen2")
    src = tmp_path / "src"
    model.save_pretrained(str(src), max_shard_size="30KB")
    assert (src / "model.safetensors.index.json").is_file()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "chat").mkdir()
    (src / "chat" / "template.jinja").write_text("{{ messages }}")
    (src / "pytorch_model.bin").write_bytes(b"not copied")

    from_folder = E.export_checkpoint(src, tmp_path / "a", max_shard_size="30KB")
    in_memory = E.export_checkpoint(model, tmp_path / "b", max_shard_size="30KB")
    a, b = load_dir(from_folder), load_dir(in_memory)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])), k
    assert (from_folder / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (from_folder / "chat" / "template.jinja").is_file()
    assert (from_folder / "generation_config.json").is_file()
    assert not (from_folder / "pytorch_model.bin").exists()
    index = json.loads((from_folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    for f in set(index["weight_map"].values()):
        with safe_open(str(from_folder / f), "pt") as h:
            assert h.metadata()["format"] == "pt" and h.metadata()["aqn_rs.format"] == "nvfp4"
            assert os.path.getsize(from_folder / f) < 30_000 + 4096
    cfg = json.loads((from_folder / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["quantization_config"]["ignore"] == ["lm_head"]
    with pytest.raises(ValueError, match="already a quantized checkpoint"):
        E.export_checkpoint(from_folder, tmp_path / "again")


def test_unaligned_in_features_stay_dense(tmp_path):
    model = tiny_model(intermediate=72)  # down_proj in_features 72: not whole NVFP4/MXFP4 blocks
    with pytest.warns(UserWarning, match="not a multiple"):
        out = E.export_checkpoint(model, tmp_path / "ckpt")
    sd = load_dir(out)
    assert sd["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    deq = ct_decompress(str(out), str(tmp_path / "deq"))
    for name, w in expected_fake_quant(model, "nvfp4").items():
        if "down_proj" not in name:
            assert torch.equal(raw(deq[name]), raw(w)), name


def test_parse_size():
    assert E.parse_size("5GB") == 5 * 10**9 and E.parse_size("2GiB") == 2 * 2**30
    assert E.parse_size("500mb") == 500 * 10**6 and E.parse_size(123) == 123
    for bad in ("5 parsecs", "0", -1, ""):
        with pytest.raises(ValueError):
            E.parse_size(bad)


# ---------------------------------------------------------------------------------------------
# In-memory packing for weight sync
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_iter_packed_equals_the_exported_tensors(tmp_path, fmt):
    model = tiny_model("qwen2")
    files = load_dir(E.export_checkpoint(model, tmp_path / "ckpt", fmt))
    # Stream the state dict in a shuffled order: fused groups are held back until complete.
    items = list(model.state_dict().items())
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    got = dict(E.iter_packed(((items[i][0], items[i][1]) for i in order), fmt, dtype=torch.bfloat16,
                             linear_modules=E.linear_module_names(model)))
    got.pop("lm_head.weight")  # tied to embed_tokens: the file holds it once
    assert set(got) == set(files)
    for k in files:
        assert got[k].dtype == files[k].dtype and torch.equal(raw(got[k]), raw(files[k])), k


def test_iter_packed_passes_other_tensors_through():
    model = tiny_model()
    sd = model.state_dict()
    got = list(E.iter_packed(sd.items(), "mxfp4", exclude=["lm_head", "embed_tokens", "*.down_proj"]))
    names = [n for n, _ in got]
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.gate_proj.weight_packed" in names
    d = dict(got)
    assert d["model.norm.weight"] is sd["model.norm.weight"] or torch.equal(d["model.norm.weight"], sd["model.norm.weight"])
    assert d["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32  # dtype=None keeps it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_iter_packed_stays_on_the_gpu():
    model = tiny_model(dtype=torch.bfloat16)
    cpu = dict(E.iter_packed(model.state_dict().items()))
    gpu = dict(E.iter_packed((k, v.cuda()) for k, v in model.state_dict().items()))
    for k, v in gpu.items():
        assert v.is_cuda, k
        assert torch.equal(raw(v.cpu()), raw(cpu[k])), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_gpu_export_equals_cpu_export(tmp_path, fmt):
    """A model on the GPU (and a folder quantized with device='cuda') is packed by the CUDA
    kernels to the same bytes as the CPU path."""
    model = tiny_model("qwen2")
    cpu = load_dir(E.export_checkpoint(model, tmp_path / "cpu", fmt))
    gpu = load_dir(E.export_checkpoint(model.cuda(), tmp_path / "gpu", fmt))
    model.cpu().save_pretrained(str(tmp_path / "src"))
    dev = load_dir(E.export_checkpoint(tmp_path / "src", tmp_path / "dev", fmt, device="cuda"))
    for other in (gpu, dev):
        assert set(other) == set(cpu)
        for k in cpu:
            assert torch.equal(raw(other[k]), raw(cpu[k])), k


# ---------------------------------------------------------------------------------------------
# Errors leave nothing behind
# ---------------------------------------------------------------------------------------------


class NoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.embed_tokens = torch.nn.Embedding(16, 32)
        self.norm = torch.nn.LayerNorm(32)


def test_errors_leave_nothing_behind(tmp_path):
    model = tiny_model()
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="unknown export format"):
        E.export_checkpoint(model, out, "int4")
    with pytest.raises(ValueError, match="MXFP4 only"):
        E.export_checkpoint(model, out, "nvfp4", "rceil")
    with pytest.raises(ValueError, match="no Linear layer"):
        E.export_checkpoint(NoLinear(), out)
    with pytest.raises(ValueError, match="all 15 are excluded"):
        E.export_checkpoint(model, out, exclude=["re:.*"])
    with pytest.raises(ValueError, match="fused group"):
        E.export_checkpoint(model, out, exclude=["lm_head", "k_proj"])
    with pytest.raises(TypeError, match="no .config"):
        E.export_checkpoint(torch.nn.Linear(32, 32), out)
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        E.export_checkpoint(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # A failure while writing removes the temporary folder and keeps the old out_dir.
    calls = {"n": 0}
    real = E._pack_weight

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    E._pack_weight = failing
    try:
        with pytest.raises(RuntimeError, match="boom"):
            E.export_checkpoint(model, out, overwrite=True, max_shard_size="20KB")
    finally:
        E._pack_weight = real
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, "ckpt") == []

    E.export_checkpoint(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path, "ckpt") == []


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model().save_pretrained(str(src))
    ap = argparse.ArgumentParser(prog="aqn-rs")
    export_cli.add_cli(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["export", str(src), str(tmp_path / "out"), "--format", "mxfp4", "--scale-mode", "rceil",
                          "--exclude", "lm_head", "embed_tokens", "*.down_proj"])
    assert export_cli.run_cli(args) == 0
    assert "12 Linear weights packed" in capsys.readouterr().out
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mxfp4-pack-quantized" and "model.layers.0.mlp.down_proj" in qc["ignore"]
    assert export_cli.run_cli(args) == 2  # exists
    assert "already exists" in capsys.readouterr().err
