//! Trace context propagation, sans-IO: W3C traceparent/tracestate and B3 (multi-header and single
//! `b3`) read from a request's headers, and the context of this proxy's span written back.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// W3C caps tracestate at 32 list members; a longer header is not forwarded (it is not valid).
const MAX_TRACESTATE_LEN: usize = 512;

/// The caller's part of a trace, as its headers carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentContext {
    /// Never zero (an all-zero id is invalid in both formats).
    pub trace_id: u128,
    /// The caller's span: the parent of this proxy's span. Never zero.
    pub span_id: u64,
    /// The caller's decision: Some(true) sampled (or B3 debug), Some(false) not, None deferred.
    pub sampled: Option<bool>,
    /// W3C tracestate, forwarded unchanged (vendors' entries are not ours to edit).
    pub tracestate: Option<HeaderValue>,
}

/// The context of the span this proxy makes, to be sent onward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: Option<u64>,
    pub sampled: bool,
    pub tracestate: Option<HeaderValue>,
}

/// The caller's context: W3C first (what Envoy's OpenTelemetry tracer reads), then single `b3`,
/// then B3 multi-headers. Malformed headers count as absent, so the request starts a new trace
/// rather than failing. A B3 header that carries only a sampling decision (`b3: 0`,
/// `x-b3-sampled` without ids) has no parent but its decision is kept.
pub fn extract(headers: &HeaderMap) -> Extracted {
    if let Some(parent) = headers.get(TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes())) {
        let tracestate = headers
            .get(TRACESTATE)
            .filter(|v| v.len() <= MAX_TRACESTATE_LEN && !v.is_empty())
            .cloned();
        return Extracted::Parent(ParentContext { tracestate, ..parent });
    }
    if let Some(single) = headers.get(B3) {
        match parse_b3_single(single.as_bytes()) {
            Some(B3Single::Context(parent)) => return Extracted::Parent(parent),
            Some(B3Single::DecisionOnly(sampled)) => return Extracted::DecisionOnly(sampled),
            None => {}
        }
    }
    parse_b3_multi(headers)
}

/// What the caller's headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted {
    Parent(ParentContext),
    /// No (valid) ids, but a sampling decision.
    DecisionOnly(bool),
    None,
}

/// `version-traceid-parentid-flags` (W3C Trace Context level 1). Version ff is invalid; a
/// higher version is read by its first four fields, as the spec asks.
pub fn parse_traceparent(value: &[u8]) -> Option<ParentContext> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && (parts.next().is_some() || text.len() != 55) {
        return None;
    }
    if flags.len() != 2 || !is_lower_hex(flags) {
        return None;
    }
    let trace_id = u128_hex(trace_id)?;
    let span_id = hex_id(span_id, 16)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(ParentContext { trace_id, span_id, sampled: Some(flags & 1 == 1), tracestate: None })
}

enum B3Single {
    Context(ParentContext),
    DecisionOnly(bool),
}

/// `{traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or a lone decision (`0`, `1`, `d`).
fn parse_b3_single(value: &[u8]) -> Option<B3Single> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if let Some(sampled) = b3_decision(text) {
        return Some(B3Single::DecisionOnly(sampled));
    }
    let mut parts = text.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex_id(parts.next()?, 16)?;
    let sampled = match parts.next() {
        Some(flag) => Some(b3_decision(flag)?),
        None => None,
    };
    if let Some(parent) = parts.next() {
        hex_id(parent, 16)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(B3Single::Context(ParentContext { trace_id, span_id, sampled, tracestate: None }))
}

fn parse_b3_multi(headers: &HeaderMap) -> Extracted {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    // Debug (x-b3-flags: 1) implies sampled; x-b3-sampled takes 0/1 and, from old tracers, true/false.
    let sampled = if text(&B3_FLAGS) == Some("1") {
        Some(true)
    } else {
        match text(&B3_SAMPLED) {
            Some("1") | Some("true") => Some(true),
            Some("0") | Some("false") => Some(false),
            _ => None,
        }
    };
    let ids = text(&B3_TRACE_ID).and_then(b3_trace_id).zip(text(&B3_SPAN_ID).and_then(|s| hex_id(s, 16)));
    match (ids, sampled) {
        (Some((trace_id, span_id)), _) => Extracted::Parent(ParentContext { trace_id, span_id, sampled, tracestate: None }),
        (None, Some(sampled)) => Extracted::DecisionOnly(sampled),
        (None, None) => Extracted::None,
    }
}

