//! Module selection: which modules of a model are quantized or noised, and which rule decided.
//!
//! These are the normative rules; the Python side only forwards to them. A module is described
//! by its qualified name (as `named_modules()` yields it) and its class name; no torch is needed, so
//! the same selector serves transformers models (`model.layers.3.self_attn.q_proj`) and vLLM
//! models (fused `qkv_proj`, `gate_up_proj`, `vllm...layernorm.RMSNorm`).
//!
//! Decision order (first that applies wins):
//! 1. the class is not of one of the selector's layer types -> not selected, rule `type:<class>`;
//! 2. an `exclude` pattern matches -> not selected, rule `exclude:<pattern>`;
//! 3. `include` is given and one of its patterns matches -> selected, rule `include:<pattern>`;
//! 4. `include` is given and none matches -> not selected, rule `not-included`;
//! 5. otherwise (`include` is `None`) -> selected, rule `default`.
//!
//! Pattern kinds (see [`Pattern`]): exact dotted suffixes, shell globs, `re:` regexes.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

mod pattern;

pub use pattern::{Glob, Pattern};

/// The kinds of module a selector can pick, decided from the class name alone: vLLM's norm and
/// linear classes are not subclasses of the transformers/torch ones, so an `isinstance` test on
/// those would miss them, and a name test needs no vLLM import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerType {
    /// `nn.Linear` and every class whose name ends in `Linear` (vLLM's `ColumnParallelLinear`,
    /// `RowParallelLinear`, `QKVParallelLinear`, `MergedColumnParallelLinear`,
    /// `ReplicatedLinear`, verl's `QATLinear`, FSDP2's `FSDPLinear`, ...), plus vLLM's
    /// `ParallelLMHead` (the output projection; `nn.Linear` in transformers).
    Linear,
    /// Every class whose name ends in `RMSNorm` (`RMSNorm` of torch and vLLM, `Qwen2RMSNorm`,
    /// `LlamaRMSNorm`, ...).
    RmsNorm,
    /// Every class whose name ends in `Embedding` (`Embedding`, `VocabParallelEmbedding`),
    /// except rotary embeddings (`...RotaryEmbedding`), which hold no weight.
    Embedding,
}

impl LayerType {
    /// All layer types, in their canonical order.
    pub const ALL: [LayerType; 3] = [LayerType::Linear, LayerType::RmsNorm, LayerType::Embedding];

    /// The config name (`linear`, `rmsnorm`, `embedding`).
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Linear => "linear",
            LayerType::RmsNorm => "rmsnorm",
            LayerType::Embedding => "embedding",
        }
    }

    /// The layer type of a class name, or `None` for any other module (containers, attention,
    /// activations, rotary embeddings, LayerNorm, ...).
    pub fn of_class(class_name: &str) -> Option<LayerType> {
        if class_name.ends_with("RMSNorm") {
            Some(LayerType::RmsNorm)
        } else if class_name.ends_with("Linear") || class_name == "ParallelLMHead" {
            Some(LayerType::Linear)
        } else if class_name.ends_with("Embedding") && !class_name.ends_with("RotaryEmbedding") {
            Some(LayerType::Embedding)
        } else {
            None
        }
    }
}

impl fmt::Display for LayerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LayerType {
    type Err = Error;

    /// Case-insensitive (`RMSNorm` and `rmsnorm` both name [`LayerType::RmsNorm`]).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        LayerType::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                Error::Argument(format!(
                    "unknown layer type {s:?}; expected one of \"linear\", \"rmsnorm\", \"embedding\""
                ))
            })
    }
}

/// Wrapper components that torch inserts into qualified names and that are not part of the
/// model's own naming: FSDP1's `_fsdp_wrapped_module`, activation checkpointing's
/// `_checkpoint_wrapped_module`, and `torch.compile`'s `_orig_mod`.
pub const WRAPPER_COMPONENTS: [&str; 3] = [
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
    "_orig_mod",
];

/// A qualified module name with the [`WRAPPER_COMPONENTS`] removed, so that a wrapped model
/// and its plain twin (e.g. the actor and the rollout model) name the same module alike.
pub fn canonical_name(name: &str) -> String {
    if !WRAPPER_COMPONENTS.iter().any(|w| name.contains(w)) {
        return name.to_owned();
    }
    name.split('.')
        .filter(|c| !WRAPPER_COMPONENTS.contains(c))
        .collect::<Vec<_>>()
        .join(".")
}

