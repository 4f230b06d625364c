//! String matchers shared by header, query-parameter and path matching.

use regex::Regex;
use serde::Serialize;

/// How one string value is matched (Envoy's StringMatcher). Regexes match the whole value.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(#[serde(serialize_with = "serialize_regex")] Regex),
}

#[derive(Debug, Clone, Serialize)]
pub struct StringMatcher {
    pub pattern: StringMatch,
    pub ignore_case: bool,
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        if self.ignore_case {
            let value = value.to_ascii_lowercase();
            // Patterns were lower-cased when the matcher was built.
            self.matches_exactly(&value)
        } else {
            self.matches_exactly(value)
        }
    }

    fn matches_exactly(&self, value: &str) -> bool {
        match &self.pattern {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Contains(s) => value.contains(s.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// Compile a regex that must match the entire input, as Envoy's RE2 `safe_regex` does.
pub fn full_match_regex(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

pub fn serialize_regex<S: serde::Serializer>(regex: &Regex, serializer: S) -> Result<S::Ok, S::Error> {
    let full = regex.as_str();
    let inner = full.strip_prefix("^(?:").and_then(|s| s.strip_suffix(")$")).unwrap_or(full);
    serializer.serialize_str(inner)
}
