//! Module selection: which modules of a model are quantized or noised, and which rule decided.
//!
//! Normative rules: `shared/DESIGN.md`, "Module selection". A module is described by its
//! qualified name (as `named_modules()` yields it) and its class name; no torch is needed, so
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

/// The kinds of module a selector can pick, decided from the class name alone so that vLLM's
/// classes count without importing vLLM (DESIGN.md: "match norms by class name, not by
/// `isinstance` on HF classes").
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

/// One item of a shell-glob set `[...]`.
#[derive(Debug, Clone, PartialEq)]
enum SetItem {
    Char(char),
    /// Inclusive range; a reversed range (`z-a`) matches nothing, as in Python's fnmatch.
    Range(char, char),
}

#[derive(Debug, Clone, PartialEq)]
enum GlobToken {
    /// `*`: any run of characters, dots included.
    Star,
    /// `?`: any one character.
    Any,
    /// `[seq]` / `[!seq]`.
    Set {
        negated: bool,
        items: Vec<SetItem>,
    },
    Literal(char),
}

impl GlobToken {
    /// Whether this single-character token matches `c` (not for [`GlobToken::Star`]).
    fn matches_char(&self, c: char) -> bool {
        match self {
            GlobToken::Star | GlobToken::Any => true,
            GlobToken::Literal(l) => *l == c,
            GlobToken::Set { negated, items } => {
                let hit = items.iter().any(|it| match *it {
                    SetItem::Char(x) => x == c,
                    SetItem::Range(lo, hi) => lo <= c && c <= hi,
                });
                hit != *negated
            }
        }
    }
}

/// A shell glob with Python `fnmatch.fnmatchcase` semantics: `*` matches any run of characters
/// (dots included), `?` any one character, `[seq]` one character in `seq` (ranges `a-z`; a `]`
/// first in the set is literal; `-` first or last is literal), `[!seq]` one character not in
/// `seq`; a `[` without a closing `]` is a literal `[`; there is no escaping (`\` is literal).
/// Matching is case-sensitive and against the whole name.
#[derive(Debug, Clone, PartialEq)]
pub struct Glob {
    tokens: Vec<GlobToken>,
}

impl Glob {
    /// Parse a glob; every string is a valid glob.
    pub fn new(pattern: &str) -> Glob {
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '*' => {
                    // consecutive stars are one star
                    if tokens.last() != Some(&GlobToken::Star) {
                        tokens.push(GlobToken::Star);
                    }
                }
                '?' => tokens.push(GlobToken::Any),
                '[' => match parse_set(&chars, i) {
                    Some((tok, next)) => {
                        tokens.push(tok);
                        i = next;
                    }
                    None => tokens.push(GlobToken::Literal('[')),
                },
                _ => tokens.push(GlobToken::Literal(c)),
            }
        }
        Glob { tokens }
    }

    /// Whether the whole of `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        // Classic wildcard matching with one backtrack point: every token but `*` consumes
        // exactly one character, so retrying from the last star is complete.
        let s: Vec<char> = name.chars().collect();
        let t = &self.tokens;
        let (mut si, mut ti) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None; // (token after star, chars consumed at star)
        while si < s.len() {
            if ti < t.len() && t[ti] == GlobToken::Star {
                star = Some((ti + 1, si));
                ti += 1;
            } else if ti < t.len() && t[ti].matches_char(s[si]) {
                ti += 1;
                si += 1;
            } else if let Some((tnext, sstart)) = star {
                ti = tnext;
                si = sstart + 1;
                star = Some((tnext, sstart + 1));
            } else {
                return false;
            }
        }
        t[ti..].iter().all(|tok| *tok == GlobToken::Star)
    }
}

/// Parse a set starting just after its `[` at `start`; `None` if there is no closing `]`
/// (then the `[` is literal). Mirrors `fnmatch.translate` of CPython 3.11.
fn parse_set(chars: &[char], start: usize) -> Option<(GlobToken, usize)> {
    let mut j = start;
    let negated = j < chars.len() && chars[j] == '!';
    if negated {
        j += 1;
    }
    let body_start = j;
    if j < chars.len() && chars[j] == ']' {
        j += 1; // a leading ']' is a member
    }
    while j < chars.len() && chars[j] != ']' {
        j += 1;
    }
    if j >= chars.len() {
        return None;
    }
    let body = &chars[body_start..j];
    let mut items = Vec::new();
    let mut k = 0;
    while k < body.len() {
        if k + 2 < body.len() && body[k + 1] == '-' {
            items.push(SetItem::Range(body[k], body[k + 2]));
            k += 3;
        } else {
            items.push(SetItem::Char(body[k]));
            k += 1;
        }
    }
    Some((GlobToken::Set { negated, items }, j + 1))
}

