"""Module selection (the rules in aqn_rs.selection's docstring): exact dotted-suffix names,
shell globs with fnmatch semantics, verl-style `re:` patterns, layer types by class name,
transformers and vLLM names, the deciding rule, and clear errors for bad configs."""

from __future__ import annotations

import fnmatch
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aqn_rs.selection import (
    DEFAULT_EXCLUDE,
    LAYER_TYPES,
    ModuleSelector,
    canonical_name,
    class_name_of,
    iter_selected,
    layer_type_of,
    selection_rows,
)

# (name, class name) of a Qwen2-style model in transformers naming ...
HF_MODULES = [
    ("model.embed_tokens", "Embedding"),
    ("model.layers.0.self_attn.q_proj", "Linear"),
    ("model.layers.0.self_attn.k_proj", "Linear"),
    ("model.layers.0.self_attn.v_proj", "Linear"),
    ("model.layers.0.self_attn.o_proj", "Linear"),
    ("model.layers.0.mlp.gate_proj", "Linear"),
    ("model.layers.0.mlp.up_proj", "Linear"),
    ("model.layers.0.mlp.down_proj", "Linear"),
    ("model.layers.0.input_layernorm", "Qwen2RMSNorm"),
    ("model.layers.0.post_attention_layernorm", "Qwen2RMSNorm"),
    ("model.rotary_emb", "Qwen2RotaryEmbedding"),
    ("model.norm", "Qwen2RMSNorm"),
    ("lm_head", "Linear"),
]
# ... and the same model as vLLM builds it (fused projections, its own classes).
VLLM_MODULES = [
    ("model.embed_tokens", "VocabParallelEmbedding"),
    ("model.layers.0.self_attn.qkv_proj", "QKVParallelLinear"),
    ("model.layers.0.self_attn.o_proj", "RowParallelLinear"),
    ("model.layers.0.self_attn.rotary_emb", "RotaryEmbedding"),
    ("model.layers.0.mlp.gate_up_proj", "MergedColumnParallelLinear"),
    ("model.layers.0.mlp.down_proj", "RowParallelLinear"),
    ("model.layers.0.input_layernorm", "RMSNorm"),
    ("model.layers.0.post_attention_layernorm", "RMSNorm"),
    ("model.norm", "RMSNorm"),
    ("lm_head", "ParallelLMHead"),
]


def table(sel, modules):
    return {name: sel.decide(name, cls) for name, cls in modules}


def test_defaults_select_linears_but_not_lm_head():
    sel = ModuleSelector()
    assert sel.include is None
    assert sel.exclude == DEFAULT_EXCLUDE
    assert sel.layer_types == ("linear",)
    hf = table(sel, HF_MODULES)
    assert hf["model.layers.0.self_attn.q_proj"] == (True, "default")
    assert hf["lm_head"] == (False, "exclude:lm_head")
    assert hf["model.embed_tokens"] == (False, "type:Embedding")
    assert hf["model.norm"] == (False, "type:Qwen2RMSNorm")
    assert hf["model.rotary_emb"] == (False, "type:Qwen2RotaryEmbedding")
    assert sel.select(HF_MODULES) == [n for n, c in HF_MODULES if c == "Linear" and n != "lm_head"]
    vl = table(sel, VLLM_MODULES)
    assert vl["model.layers.0.self_attn.qkv_proj"] == (True, "default")
    assert vl["model.layers.0.mlp.gate_up_proj"] == (True, "default")
    assert vl["lm_head"] == (False, "exclude:lm_head")
    assert sel.select(VLLM_MODULES) == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.mlp.down_proj",
    ]


def test_rmsnorm_matches_every_norm_class_including_vllms():
    sel = ModuleSelector(layer_types="rmsnorm")  # a single string is one layer type
    norms = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"]
    assert sel.select(HF_MODULES) == norms
    assert sel.select(VLLM_MODULES) == norms
    assert sel.decide("model.norm", "LlamaRMSNorm") == (True, "default")
    assert sel.decide("model.norm", "LayerNorm") == (False, "type:LayerNorm")


