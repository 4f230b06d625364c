//! rustls for the mesh: certificates and roots read from secret slots at handshake time, chain and
//! CRL checks with webpki, SPIFFE SAN rules, the verified peer's identity, and upstream TLS streams.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::model::secret::{SecretSlot, ValidationSecret};
use crate::model::tls::{certificate_sha256_hex, spiffe_id, PeerIdentity, PeerValidation, SanError, UpstreamTls};

/// A secret a handshake needs has not been applied yet (or was removed).
#[derive(Debug, thiserror::Error)]
#[error("secret {0:?} has not been received")]
pub struct SecretNotReady(pub String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn other(error: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// webpki's verdict in rustls' terms, so handshake failures can be classified and alerted.
fn certificate_error(error: webpki::Error) -> rustls::Error {
    #[allow(deprecated)]
    let mapped = match error {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::CertRevoked => CertificateError::Revoked,
        webpki::Error::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        webpki::Error::RequiredEkuNotFound
        | webpki::Error::RequiredEkuNotFoundContext(_)
        | webpki::Error::CaUsedAsEndEntity
        | webpki::Error::EndEntityUsedAsCa => CertificateError::InvalidPurpose,
        webpki::Error::CertNotValidForName(_) => CertificateError::NotValidForName,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other_error => return other(other_error),
    };
    rustls::Error::InvalidCertificate(mapped)
}

/// Chain to one of the roots, with the usage (clientAuth / serverAuth EKU) and the CRLs.
fn verify_chain(
    roots: &ValidationSecret,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<(), rustls::Error> {
    use webpki::{ExpirationPolicy, RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy};
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(certificate_error)?;
    let crls: Vec<&webpki::CertRevocationList<'_>> = roots.crls.iter().collect();
    // A certificate whose issuer published no CRL is accepted: during a root rotation only one
    // root may have one. A stale CRL still revokes what it lists.
    let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|builder| {
        builder
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Ignore)
            .build()
    });
    cert.verify_for_usage(algorithms.all, &roots.trust_anchors, intermediates, now, usage, revocation, None)
        .map(|_| ())
        .map_err(certificate_error)
}

/// Verifies client certificates against the current roots and CRLs, then the SPIFFE rules.
#[derive(Debug)]
struct MeshClientVerifier {
    validation: Arc<PeerValidation>,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self.validation.roots.validation().ok_or_else(|| other(SecretNotReady(self.validation.roots.name.clone())))?;
        verify_chain(&roots, end_entity, intermediates, now, webpki::KeyUsage::client_auth(), &self.algorithms)?;
        spiffe_id(end_entity, &self.validation.expected_uri_sans).map_err(other)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies an upstream's certificate: roots and CRLs, then the expected SPIFFE IDs when given,
/// else the SNI as a DNS name. Without a validation context nothing is verified (as Envoy).
#[derive(Debug)]
struct MeshServerVerifier {
    validation: Option<Arc<PeerValidation>>,
    check_server_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(validation) = &self.validation else { return Ok(ServerCertVerified::assertion()) };
        let roots = validation.roots.validation().ok_or_else(|| other(SecretNotReady(validation.roots.name.clone())))?;
        verify_chain(&roots, end_entity, intermediates, now, webpki::KeyUsage::server_auth(), &self.algorithms)?;
        if !validation.expected_uri_sans.is_empty() {
            spiffe_id(end_entity, &validation.expected_uri_sans).map_err(other)?;
        } else if self.check_server_name {
            let cert = webpki::EndEntityCert::try_from(end_entity).map_err(certificate_error)?;
            cert.verify_is_valid_for_subject_name(server_name).map_err(certificate_error)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Presents whatever certificate the slot holds at handshake time (server and client side).
#[derive(Debug)]
struct SlotCertificate(Arc<SecretSlot>);

impl rustls::server::ResolvesServerCert for SlotCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certificate().map(|c| c.certified_key.clone())
    }
}

impl rustls::client::ResolvesClientCert for SlotCertificate {
    fn resolve(&self, _root_hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certificate().map(|c| c.certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A downstream TLS config whose certificate (and client roots) are read per handshake.
pub fn server_config(
    certificate: Arc<SecretSlot>,
    client_validation: Option<(Arc<PeerValidation>, bool)>,
    alpn_protocols: &[String],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let verifies_clients = client_validation.is_some();
    let builder = match client_validation {
        Some((validation, mandatory)) => {
            builder.with_client_cert_verifier(Arc::new(MeshClientVerifier { validation, mandatory, algorithms }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SlotCertificate(certificate)));
    config.alpn_protocols = alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
    if verifies_clients {
        // No resumption: every connection's client certificate is checked against the roots and
        // CRLs of that moment, so a revocation also stops a client that would have resumed.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// An upstream TLS config: client certificate from its slot, server checked by MeshServerVerifier.
pub fn client_config(
    certificate: Option<Arc<SecretSlot>>,
    server_validation: Option<Arc<PeerValidation>>,
    check_server_name: bool,
    alpn_protocols: &[String],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier { validation: server_validation, check_server_name, algorithms }));
    let mut config = match certificate {
        Some(slot) => builder.with_client_cert_resolver(Arc::new(SlotCertificate(slot))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Full handshakes only: the server is re-verified against current roots on every connection.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The verified client of a finished server handshake; None when it sent no certificate.
pub fn peer_identity(connection: &rustls::ServerConnection) -> Option<PeerIdentity> {
    let leaf = connection.peer_certificates()?.first()?;
    // The verifier accepted this SAN already; read it again rather than carry state across.
    let principal = spiffe_id(leaf, &[]).ok()?;
    Some(PeerIdentity { principal, leaf_sha256_hex: certificate_sha256_hex(leaf) })
}

/// A short reason for a failed handshake, for the handshake error counter.
pub fn failure_reason(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return "other";
    };
    tls_failure_reason(tls)
}

pub fn tls_failure_reason(error: &rustls::Error) -> &'static str {
    use rustls::AlertDescription as Alert;
    match error {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not_yet_valid",
            CertificateError::Revoked => "revoked",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => "bad_usage",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => "bad_san",
            CertificateError::Other(OtherError(inner)) if inner.downcast_ref::<SanError>().is_some() => "bad_san",
            CertificateError::Other(OtherError(inner)) if inner.downcast_ref::<SecretNotReady>().is_some() => "secret_not_ready",
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::AlertReceived(Alert::UnknownCA) => "peer_refused_unknown_ca",
        rustls::Error::AlertReceived(Alert::CertificateExpired) => "peer_refused_expired",
        rustls::Error::AlertReceived(Alert::CertificateRevoked) => "peer_refused_revoked",
        rustls::Error::AlertReceived(Alert::CertificateRequired) => "no_client_cert",
        rustls::Error::AlertReceived(_) => "peer_alert",
        rustls::Error::NoApplicationProtocol => "alpn",
        _ => "other",
    }
}

/// The name the upstream handshake is for: the SNI, else the endpoint's address (no SNI sent).
pub fn upstream_server_name(tls: &UpstreamTls, address: SocketAddr) -> ServerName<'static> {
    tls.sni
        .as_ref()
        .and_then(|sni| ServerName::try_from(sni.clone()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(address.ip().into()))
}

/// A connection to an upstream: plain TCP, or TLS over it.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Wrap a connected socket in TLS when the cluster asks for it, counting the handshake.
pub async fn upstream_handshake(
    stream: TcpStream,
    tls: Option<&UpstreamTls>,
    address: SocketAddr,
    stats: &crate::telemetry::metrics::TlsStats,
) -> io::Result<UpstreamStream> {
    let Some(tls) = tls else { return Ok(UpstreamStream::Plain(stream)) };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match connector.connect(upstream_server_name(tls, address), stream).await {
        Ok(stream) => {
            stats.handshake(crate::telemetry::metrics::TlsDirection::Upstream);
            Ok(UpstreamStream::Tls(Box::new(stream)))
        }
        Err(error) => {
            stats.handshake_error(crate::telemetry::metrics::TlsDirection::Upstream, failure_reason(&error));
            Err(error)
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
