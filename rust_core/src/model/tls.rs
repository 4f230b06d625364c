//! TLS identity in the model: the verified peer of a connection, SPIFFE SAN rules, and the
//! server (downstream) and client (upstream) TLS contexts listeners and clusters carry.

/// The authenticated peer of one downstream connection: set once its client certificate passed
/// chain, revocation and SPIFFE checks. Policy (RBAC), XFCC and telemetry read it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerIdentity {
    /// The peer's SPIFFE ID, e.g. `spiffe://cluster.local/ns/default/sa/reviews`.
    pub principal: String,
    /// Lower-case hex SHA-256 of the peer's leaf certificate (DER), as XFCC's `Hash=`.
    pub leaf_sha256_hex: String,
}