fn b3_decision(flag: &str) -> Option<bool> {
    match flag {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// B3 trace ids are 64 or 128 bits (16 or 32 hex digits); never all zeros.
fn b3_trace_id(text: &str) -> Option<u128> {
    match text.len() {
        16 => hex_id(text, 16).map(u128::from),
        32 => u128_hex(text),
        _ => None,
    }
}

/// A 16-digit lower- or upper-case hex id, not zero (W3C asks lower case of senders, but a
/// receiver that refused upper case would break traces of lenient B3 tracers).
fn hex_id(text: &str, digits: usize) -> Option<u64> {
    if digits != 16 || text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok().filter(|id| *id != 0)
}

fn u128_hex(text: &str) -> Option<u128> {
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(text, 16).ok().filter(|id| *id != 0)
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Writes `span`'s context into the request going upstream: W3C traceparent (and the caller's
/// tracestate), as Envoy's OpenTelemetry tracer does; and, when the request came with B3 headers
/// (an app that reads and copies those), the B3 multi-headers too, so that they name this span
/// rather than the caller's. A single `b3` header would be stale: it is replaced by those.
/// A request without B3 gets none: one header per request, not five, on the unsampled path.
pub fn inject(span: &SpanContext, headers: &mut HeaderMap) {
    let b3_in_use = headers.contains_key(B3) || headers.contains_key(B3_TRACE_ID) || headers.contains_key(B3_SAMPLED);
    headers.insert(TRACEPARENT, traceparent(span));
    match &span.tracestate {
        Some(state) => {
            headers.insert(TRACESTATE, state.clone());
        }
        None => {
            headers.remove(TRACESTATE);
        }
    }
    if !b3_in_use {
        return;
    }
    headers.remove(B3);
    let mut trace_id = [0u8; 32];
    headers.insert(B3_TRACE_ID, hex_value(hex_into(&mut trace_id, span.trace_id)));
    let mut span_id = [0u8; 16];
    headers.insert(B3_SPAN_ID, hex_value(hex_into(&mut span_id, span.span_id.into())));
    match span.parent_span_id {
        Some(parent) => {
            let mut parent_id = [0u8; 16];
            headers.insert(B3_PARENT_SPAN_ID, hex_value(hex_into(&mut parent_id, parent.into())));
        }
        None => {
            headers.remove(B3_PARENT_SPAN_ID);
        }
    }
    headers.insert(B3_SAMPLED, HeaderValue::from_static(if span.sampled { "1" } else { "0" }));
    // Debug was the caller's to ask for; x-b3-sampled now carries the decision.
    headers.remove(B3_FLAGS);
}

/// Whether a request this proxy has traced carries a sampled context (its injected traceparent
/// ends in flags 01): how later stages skip span bookkeeping for the unsampled many.
pub fn sampled_in(headers: &HeaderMap) -> bool {
    headers.get(TRACEPARENT).is_some_and(|v| v.as_bytes().ends_with(b"-01"))
}

pub fn traceparent(span: &SpanContext) -> HeaderValue {
    // 00-<32 hex>-<16 hex>-<2 hex>, written on the stack (this runs for every request traced).
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut text[3..35], span.trace_id);
    hex_into(&mut text[36..52], span.span_id.into());
    if span.sampled {
        text[54] = b'1';
    }
    hex_value(&text)
}

/// `value`'s low `out.len() / 2` bytes as lower-case hex, most significant first.
fn hex_into(out: &mut [u8], mut value: u128) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
    out
}

fn hex_value(text: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(text).expect("hex digits and dashes are a valid header value")
}

/// A new, random, non-zero span id.
pub fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

/// A new, random, non-zero trace id.
pub fn new_trace_id() -> u128 {
    fastrand::u128(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        map
    }

    const TRACE: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;

    #[test]
    fn w3c_traceparent_and_tracestate_are_read() {
        let found = extract(&headers(&[
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]));
        let Extracted::Parent(parent) = found else { panic!("{found:?}") };
        assert_eq!(parent.trace_id, TRACE);
        assert_eq!(parent.span_id, 0x00f067aa0ba902b7);
        assert_eq!(parent.sampled, Some(true));
        assert_eq!(parent.tracestate.unwrap(), "congo=t61rcWkgMzE");
        let unsampled = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert_eq!(unsampled.sampled, Some(false));
        // A future version may add fields after the flags.
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever").is_some());
    }

    #[test]
    fn malformed_traceparents_are_absent_not_errors() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-x1",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
        // A bad traceparent falls through to B3 if the caller sent that too.
        let found = extract(&headers(&[
            ("traceparent", "nonsense"),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        assert!(matches!(found, Extracted::Parent(ParentContext { trace_id: 0x463ac35c9f6413ad, sampled: None, .. })));
    }

    #[test]
    fn b3_multi_headers_are_read_with_their_flags() {
        let found = extract(&headers(&[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!(
            found,
            Extracted::Parent(ParentContext { trace_id: TRACE, span_id: 0xa2fb4a1d1a96d312, sampled: Some(false), tracestate: None })
        );
        // Debug means sampled, whatever x-b3-sampled says.
        let debug = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ]));
        assert!(matches!(debug, Extracted::Parent(ParentContext { sampled: Some(true), .. })));
        assert_eq!(extract(&headers(&[("x-b3-sampled", "1")])), Extracted::DecisionOnly(true));
        assert_eq!(extract(&headers(&[("x-b3-traceid", "xyz"), ("x-b3-spanid", "a2fb4a1d1a96d312")])), Extracted::None);
        assert_eq!(extract(&headers(&[("x-b3-traceid", "463ac35c9f6413ad")])), Extracted::None);
        assert_eq!(extract(&HeaderMap::new()), Extracted::None);
    }

    #[test]
    fn single_b3_header_is_read() {
        let found = extract(&headers(&[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-a2fb4a1d1a96d312-1-0020000000000001")]));
        assert!(matches!(found, Extracted::Parent(ParentContext { trace_id: TRACE, span_id: 0xa2fb4a1d1a96d312, sampled: Some(true), .. })));
        let deferred = extract(&headers(&[("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312")]));
        assert!(matches!(deferred, Extracted::Parent(ParentContext { sampled: None, .. })));
        assert_eq!(extract(&headers(&[("b3", "0")])), Extracted::DecisionOnly(false));
        assert_eq!(extract(&headers(&[("b3", "d")])), Extracted::DecisionOnly(true));
        for bad in ["463ac35c9f6413ad", "463ac35c9f6413ad-a2fb4a1d1a96d312-x", "463ac35c9f6413ad-a2fb4a1d1a96d312-1-zz", "a-b-c-d-e"] {
            let mut map = HeaderMap::new();
            map.insert(B3, HeaderValue::from_static(bad));
            assert_eq!(extract(&map), Extracted::None, "{bad:?}");
        }
    }

    #[test]
    fn without_b3_from_the_caller_only_w3c_is_sent() {
        let span = SpanContext { trace_id: 1, span_id: 0xab, parent_span_id: None, sampled: true, tracestate: None };
        let mut map = HeaderMap::new();
        inject(&span, &mut map);
        assert_eq!(map[TRACEPARENT], "00-00000000000000000000000000000001-00000000000000ab-01");
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn injected_headers_name_this_span_and_read_back() {
        let span = SpanContext {
            trace_id: TRACE,
            span_id: 0x1111222233334444,
            parent_span_id: Some(0x00f067aa0ba902b7),
            sampled: true,
            tracestate: Some(HeaderValue::from_static("congo=t61rcWkgMzE")),
        };
        let mut map = headers(&[("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312-1"), ("x-b3-flags", "1")]);
        inject(&span, &mut map);
        assert_eq!(map[TRACEPARENT], "00-4bf92f3577b34da6a3ce929d0e0e4736-1111222233334444-01");
        assert_eq!(map[TRACESTATE], "congo=t61rcWkgMzE");
        assert_eq!(map[B3_TRACE_ID], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(map[B3_SPAN_ID], "1111222233334444");
        assert_eq!(map[B3_PARENT_SPAN_ID], "00f067aa0ba902b7");
        assert_eq!(map[B3_SAMPLED], "1");
        assert!(!map.contains_key(B3) && !map.contains_key(B3_FLAGS));
        let Extracted::Parent(read) = extract(&map) else { panic!() };
        assert_eq!((read.trace_id, read.span_id, read.sampled), (TRACE, 0x1111222233334444, Some(true)));
        assert!(sampled_in(&map));
        let unsampled = SpanContext { sampled: false, parent_span_id: None, tracestate: None, ..span };
        inject(&unsampled, &mut map);
        assert!(!sampled_in(&map));
        assert!(map[TRACEPARENT].to_str().unwrap().ends_with("-00"));
        assert_eq!(map[B3_SAMPLED], "0");
        assert!(!map.contains_key(TRACESTATE) && !map.contains_key(B3_PARENT_SPAN_ID));
    }
}
