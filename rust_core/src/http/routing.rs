//! Route selection: the virtual host for the authority, then the first route whose match holds.

use std::borrow::Cow;

use http::{HeaderMap, Method};

use crate::model::route::{HeaderMatcher, HeaderRule, PathMatch, QueryParameterMatcher, Route, RouteConfig, RouteMatch, VirtualHost};

/// What route matching reads of a request.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Path and query as received, e.g. `/a/b?x=1`.
    pub path_and_query: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
}

impl RequestView<'_> {
    fn path(&self) -> &str {
        self.path_and_query.split_once('?').map_or(self.path_and_query, |(p, _)| p)
    }

    fn query(&self) -> &str {
        self.path_and_query.split_once('?').map_or("", |(_, q)| q)
    }
}

pub fn select_virtual_host<'c>(config: &'c RouteConfig, authority: &str) -> Option<&'c VirtualHost> {
    let mut host: Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(authority.to_ascii_lowercase())
    } else {
        Cow::Borrowed(authority)
    };
    if config.ignore_port_in_host_matching {
        if let Some(stripped) = strip_port(&host) {
            host = Cow::Owned(stripped.to_string());
        }
    }
    let index = &config.domains;
    let found = index
        .exact
        .get(host.as_ref())
        .copied()
        // A wildcard must stand for at least one character.
        .or_else(|| index.suffixes.iter().find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str())).map(|(_, i)| *i))
        .or_else(|| index.prefixes.iter().find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str())).map(|(_, i)| *i))
        .or(index.wildcard);
    found.map(|i| &config.virtual_hosts[i])
}

fn strip_port(host: &str) -> Option<&str> {
    let (name, port) = host.rsplit_once(':')?;
    // IPv6 literals keep their colons inside brackets.
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && (!name.contains(':') || name.ends_with(']'))).then_some(name)
}

pub fn select_route<'v>(vhost: &'v VirtualHost, request: &RequestView<'_>) -> Option<&'v Route> {
    // A CONNECT request names an authority, not a path. Envoy routes one only by connect_matcher
    // (path matchers never match it), which meshctl refuses: it matches no route and gets 404,
    // rather than being forwarded as `CONNECT /`.
    if request.method == Method::CONNECT {
        return None;
    }
    vhost.routes.iter().find(|route| route_matches(&route.matcher, request))
}

fn route_matches(m: &RouteMatch, request: &RequestView<'_>) -> bool {
    path_matches(m, request.path())
        && m.headers.iter().all(|h| header_matches(h, request))
        && (m.query_parameters.is_empty() || query_matches(&m.query_parameters, request.query()))
}

fn path_matches(m: &RouteMatch, path: &str) -> bool {
    let folded: Cow<'_, str> = if m.case_sensitive { Cow::Borrowed(path) } else { Cow::Owned(path.to_ascii_lowercase()) };
    match &m.path {
        PathMatch::Prefix(prefix) => folded.starts_with(prefix.as_str()),
        PathMatch::Exact(exact) => folded == exact.as_str(),
        PathMatch::PathSeparatedPrefix(prefix) => {
            folded.starts_with(prefix.as_str())
                && (folded.len() == prefix.len() || folded.as_bytes()[prefix.len()] == b'/')
        }
        // Envoy matches regexes against the path as received, case folding aside.
        PathMatch::Regex(regex) => regex.is_match(path),
    }
}

fn header_value<'a>(name: &str, request: &'a RequestView<'_>) -> Option<Cow<'a, str>> {
    match name {
        ":method" => Some(Cow::Borrowed(request.method.as_str())),
        ":path" => Some(Cow::Borrowed(request.path_and_query)),
        ":authority" | "host" => Some(Cow::Borrowed(request.authority)),
        ":scheme" => Some(Cow::Borrowed(request.scheme)),
        _ => {
            let mut values = request.headers.get_all(name).iter();
            let first = values.next()?;
            let first = String::from_utf8_lossy(first.as_bytes());
            // Several headers of one name are matched as their comma-joined value, like Envoy.
            match values.next() {
                None => Some(first),
                Some(second) => {
                    let mut joined = first.into_owned();
                    for v in std::iter::once(second).chain(values) {
                        joined.push(',');
                        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
                    }
                    Some(Cow::Owned(joined))
                }
            }
        }
    }
}

pub(crate) fn header_matches(h: &HeaderMatcher, request: &RequestView<'_>) -> bool {
    let value = header_value(&h.name, request).or_else(|| h.treat_missing_as_empty.then_some(Cow::Borrowed("")));
    let matched = match (&h.rule, value) {
        (HeaderRule::Present(expect), value) => value.is_some() == *expect,
        (_, None) => return false, // An absent header fails even an inverted match (Envoy).
        (HeaderRule::String(m), Some(v)) => m.matches(&v),
        (HeaderRule::Range { start, end }, Some(v)) => v.parse::<i64>().is_ok_and(|n| n >= *start && n < *end),
    };
    matched != h.invert
}

fn query_matches(matchers: &[QueryParameterMatcher], query: &str) -> bool {
    matchers.iter().all(|m| {
        query.split('&').filter(|p| !p.is_empty()).any(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            name == m.name && m.value.as_ref().is_none_or(|v| v.matches(value))
        })
    })
}