def test_embedding_type_and_default_exclusion():
    sel = ModuleSelector(layer_types=("embedding", "linear"))
    assert sel.layer_types == ("linear", "embedding")
    assert sel.decide("model.embed_tokens", "VocabParallelEmbedding") == (False, "exclude:embed_tokens")
    sel = ModuleSelector(exclude=[], layer_types=["embedding"])
    assert sel.decide("model.embed_tokens", "Embedding") == (True, "default")
    assert sel.decide("model.rotary_emb", "LlamaRotaryEmbedding")[0] is False


@pytest.mark.parametrize(
    "cls,kind",
    [
        ("Linear", "linear"),
        ("ColumnParallelLinear", "linear"),
        ("RowParallelLinear", "linear"),
        ("QKVParallelLinear", "linear"),
        ("MergedColumnParallelLinear", "linear"),
        ("ReplicatedLinear", "linear"),
        ("QATLinear", "linear"),
        ("FSDPLinear", "linear"),
        ("ParallelLMHead", "linear"),
        ("RMSNorm", "rmsnorm"),
        ("Qwen2RMSNorm", "rmsnorm"),
        ("LlamaRMSNorm", "rmsnorm"),
        ("Embedding", "embedding"),
        ("VocabParallelEmbedding", "embedding"),
        ("RotaryEmbedding", None),
        ("LayerNorm", None),
        ("Bilinear", None),
        ("LinearBase", None),
        ("Qwen2DecoderLayer", None),
    ],
)
def test_layer_type_by_class_name(cls, kind):
    assert ModuleSelector.layer_type(cls) == kind
    assert set(LAYER_TYPES) == {"linear", "rmsnorm", "embedding"}


def test_exact_names_are_whole_dotted_suffixes():
    sel = ModuleSelector(exclude=["lm_head", "mlp.down_proj"])
    assert sel.decide("lm_head", "Linear") == (False, "exclude:lm_head")
    assert sel.decide("model.lm_head", "Linear") == (False, "exclude:lm_head")
    assert sel.decide("my_lm_head", "Linear") == (True, "default")
    assert sel.decide("model.layers.3.mlp.down_proj", "Linear") == (False, "exclude:mlp.down_proj")
    assert sel.decide("model.layers.3.shared_mlp.down_proj", "Linear") == (True, "default")


def test_include_exclude_order_and_rules():
    sel = ModuleSelector(include=["re:.*mlp.*", "*.o_proj"], exclude=["*.down_proj", "lm_head"])
    got = table(sel, VLLM_MODULES)
    assert got["model.layers.0.mlp.gate_up_proj"] == (True, "include:re:.*mlp.*")
    assert got["model.layers.0.mlp.down_proj"] == (False, "exclude:*.down_proj")  # exclude wins
    assert got["model.layers.0.self_attn.o_proj"] == (True, "include:*.o_proj")
    assert got["model.layers.0.self_attn.qkv_proj"] == (False, "not-included")
    assert got["model.norm"] == (False, "type:RMSNorm")  # type first
    # the first matching pattern is reported
    sel = ModuleSelector(exclude=["*proj", "re:model"])
    assert sel.decide("model.layers.0.mlp.down_proj", "Linear") == (False, "exclude:*proj")


def test_regex_follows_verl_re_match():
    # verl's default ignore pattern, and re.match semantics: anchored at the start only
    sel = ModuleSelector(exclude=["re:.*mlp.gate$"])
    assert sel.decide("model.layers.1.mlp.gate", "Linear")[0] is False
    assert sel.decide("model.layers.1.mlp.gate_proj", "Linear")[0] is True
    sel = ModuleSelector(exclude=["re:layers"])
    assert sel.decide("model.layers.1.mlp.gate_proj", "Linear")[0] is True  # not at the start
    sel = ModuleSelector(exclude=["re:model\\.layers\\.[0-3]\\."])
    assert sel.decide("model.layers.2.mlp.gate_proj", "Linear")[0] is False
    assert sel.decide("model.layers.12.mlp.gate_proj", "Linear")[0] is True


