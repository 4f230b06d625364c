//! The mesh header `x-meshctl-peer`: a caller sidecar's own workload metadata, sent to the
//! callee sidecar so that its inbound metrics can name the caller.
//!
//! Why a header of our own rather than Istio's `x-envoy-peer-metadata` (a base64 protobuf
//! Struct): it is a tenth of the size (one short line of `;`-separated fields) and needs no
//! protobuf on the request path. Trust comes from mTLS, not from the header: the caller's sidecar
//! always removes any copy its app sent and adds its own only on mTLS connections to another
//! sidecar; the callee's sidecar believes it only when its principal is the SPIFFE ID the peer's
//! certificate proved, and always removes it before the app. So an app can neither forge nor
//! read it.
//!
//! Format: `1;WORKLOAD;NAMESPACE;PRINCIPAL;APP;VERSION;CANONICAL_SERVICE;CANONICAL_REVISION;CLUSTER`,
//! each field percent-escaped (`%`, `;` and anything outside visible ASCII).

use http::header::{HeaderName, HeaderValue};

use crate::model::workload::WorkloadMetadata;

pub const PEER_HEADER: HeaderName = HeaderName::from_static("x-meshctl-peer");

/// A longer value is not ours: ignored rather than parsed.
const MAX_LEN: usize = 2048;
const VERSION: &str = "1";

/// The header value a sidecar sends as itself (made once per config, cloned per request).
pub fn encode(metadata: &WorkloadMetadata) -> HeaderValue {
    let mut out = String::from(VERSION);
    for field in metadata.fields() {
        out.push(';');
        for byte in field.bytes() {
            if byte == b'%' || byte == b';' || !(0x21..=0x7e).contains(&byte) {
                out.push_str(&format!("%{byte:02X}"));
            } else {
                out.push(byte as char);
            }
        }
    }
    HeaderValue::from_str(&out).expect("escaped to visible ASCII")
}

/// The metadata a header carries; None when it is not one this version wrote.
pub fn decode(value: &[u8]) -> Option<WorkloadMetadata> {
    if value.len() > MAX_LEN {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split(';');
    if parts.next()? != VERSION {
        return None;
    }
    let fields: Vec<String> = parts.map(unescape).collect::<Option<_>>()?;
    let [workload, namespace, principal, app, version, canonical_service, canonical_revision, cluster] = fields.as_slice() else {
        return None;
    };
    Some(WorkloadMetadata::new(workload, namespace, principal, app, version, canonical_service, canonical_revision, cluster))
}

fn unescape(field: &str) -> Option<String> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_escapes_separators() {
        let metadata = WorkloadMetadata::new("web-v1", "shop", "spiffe://cluster.local/ns/shop/sa/web", "web", "v 1;x%", "web", "", "");
        let value = encode(&metadata);
        assert_eq!(
            value.to_str().unwrap(),
            "1;web-v1;shop;spiffe://cluster.local/ns/shop/sa/web;web;v%201%3Bx%25;web;latest;unknown"
        );
        assert_eq!(decode(value.as_bytes()), Some(metadata));
    }

    #[test]
    fn refuses_what_it_did_not_write() {
        assert_eq!(decode(b"2;a;b;c;d;e;f;g;h"), None);
        assert_eq!(decode(b"1;a;b;c"), None);
        assert_eq!(decode(b"1;a;b;c;d;e;f;g;h;i"), None);
        assert_eq!(decode(b"1;a%zz;b;c;d;e;f;g;h"), None);
        assert_eq!(decode(&[b'1'; 4096]), None);
    }
}
