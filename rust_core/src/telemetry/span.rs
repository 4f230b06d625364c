//! A finished span, as the request path hands it to the exporter, and its OTLP form.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use super::otlp;
use crate::model::tracing::SpanKind;

/// Any tag value longer than this is cut (a header an app filled with a megabyte must not
/// become a megabyte in every batch); http.url has its own, configured, cap.
pub const MAX_TAG_VALUE_LENGTH: usize = 1024;

#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: Option<u64>,
    pub tracestate: Option<String>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub duration: Duration,
    /// Envoy's tags, all string-valued as Envoy sets them.
    pub tags: Vec<(Cow<'static, str>, String)>,
    /// 5xx or no response at all: the span's status is ERROR (and its `error` tag "true").
    pub error: bool,
}

/// `value` cut to at most `limit` bytes, on a character boundary.
pub fn truncated(mut value: String, limit: usize) -> String {
    if value.len() > limit {
        let mut end = limit;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

impl FinishedSpan {
    pub fn to_otlp(&self) -> otlp::Span {
        let nanos = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let start = nanos(self.start);
        otlp::Span {
            trace_id: self.trace_id.to_be_bytes().to_vec(),
            span_id: self.span_id.to_be_bytes().to_vec(),
            trace_state: self.tracestate.clone().unwrap_or_default(),
            parent_span_id: self.parent_span_id.map(|id| id.to_be_bytes().to_vec()).unwrap_or_default(),
            name: self.name.clone(),
            kind: match self.kind {
                SpanKind::Server => otlp::SPAN_KIND_SERVER,
                SpanKind::Client => otlp::SPAN_KIND_CLIENT,
            },
            start_time_unix_nano: start,
            end_time_unix_nano: start + self.duration.as_nanos() as u64,
            attributes: self.tags.iter().map(|(key, value)| otlp::KeyValue::string(key.as_ref(), value.as_str())).collect(),
            status: self.error.then(|| otlp::Status { code: otlp::STATUS_CODE_ERROR, message: String::new() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_becomes_otlp_with_its_ids_times_and_tags() {
        let span = FinishedSpan {
            trace_id: 0x0102,
            span_id: 0x0a0b,
            parent_span_id: Some(7),
            tracestate: None,
            name: "reviews:9080/*".into(),
            kind: SpanKind::Client,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(2),
            duration: Duration::from_millis(3),
            tags: vec![("http.status_code".into(), "503".into())],
            error: true,
        };
        let otlp = span.to_otlp();
        assert_eq!(otlp.trace_id.len(), 16);
        assert_eq!(&otlp.trace_id[14..], &[1, 2]);
        assert_eq!(otlp.span_id, vec![0, 0, 0, 0, 0, 0, 0x0a, 0x0b]);
        assert_eq!(otlp.parent_span_id, 7u64.to_be_bytes().to_vec());
        assert_eq!(otlp.kind, otlp::SPAN_KIND_CLIENT);
        assert_eq!(otlp.end_time_unix_nano - otlp.start_time_unix_nano, 3_000_000);
        assert_eq!(otlp.status.unwrap().code, otlp::STATUS_CODE_ERROR);
        assert_eq!(otlp.attributes[0], otlp::KeyValue::string("http.status_code", "503"));
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(truncated("abcdef".into(), 4), "abcd");
        assert_eq!(truncated("ééé".into(), 3), "é");
        assert_eq!(truncated("ab".into(), 4), "ab");
    }
}