/// One selection pattern, parsed from its config string:
/// - `re:<regex>`: a regular expression (Rust `regex` syntax, which has no look-around or
///   back-references), matched like Python's `re.match` as verl's `ignore_patterns` do: anchored
///   at the start of the name, free at the end (add `$` to anchor there);
/// - a string containing `*`, `?` or `[`: a shell glob against the whole name ([`Glob`]);
/// - anything else: an exact name that must equal a whole dotted suffix of the module name
///   (`lm_head` matches `lm_head` and `model.lm_head`, not `my_lm_head`; `mlp.down_proj`
///   matches `model.layers.0.mlp.down_proj`).
#[derive(Debug, Clone)]
pub enum Pattern {
    Exact(String),
    Glob { source: String, glob: Glob },
    Regex { source: String, regex: regex::Regex },
}

impl Pattern {
    /// Parse a pattern; errors name the pattern and what is wrong with it.
    pub fn parse(s: &str) -> Result<Pattern> {
        if s.is_empty() {
            return Err(Error::Argument(
                "empty selection pattern; give a module name, a glob or re:<regex>".into(),
            ));
        }
        if let Some(re) = s.strip_prefix("re:") {
            if re.is_empty() {
                return Err(Error::Argument(format!(
                    "empty regular expression in pattern {s:?}"
                )));
            }
            // Compiled alone first so the error message shows the user's regex, then wrapped:
            // `^(?:...)` gives Python `re.match` semantics (verl's ignore_patterns).
            let bad = |e: regex::Error| {
                Error::Argument(format!("bad regular expression in pattern {s:?}: {e}"))
            };
            regex::Regex::new(re).map_err(bad)?;
            let regex = regex::Regex::new(&format!("^(?:{re})")).map_err(bad)?;
            return Ok(Pattern::Regex {
                source: s.to_owned(),
                regex,
            });
        }
        if s.contains(['*', '?', '[']) {
            return Ok(Pattern::Glob {
                source: s.to_owned(),
                glob: Glob::new(s),
            });
        }
        if s.split('.').any(str::is_empty) {
            return Err(Error::Argument(format!(
                "bad module name pattern {s:?}: empty dotted component (leading, trailing or double '.')"
            )));
        }
        Ok(Pattern::Exact(s.to_owned()))
    }

    /// The pattern as written in the config.
    pub fn source(&self) -> &str {
        match self {
            Pattern::Exact(s) => s,
            Pattern::Glob { source, .. } | Pattern::Regex { source, .. } => source,
        }
    }

    /// Whether the pattern matches the (canonical) module name.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(p) => {
                name == p
                    || (name.len() > p.len()
                        && name.ends_with(p.as_str())
                        && name.as_bytes()[name.len() - p.len() - 1] == b'.')
            }
            Pattern::Glob { glob, .. } => glob.matches(name),
            Pattern::Regex { regex, .. } => regex.is_match(name),
        }
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source() == other.source()
    }
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

/// The default exclusions: production recipes never quantize or noise these (DESIGN.md).
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
    fn exact_is_a_dotted_suffix() {
        let p = Pattern::parse("lm_head").unwrap();
        assert!(p.matches("lm_head"));
        assert!(p.matches("model.lm_head"));
        assert!(!p.matches("my_lm_head"));
        assert!(!p.matches("model.my_lm_head"));
        assert!(!p.matches("lm_head.sub"));
        let p = Pattern::parse("mlp.down_proj").unwrap();
        assert!(p.matches("model.layers.0.mlp.down_proj"));
        assert!(!p.matches("model.layers.0.xmlp.down_proj"));
    }

    #[test]
    fn globs_match_the_whole_name() {
        let g = Glob::new("*.mlp.gate");
        assert!(g.matches("model.layers.0.mlp.gate"));
        assert!(!g.matches("model.layers.0.mlp.gate_proj"));
        assert!(!g.matches("mlp.gate"));
        let g = Glob::new("model.layers.[0-3].*");
        assert!(g.matches("model.layers.2.self_attn.qkv_proj"));
        assert!(!g.matches("model.layers.4.self_attn.qkv_proj"));
        let g = Glob::new("*proj[!_]");
        assert!(!g.matches("x.gate_proj"));
        assert!(Glob::new("a?c").matches("abc"));
        assert!(!Glob::new("a?c").matches("ac"));
        assert!(Glob::new("a[").matches("a["));
        assert!(Glob::new("[]]").matches("]"));
        assert!(Glob::new("[!]]").matches("a"));
        assert!(!Glob::new("[z-a]").matches("m"));
        assert!(Glob::new("[!z-a]").matches("m"));
        assert!(Glob::new("[a-]").matches("-"));
        assert!(Glob::new("**").matches(""));
        assert!(Glob::new("*a*b*").matches("xxaxxbxx"));
        assert!(!Glob::new("*a*b*").matches("xxbxxaxx"));
    }

    #[test]
    fn regex_is_anchored_at_the_start_only() {
        let p = Pattern::parse("re:.*mlp\\.gate$").unwrap();
        assert!(p.matches("model.layers.0.mlp.gate"));
        assert!(!p.matches("model.layers.0.mlp.gate_proj"));
        let p = Pattern::parse("re:model").unwrap();
        assert!(p.matches("model.layers.0"));
        assert!(!p.matches("x.model"));
        // an alternation stays anchored as a whole
        let p = Pattern::parse("re:a|b").unwrap();
        assert!(!p.matches("xb"));
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
