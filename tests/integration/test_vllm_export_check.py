"""scripts/vllm_export_check.py's comparison, on the CPU with a stand-in for vLLM's output.

vLLM itself runs only on the GPU machine (`scripts/verl_stack.sh export-check`); here the
transformers side and the metrics are checked: a "vLLM" that returns transformers' own greedy
tokens and values must agree fully, and one that returns other tokens must not.
"""
import importlib.util
import pathlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("vllm_export_check", ROOT / "scripts" / "vllm_export_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEVICE = "cpu"
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4", "mxfp4"])
def test_self_agreement_is_total_and_a_wrong_token_is_counted(tiny, fmt):
    vc = _script()
    m = vc.hf_model(tiny, fmt)
    if fmt != "bf16":  # the fake quant is on: other logits than the plain bf16 model's
        x = torch.tensor([[1, 5, 9, 17]])
        with torch.no_grad():
            assert not torch.equal(m(input_ids=x).logits, vc.hf_model(tiny, "bf16")(input_ids=x).logits)
    prompts = [[1, 5, 9, 17], [3, 4]]
    n = 6
    toks = [vc.hf_greedy(m, p, n) for p in prompts]
    vals = [vc.hf_forced(m, p, t, "raw_logits")[1] for p, t in zip(prompts, toks)]
    r = vc.compare(m, prompts, {"tokens": toks, "values": vals, "mode": "raw_logits"})
    assert r["greedy_identical"] == "2/2" and r["mean_common_prefix"] == n
    assert r["forced_argmax_agreement"] == 1.0
    assert r["max_abs_diff"] == 0.0 and r["value"] == "logit"

    # the first prompt's last token replaced by one transformers did not pick (the last: an
    # earlier one would change the prefix every later forced argmax sees)
    bad = [list(t) for t in toks]
    bad[0][-1] = (bad[0][-1] + 1) % 96
    vals2 = [vc.hf_forced(m, p, t, "raw_logprobs")[1] for p, t in zip(prompts, bad)]
    vals2[1] = [v + 0.25 for v in vals2[1]]
    r = vc.compare(m, prompts, {"tokens": bad, "values": vals2, "mode": "raw_logprobs"})
    assert r["greedy_identical"] == "1/2" and r["mean_common_prefix"] == (n - 1 + n) / 2
    assert r["forced_argmax_agreement"] == pytest.approx((2 * n - 1) / (2 * n))
    assert r["max_abs_diff"] == pytest.approx(0.25, abs=1e-5) and r["value"] == "log-prob"


def test_greedy_is_argmax_of_the_forced_pass(tiny):
    vc = _script()
    m = vc.hf_model(tiny, "nvfp4")
    p = [2, 7, 11]
    t = vc.hf_greedy(m, p, 5)
    am, _ = vc.hf_forced(m, p, t, "raw_logits")
    assert am == t


def test_formats_are_checked(tiny, tmp_path, capsys):
    vc = _script()
    with pytest.raises(SystemExit):
        vc.main(["--model", tiny, "--out", str(tmp_path), "--formats", "int8"])
    assert "int8" in capsys.readouterr().err
