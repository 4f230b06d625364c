//! Decoding helpers for Envoy's core types: addresses, durations, data sources, matchers, headers.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf;
use http::header::{HeaderName, HeaderValue};

use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::headers::{AppendAction, HeaderAddition, HeaderMutation};
use crate::model::matcher::{full_match_regex, StringMatch, StringMatcher};

pub(crate) fn duration(d: &protobuf::Duration) -> FieldResult<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(FieldError::new("", "a duration must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// An IP socket address; hostnames are resolved only where `resolve` allows (DNS clusters).
pub(crate) fn socket_address(address: &Option<core::Address>, resolve: bool) -> FieldResult<SocketAddr> {
    let address = address.as_ref().ok_or_else(|| FieldError::new("", "is required"))?;
    let socket = match &address.address {
        Some(core::address::Address::SocketAddress(s)) => s,
        Some(core::address::Address::Pipe(_)) => return Err(FieldError::unsupported("pipe")),
        Some(core::address::Address::EnvoyInternalAddress(_)) => {
            return Err(FieldError::unsupported("envoy_internal_address"))
        }
        None => return Err(FieldError::new("socket_address", "is required")),
    };
    socket_address_inner(socket, resolve).at("socket_address")
}

fn socket_address_inner(socket: &core::SocketAddress, resolve: bool) -> FieldResult<SocketAddr> {
    refuse_if(socket.protocol != 0, "protocol")?;
    refuse_if(!socket.resolver_name.is_empty(), "resolver_name")?;
    refuse_if(!socket.network_namespace_filepath.is_empty(), "network_namespace_filepath")?;
    let port = match &socket.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(*p).map_err(|_| FieldError::new("port_value", format!("{p} is not a port (0-65535)")))?
        }
        Some(core::socket_address::PortSpecifier::NamedPort(_)) => return Err(FieldError::unsupported("named_port")),
        None => return Err(FieldError::new("port_value", "is required")),
    };
    if socket.address.is_empty() {
        return Err(FieldError::new("address", "is required"));
    }
    if let Ok(ip) = socket.address.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if !resolve {
        return Err(FieldError::new(
            "address",
            format!("{:?} is not an IP address (hostnames are allowed only in STRICT_DNS and LOGICAL_DNS clusters)", socket.address),
        ));
    }
    (socket.address.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| FieldError::new("address", format!("{:?} does not resolve", socket.address)))
}

/// The bytes of a DataSource: inline, or read from a file once, at decode time.
pub(crate) fn data_source(source: &core::DataSource) -> FieldResult<(Vec<u8>, String)> {
    use core::data_source::Specifier;
    refuse_if(source.watched_directory.is_some(), "watched_directory")?;
    match &source.specifier {
        Some(Specifier::InlineString(s)) => Ok((s.as_bytes().to_vec(), "inline".into())),
        Some(Specifier::InlineBytes(b)) => Ok((b.clone(), "inline".into())),
        Some(Specifier::Filename(f)) => std::fs::read(f)
            .map(|bytes| (bytes, f.clone()))
            .map_err(|e| FieldError::new("filename", format!("cannot read {f:?}: {e}"))),
        Some(Specifier::EnvironmentVariable(v)) => std::env::var(v)
            .map(|value| (value.into_bytes(), format!("${v}")))
            .map_err(|_| FieldError::new("environment_variable", format!("{v} is not set"))),
        None => Err(FieldError::new("", "a data source needs one of inline_string, inline_bytes, filename, environment_variable")),
    }
}

pub(crate) fn regex(pattern: &str) -> FieldResult<regex::Regex> {
    if pattern.len() > 4096 {
        return Err(FieldError::new("regex", "is longer than 4096 bytes"));
    }
    full_match_regex(pattern).map_err(|e| FieldError::new("regex", format!("invalid regex {pattern:?}: {e}")))
}

pub(crate) fn regex_matcher(m: &matcher::RegexMatcher) -> FieldResult<regex::Regex> {
    regex(&m.regex)
}