REGEXES = [r".*mlp\.gate$", r"model\.layers\.\d+\.self_attn", r"a|b", r"(a|b)+c?", r"x*", r"[ab]{2}", r".*proj$"]


@settings(max_examples=300, deadline=None)
@given(name=st.text(alphabet="abcx.0123_", max_size=12), rx=st.sampled_from(REGEXES))
def test_regex_equals_python_re_match(name, rx):
    sel = ModuleSelector(exclude=[f"re:{rx}"])
    assert (not sel.decide(name, "Linear")[0]) == (re.match(rx, name) is not None)


GLOB_ALPHABET = "ab.z-!^[]*?"


@settings(max_examples=1500, deadline=None)
@given(pat=st.text(alphabet=GLOB_ALPHABET, min_size=1, max_size=8), name=st.text(alphabet="ab.z-!^[]", max_size=8))
def test_globs_equal_fnmatchcase(pat, name):
    if not any(c in pat for c in "*?["):
        return  # not a glob: an exact name (tested below)
    sel = ModuleSelector(include=[pat], exclude=[])
    assert sel.decide(name, "Linear")[0] == fnmatch.fnmatchcase(name, pat), (pat, name)


@settings(max_examples=300, deadline=None)
@given(pat=st.text(alphabet="ab.", min_size=1, max_size=5), name=st.text(alphabet="ab.", max_size=8))
def test_exact_patterns_are_dotted_suffixes(pat, name):
    if "" in pat.split("."):
        with pytest.raises(ValueError, match="empty dotted component"):
            ModuleSelector(exclude=[pat])
        return
    sel = ModuleSelector(include=[pat], exclude=[])
    assert sel.decide(name, "Linear")[0] == (name == pat or name.endswith("." + pat))


def test_wrapper_components_are_ignored():
    assert canonical_name("_orig_mod._fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp") == (
        "model.layers.0.mlp"
    )
    assert ModuleSelector().decide("_fsdp_wrapped_module.lm_head", "Linear") == (False, "exclude:lm_head")
    sel = ModuleSelector(include=["model.layers.*"])
    assert sel.decide("_orig_mod.model.layers.0.mlp.up_proj", "Linear")[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layer_types=["lienar"]), 'unknown layer type "lienar"'),
        (dict(layer_types=[]), "layer_types is empty"),
        (dict(exclude=["re:(unclosed"]), "(?s)bad regular expression in pattern \"re:\\(unclosed\".*unclosed group"),
        (dict(exclude=["re:(?<=a)b"]), "bad regular expression"),  # look-behind: not in Rust regex
        (dict(exclude=[""]), "empty selection pattern"),
        (dict(exclude=["re:"]), "empty regular expression"),
        (dict(include=[]), r"include=\[\] would select nothing"),
        (dict(exclude=["model..norm"]), "empty dotted component"),
    ],
)
def test_bad_configs_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModuleSelector(**kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="exclude: expected strings"):
        ModuleSelector(exclude=["lm_head", 3])
    with pytest.raises(TypeError, match="include: expected a string or a list of strings"):
        ModuleSelector(include=5)


def test_single_string_is_one_pattern_and_none_means_defaults():
    assert ModuleSelector(exclude="lm_head").exclude == ("lm_head",)
    assert ModuleSelector(exclude=None).exclude == DEFAULT_EXCLUDE
    assert ModuleSelector(exclude=()).exclude == ()
    assert ModuleSelector(layer_types=None).layer_types == ("linear",)