/// Why a module was or was not selected.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// The class is not of a selected layer type (or of none).
    Type(String),
    /// The first matching exclude pattern.
    Exclude(String),
    /// The first matching include pattern.
    Include(String),
    /// `include` was given and nothing in it matched.
    NotIncluded,
    /// No include list: every module of the layer types that is not excluded.
    Default,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Type(c) => write!(f, "type:{c}"),
            Rule::Exclude(p) => write!(f, "exclude:{p}"),
            Rule::Include(p) => write!(f, "include:{p}"),
            Rule::NotIncluded => f.write_str("not-included"),
            Rule::Default => f.write_str("default"),
        }
    }
}

/// The default exclusions: production recipes never quantize or noise the output head and the
/// token embedding.
pub const DEFAULT_EXCLUDE: [&str; 2] = ["lm_head", "embed_tokens"];

/// Include/exclude patterns plus layer types; see the module docs for the decision order.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSelector {
    include: Option<Vec<Pattern>>,
    exclude: Vec<Pattern>,
    layer_types: Vec<LayerType>,
}

impl ModuleSelector {
    /// Build a selector. `include = None` selects every module of the layer types that is not
    /// excluded; an empty `include` list is an error (it would select nothing, which is never
    /// what a config means). `layer_types` must name at least one type.
    pub fn new<S: AsRef<str>>(
        include: Option<&[S]>,
        exclude: &[S],
        layer_types: &[S],
    ) -> Result<ModuleSelector> {
        let include =
            match include {
                None => None,
                Some([]) => return Err(Error::Argument(
                    "include=[] would select nothing; pass include=None to select every module \
                     of the layer types"
                        .into(),
                )),
                Some(pats) => Some(
                    pats.iter()
                        .map(|p| Pattern::parse(p.as_ref()))
                        .collect::<Result<Vec<_>>>()?,
                ),
            };
        let exclude = exclude
            .iter()
            .map(|p| Pattern::parse(p.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        if layer_types.is_empty() {
            return Err(Error::Argument(
                "layer_types is empty; expected one or more of \"linear\", \"rmsnorm\", \"embedding\""
                    .into(),
            ));
        }
        let mut types = layer_types
            .iter()
            .map(|t| t.as_ref().parse::<LayerType>())
            .collect::<Result<Vec<_>>>()?;
        types.sort();
        types.dedup();
        Ok(ModuleSelector {
            include,
            exclude,
            layer_types: types,
        })
    }

    /// The include patterns (`None`: no include filter).
    pub fn include(&self) -> Option<&[Pattern]> {
        self.include.as_deref()
    }

    /// The exclude patterns.
    pub fn exclude(&self) -> &[Pattern] {
        &self.exclude
    }

    /// The selected layer types, sorted and deduplicated.
    pub fn layer_types(&self) -> &[LayerType] {
        &self.layer_types
    }

    /// Decide one module. `name` is canonicalized first ([`canonical_name`]).
    pub fn decide(&self, name: &str, class_name: &str) -> (bool, Rule) {
        match LayerType::of_class(class_name) {
            Some(t) if self.layer_types.contains(&t) => {}
            _ => return (false, Rule::Type(class_name.to_owned())),
        }
        let name = canonical_name(name);
        if let Some(p) = self.exclude.iter().find(|p| p.matches(&name)) {
            return (false, Rule::Exclude(p.source().to_owned()));
        }
        match &self.include {
            None => (true, Rule::Default),
            Some(pats) => match pats.iter().find(|p| p.matches(&name)) {
                Some(p) => (true, Rule::Include(p.source().to_owned())),
                None => (false, Rule::NotIncluded),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(include: Option<&[&str]>, exclude: &[&str], types: &[&str]) -> ModuleSelector {
        ModuleSelector::new(include, exclude, types).unwrap()
    }

    fn rule(s: &ModuleSelector, name: &str, class: &str) -> (bool, String) {
        let (b, r) = s.decide(name, class);
        (b, r.to_string())
    }

    #[test]
    fn layer_types_by_class_name() {
        for c in [
            "Linear",
            "ColumnParallelLinear",
            "RowParallelLinear",
            "QKVParallelLinear",
            "MergedColumnParallelLinear",
            "ReplicatedLinear",
            "QATLinear",
            "FSDPLinear",
            "NonDynamicallyQuantizableLinear",
            "ParallelLMHead",
        ] {
            assert_eq!(LayerType::of_class(c), Some(LayerType::Linear), "{c}");
        }
        for c in [
            "RMSNorm",
            "Qwen2RMSNorm",
            "LlamaRMSNorm",
            "FSDPQwen2RMSNorm",
        ] {
            assert_eq!(LayerType::of_class(c), Some(LayerType::RmsNorm), "{c}");
        }
        for c in ["Embedding", "VocabParallelEmbedding"] {
            assert_eq!(LayerType::of_class(c), Some(LayerType::Embedding), "{c}");
        }
        for c in [
            "LlamaRotaryEmbedding",
            "RotaryEmbedding",
            "LayerNorm",
            "Bilinear",
            "LinearBase",
            "Qwen2MLP",
            "SiLU",
            "ModuleList",
        ] {
            assert_eq!(LayerType::of_class(c), None, "{c}");
        }
    }

    #[test]
    fn decision_order_and_rules() {
        let s = sel(None, &DEFAULT_EXCLUDE, &["linear"]);
        assert_eq!(
            rule(&s, "model.layers.0.self_attn.qkv_proj", "QKVParallelLinear"),
            (true, "default".into())
        );
        assert_eq!(
            rule(&s, "lm_head", "Linear"),
            (false, "exclude:lm_head".into())
        );
        assert_eq!(
            rule(&s, "model.embed_tokens", "Embedding"),
            (false, "type:Embedding".into())
        );
        assert_eq!(
            rule(&s, "model.norm", "Qwen2RMSNorm"),
            (false, "type:Qwen2RMSNorm".into())
        );
        let s = sel(Some(&["re:.*mlp.*"]), &["*.down_proj"], &["linear"]);
        assert_eq!(
            rule(
                &s,
                "model.layers.1.mlp.gate_up_proj",
                "MergedColumnParallelLinear"
            ),
            (true, "include:re:.*mlp.*".into())
        );
        assert_eq!(
            rule(&s, "model.layers.1.mlp.down_proj", "RowParallelLinear"),
            (false, "exclude:*.down_proj".into())
        );
        assert_eq!(
            rule(&s, "model.layers.1.self_attn.o_proj", "RowParallelLinear"),
            (false, "not-included".into())
        );
    }

    #[test]
    fn wrapper_components_are_ignored() {
        assert_eq!(
            canonical_name(
                "_orig_mod.model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp"
            ),
            "model.layers.0.mlp"
        );
        let s = sel(None, &DEFAULT_EXCLUDE, &["linear"]);
        assert!(!s.decide("_fsdp_wrapped_module.lm_head", "Linear").0);
    }

    #[test]
    fn bad_configs() {
        let e = ModuleSelector::new(None, &["lm_head"], &["lienar"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown layer type \"lienar\""),
            "{e}"
        );
        let e = ModuleSelector::new(None, &["re:(unclosed"], &["linear"]).unwrap_err();
        assert!(e.to_string().contains("bad regular expression"), "{e}");
        let e = ModuleSelector::new(None, &[""], &["linear"]).unwrap_err();
        assert!(e.to_string().contains("empty selection pattern"), "{e}");
        let e = ModuleSelector::new(None, &["re:"], &["linear"]).unwrap_err();
        assert!(e.to_string().contains("empty regular expression"), "{e}");
        let e = ModuleSelector::new(None, &["a..b"], &["linear"]).unwrap_err();
        assert!(e.to_string().contains("empty dotted component"), "{e}");
        let empty: [&str; 0] = [];
        assert!(ModuleSelector::new(Some(&empty), &empty, &["linear"]).is_err());
        assert!(ModuleSelector::new(None, &empty, &empty).is_err());
        assert!(ModuleSelector::new(None, &empty, &["RMSNorm"]).is_ok());
    }
}
