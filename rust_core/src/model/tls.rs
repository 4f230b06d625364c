//! TLS identity in the model: the verified peer of a connection, SPIFFE SAN rules, and the
//! server (downstream) and client (upstream) TLS contexts listeners and clusters carry.

use std::sync::Arc;

use serde::Serialize;

use super::matcher::StringMatcher;
use super::secret::SecretSlot;

/// The authenticated peer of one downstream connection: set once its client certificate passed
/// chain, revocation and SPIFFE checks. Policy (RBAC), XFCC and telemetry read it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerIdentity {
    /// The peer's SPIFFE ID, e.g. `spiffe://cluster.local/ns/default/sa/reviews`.
    pub principal: String,
    /// Lower-case hex SHA-256 of the peer's leaf certificate (DER), as XFCC's `Hash=`.
    pub leaf_sha256_hex: String,
}

/// Why a peer certificate's identity was refused (after its chain was found valid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the certificate has {0} URI SANs; a SPIFFE certificate has exactly one")]
    UriSanCount(usize),
    #[error("the URI SAN is not a SPIFFE ID (spiffe://trust-domain/path; lower-case trust domain, no dot segments)")]
    NotSpiffe,
    #[error("the URI SAN contains a NUL or control character")]
    ControlCharacter,
    #[error("the SPIFFE ID {0:?} matches none of the expected identities")]
    NotExpected(String),
}

/// Every URI SAN of a parsed certificate, in order.
pub fn uri_sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The SPIFFE ID of a leaf certificate (DER): exactly one URI SAN, `spiffe://`, no NUL or control
/// characters, and (when `expected` is not empty) matching one of the expected patterns.
pub fn spiffe_id(leaf_der: &[u8], expected: &[StringMatcher]) -> Result<String, SanError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der).map_err(|e| SanError::Unparsable(e.to_string()))?;
    // Two SAN extensions are malformed, not "no URI": refuse rather than read only one.
    if let Err(e) = cert.subject_alternative_name() {
        return Err(SanError::Unparsable(e.to_string()));
    }
    let uris = uri_sans(&cert);
    let [uri] = uris.as_slice() else { return Err(SanError::UriSanCount(uris.len())) };
    if uri.chars().any(|c| c.is_control()) {
        return Err(SanError::ControlCharacter);
    }
    if !is_spiffe_id(uri) {
        return Err(SanError::NotSpiffe);
    }
    if !expected.is_empty() && !expected.iter().any(|m| m.matches(uri)) {
        return Err(SanError::NotExpected(uri.clone()));
    }
    Ok(uri.clone())
}

/// The SPIFFE ID grammar: `spiffe://` + a trust domain of [a-z0-9._-] + a path of non-empty
/// segments of [A-Za-z0-9._-] that are not `.` or `..` (no percent-encoding, query or fragment),
/// so a prefix matcher cannot be walked out of with dot segments.
fn is_spiffe_id(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("spiffe://") else { return false };
    if uri.len() > 2048 {
        return false;
    }
    let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !trust_domain.is_empty()
        && trust_domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    let segments_ok = path.is_empty()
        || path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    // `spiffe://td/` (a trailing slash) leaves an empty last segment and is refused above.
    domain_ok && segments_ok && !(path.is_empty() && rest.ends_with('/'))
}

/// Hex SHA-256 of a certificate's DER (XFCC's `Hash=`).
pub fn certificate_sha256_hex(der: &[u8]) -> String {
    super::secret::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// How a peer's certificate is validated: roots and CRLs from a secret, then SAN rules.
#[derive(Debug, Serialize)]
pub struct PeerValidation {
    /// `sds:NAME`, a file name, or `inline`.
    pub trust_source: String,
    /// `match_typed_subject_alt_names` (URI): the peer's SPIFFE ID must match one.
    pub expected_uri_sans: Vec<StringMatcher>,
    #[serde(skip)]
    pub roots: Arc<SecretSlot>,
}

/// A downstream TLS context: the certificate and roots are read from their slots per handshake.
#[derive(Serialize)]
pub struct ServerTls {
    pub alpn_protocols: Vec<String>,
    /// `sds:NAME`, the certificate's file name, or `inline`; never the key.
    pub certificate_source: String,
    pub require_client_certificate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_validation: Option<Arc<PeerValidation>>,
    /// The server's own certificate: its SPIFFE ID is XFCC's `By=`.
    #[serde(skip)]
    pub certificate: Arc<SecretSlot>,
    #[serde(skip)]
    pub config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("alpn_protocols", &self.alpn_protocols)
            .field("certificate_source", &self.certificate_source)
            .field("require_client_certificate", &self.require_client_certificate)
            .finish()
    }
}

/// An upstream TLS context (a cluster's transport socket).
#[derive(Serialize)]
pub struct UpstreamTls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    pub alpn_protocols: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_validation: Option<Arc<PeerValidation>>,
    #[serde(skip)]
    pub config: Arc<rustls::ClientConfig>,
    /// The encoded UpstreamTlsContext: equal bytes, equal context (a re-applied cluster keeps
    /// its pooled connections).
    #[serde(skip)]
    pub fingerprint: Vec<u8>,
}

impl UpstreamTls {
    /// Mesh mTLS (Istio's ISTIO_MUTUAL): this side presents a certificate and requires the
    /// peer's SPIFFE ID. Plain TLS origination to a service outside the mesh is not.
    pub fn is_mesh_mtls(&self) -> bool {
        self.certificate_source.is_some() && self.server_validation.as_ref().is_some_and(|v| !v.expected_uri_sans.is_empty())
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("sni", &self.sni).field("alpn_protocols", &self.alpn_protocols).finish()
    }
}

/// What the HTTP connection manager does with `x-forwarded-client-cert` (Envoy's
/// forward_client_cert_details); SANITIZE (remove it) unless configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ForwardClientCertMode {
    #[default]
    Sanitize,
    ForwardOnly,
    AppendForward,
    SanitizeSet,
    AlwaysForwardOnly,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ForwardClientCert {
    pub mode: ForwardClientCertMode,
    /// set_current_client_cert_details.uri: add `URI=<peer SPIFFE ID>`.
    pub uri: bool,
}