pub(crate) fn string_matcher(m: &matcher::StringMatcher) -> FieldResult<StringMatcher> {
    use matcher::string_matcher::MatchPattern;
    let lower = |s: &String| if m.ignore_case { s.to_ascii_lowercase() } else { s.clone() };
    let pattern = match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatch::Exact(lower(s)),
        Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(lower(s)),
        Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(lower(s)),
        Some(MatchPattern::Contains(s)) => StringMatch::Contains(lower(s)),
        Some(MatchPattern::SafeRegex(r)) => {
            refuse_if(m.ignore_case, "ignore_case")?;
            StringMatch::Regex(regex_matcher(r).at("safe_regex")?)
        }
        Some(MatchPattern::Custom(_)) => return Err(FieldError::unsupported("custom")),
        None => return Err(FieldError::new("", "a string matcher needs one of exact, prefix, suffix, contains, safe_regex")),
    };
    Ok(StringMatcher { pattern, ignore_case: m.ignore_case })
}

pub(crate) fn header_name(name: &str) -> FieldResult<HeaderName> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| FieldError::new("key", format!("{name:?} is not a valid header name")))
}

pub(crate) fn header_mutation(add: &[core::HeaderValueOption], remove: &[String]) -> FieldResult<HeaderMutation> {
    let mut mutation = HeaderMutation::default();
    for (i, option) in add.iter().enumerate() {
        mutation.add.push(header_addition(option).at(format!("[{i}]"))?);
    }
    for (i, name) in remove.iter().enumerate() {
        let name = header_name(name).map_err(|e| FieldError::new(format!("[{i}]"), e.reason))?;
        if name.as_str().starts_with(':') || name == http::header::HOST {
            return Err(FieldError::new(format!("[{i}]"), format!("{name} cannot be removed")));
        }
        mutation.remove.push(name);
    }
    Ok(mutation)
}

fn header_addition(option: &core::HeaderValueOption) -> FieldResult<HeaderAddition> {
    let header = option.header.as_ref().ok_or_else(|| FieldError::new("header", "is required"))?;
    let name = header_name(&header.key).at("header")?;
    let raw = if header.raw_value.is_empty() { header.value.as_bytes() } else { &header.raw_value[..] };
    // Envoy expands %COMMAND% operators in header values; the engine does not, so refuse them
    // rather than sending the literal text (a lone "%%" is Envoy's escaped percent sign).
    if String::from_utf8_lossy(raw).replace("%%", "").contains('%') {
        return Err(FieldError::new("header.value", "%COMMAND% substitutions are not supported by meshctl yet"));
    }
    let unescaped = String::from_utf8_lossy(raw).replace("%%", "%");
    let value = HeaderValue::from_str(&unescaped)
        .map_err(|_| FieldError::new("header.value", "is not a valid header value"))?;
    let action = match (option.append.as_ref().map(|b| b.value), option.append_action) {
        (Some(true), _) => AppendAction::AppendIfExistsOrAdd,
        (Some(false), _) => AppendAction::OverwriteIfExistsOrAdd,
        (None, 0) => AppendAction::AppendIfExistsOrAdd,
        (None, 1) => AppendAction::AddIfAbsent,
        (None, 2) => AppendAction::OverwriteIfExistsOrAdd,
        (None, 3) => AppendAction::OverwriteIfExists,
        (None, other) => return Err(FieldError::new("append_action", format!("unknown value {other}"))),
    };
    Ok(HeaderAddition { name, value, action })
}

/// Decode an Any after checking its type URL.
pub(crate) fn unpack<M: prost::Message + Default>(any: &protobuf::Any, expected: &str) -> FieldResult<M> {
    if any.type_url != expected {
        return Err(FieldError::new("", format!("expected {expected}, got {}", any.type_url)));
    }
    M::decode(any.value.as_slice()).map_err(|e| FieldError::new("", format!("cannot decode {expected}: {e}")))
}
