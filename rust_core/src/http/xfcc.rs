//! `x-forwarded-client-cert` as Envoy writes it: removed, forwarded, or set/appended with the
//! verified client of this connection (`By=<our SPIFFE ID>;Hash=<peer leaf SHA-256>;URI=<peer>`).

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::model::tls::{ForwardClientCert, ForwardClientCertMode as Mode, PeerIdentity};

pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Rewrite the request's XFCC header for one hop. `peer` is the verified client certificate's
/// identity (None: plaintext, or TLS without a client certificate); `local` our own SPIFFE ID.
pub fn forward_client_cert(config: &ForwardClientCert, peer: Option<&PeerIdentity>, local: Option<&str>, headers: &mut HeaderMap) {
    if config.mode == Mode::AlwaysForwardOnly {
        return;
    }
    let Some(peer) = peer.filter(|_| config.mode != Mode::Sanitize) else {
        // SANITIZE, or a client with no certificate: nothing it says about certificates is trusted.
        headers.remove(XFCC);
        return;
    };
    if config.mode == Mode::ForwardOnly {
        return;
    }
    // One string, built in place: this runs for every request on an mTLS connection.
    let mut value = String::with_capacity(256);
    if config.mode == Mode::AppendForward {
        if let Some(earlier) = headers.get(&XFCC).and_then(|v| v.to_str().ok()).filter(|e| !e.is_empty()) {
            value.push_str(earlier);
            value.push(',');
        }
    }
    if let Some(local) = local {
        value.push_str("By=");
        value.push_str(local);
        value.push(';');
    }
    value.push_str("Hash=");
    value.push_str(&peer.leaf_sha256_hex);
    if config.uri {
        value.push_str(";URI=");
        value.push_str(&peer.principal);
    }
    match HeaderValue::try_from(value) {
        Ok(value) => {
            headers.insert(XFCC, value);
        }
        // A SPIFFE ID with a control character was refused at the handshake; never half-forward.
        Err(_) => {
            headers.remove(XFCC);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerIdentity {
        PeerIdentity { principal: "spiffe://cluster.local/ns/default/sa/a".into(), leaf_sha256_hex: "ab12".into() }
    }

    fn with_incoming() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(XFCC, HeaderValue::from_static("By=spiffe://forged;Hash=00"));
        headers
    }

    #[test]
    fn sanitize_set_replaces_what_the_client_sent() {
        let config = ForwardClientCert { mode: Mode::SanitizeSet, uri: true };
        let mut headers = with_incoming();
        forward_client_cert(&config, Some(&peer()), Some("spiffe://cluster.local/ns/default/sa/b"), &mut headers);
        assert_eq!(
            headers[XFCC],
            "By=spiffe://cluster.local/ns/default/sa/b;Hash=ab12;URI=spiffe://cluster.local/ns/default/sa/a"
        );
    }

    #[test]
    fn append_forward_keeps_earlier_hops() {
        let config = ForwardClientCert { mode: Mode::AppendForward, uri: false };
        let mut headers = with_incoming();
        forward_client_cert(&config, Some(&peer()), None, &mut headers);
        assert_eq!(headers[XFCC], "By=spiffe://forged;Hash=00,Hash=ab12");
    }

    #[test]
    fn sanitize_and_plaintext_remove_it_forward_only_keeps_it() {
        let mut headers = with_incoming();
        forward_client_cert(&ForwardClientCert::default(), Some(&peer()), None, &mut headers);
        assert!(headers.get(XFCC).is_none());
        let mut headers = with_incoming();
        forward_client_cert(&ForwardClientCert { mode: Mode::SanitizeSet, uri: true }, None, None, &mut headers);
        assert!(headers.get(XFCC).is_none());
        let mut headers = with_incoming();
        forward_client_cert(&ForwardClientCert { mode: Mode::ForwardOnly, uri: false }, Some(&peer()), None, &mut headers);
        assert_eq!(headers[XFCC], "By=spiffe://forged;Hash=00");
        let mut headers = with_incoming();
        forward_client_cert(&ForwardClientCert { mode: Mode::AlwaysForwardOnly, uri: false }, None, None, &mut headers);
        assert_eq!(headers[XFCC], "By=spiffe://forged;Hash=00");
    }
}