def test_pickle_repr_eq():
    sel = ModuleSelector(include=["*.mlp.*"], exclude=("lm_head",), layer_types=("rmsnorm", "linear"))
    again = pickle.loads(pickle.dumps(sel))
    assert again == sel and again is not sel
    assert again.include == ("*.mlp.*",)
    assert sel != ModuleSelector()
    assert repr(sel) == "ModuleSelector(include=('*.mlp.*',), exclude=('lm_head',), layer_types=('linear', 'rmsnorm'))"


# ---------------------------------------------------------------------------------------------
# torch modules
# ---------------------------------------------------------------------------------------------


def _tiny_models():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def named_class(name, base=nn.Module, **body):
        return type(name, (base,), body)

    class Norm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

    LlamaRMSNorm = named_class("LlamaRMSNorm", Norm)
    RMSNorm = named_class("RMSNorm", Norm)  # vLLM's class name
    QKVParallelLinear = named_class("QKVParallelLinear", nn.Linear)
    MergedColumnParallelLinear = named_class("MergedColumnParallelLinear", nn.Linear)

    class Proj(nn.Linear):  # a subclass with its own name still counts as linear (MRO)
        pass

    def block(vllm):
        b = nn.Module()
        b.input_layernorm = (RMSNorm if vllm else LlamaRMSNorm)(8)
        b.self_attn = nn.Module()
        if vllm:
            b.self_attn.qkv_proj = QKVParallelLinear(8, 24)
            b.mlp = nn.Module()
            b.mlp.gate_up_proj = MergedColumnParallelLinear(8, 32)
        else:
            b.self_attn.q_proj = Proj(8, 8)
            b.mlp = nn.Module()
            b.mlp.up_proj = nn.Linear(8, 16)
        return b

    def model(vllm):
        root = nn.Module()
        root.model = nn.Module()
        root.model.embed_tokens = nn.Embedding(10, 8)
        root.model.layers = nn.ModuleList([block(vllm) for _ in range(2)])
        root.model.norm = (RMSNorm if vllm else LlamaRMSNorm)(8)
        root.lm_head = nn.Linear(8, 10)
        return root

    return model(False), model(True)


def test_torch_walk_over_hf_and_vllm_style_models():
    hf, vl = _tiny_models()
    assert class_name_of(hf.model.layers[0].self_attn.q_proj) == "Linear"  # Proj(nn.Linear)
    assert layer_type_of(vl.model.layers[0].self_attn.qkv_proj) == "linear"
    assert layer_type_of(vl.model.norm) == "rmsnorm"
    names = [n for n, _, _ in iter_selected(vl, ModuleSelector())]
    assert names == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.1.self_attn.qkv_proj",
        "model.layers.1.mlp.gate_up_proj",
    ]
    rows = {r.name: r for r in selection_rows(hf, dict(layer_types=["rmsnorm", "linear"]))}
    assert rows["lm_head"].selected is False and rows["lm_head"].rule == "exclude:lm_head"
    assert rows["model.norm"].selected and rows["model.norm"].layer_type == "rmsnorm"
    assert rows["model.layers.0.self_attn.q_proj"].class_name == "Linear"
    assert rows[""].rule == "type:Module"
    # the same norms in both naming schemes
    norm_sel = ModuleSelector(layer_types="rmsnorm")
    assert [n for n, _, _ in iter_selected(hf, norm_sel)] == [n for n, _, _ in iter_selected(vl, norm_sel)]


def test_transformers_llama_names():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    rows = selection_rows(model, ModuleSelector(layer_types=("linear", "rmsnorm", "embedding")))
    selected = {r.name for r in rows if r.selected}
    assert "lm_head" not in selected and "model.embed_tokens" not in selected
    assert "model.layers.1.mlp.down_proj" in selected and "model.norm" in selected
    assert {r.rule for r in rows if r.name in ("lm_head", "model.embed_tokens")} == {
        "exclude:lm_head",
        "exclude:embed_tokens",
    }
    assert not any(r.selected for r in rows if "rotary" in r.name)
