//! Selection patterns: how one configured string matches a module's qualified name. Exact
//! dotted suffixes, shell globs with Python `fnmatch` semantics, and `re:` regexes with
//! Python `re.match` semantics (verl's `ignore_patterns`).

use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
