//! Header mutations (add / remove) attached to route configs, virtual hosts, routes and clusters.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

/// Envoy's HeaderValueOption.HeaderAppendAction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderAddition {
    #[serde(serialize_with = "serialize_name")]
    pub name: HeaderName,
    #[serde(serialize_with = "serialize_value")]
    pub value: HeaderValue,
    pub action: AppendAction,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderMutation {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderAddition>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "serialize_names")]
    pub remove: Vec<HeaderName>,
}

impl HeaderMutation {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Removals first, then additions, as Envoy's header parser evaluates them.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for addition in &self.add {
            match addition.action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(addition.name.clone(), addition.value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&addition.name) {
                        headers.insert(addition.name.clone(), addition.value.clone());
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(addition.name.clone(), addition.value.clone());
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&addition.name) {
                        headers.insert(addition.name.clone(), addition.value.clone());
                    }
                }
            }
        }
    }
}

fn serialize_name<S: serde::Serializer>(name: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

fn serialize_value<S: serde::Serializer>(value: &HeaderValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(value.as_bytes()))
}

fn serialize_names<S: serde::Serializer>(names: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().map(|n| n.as_str()))
}
