//! Named secrets (Envoy's SDS Secret): a certificate chain with its private key, or trust roots with
//! their CRLs. Each name is a slot that TLS contexts read at handshake time, so re-applying a
//! secret takes effect on the next handshake without rebuilding a listener or cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, TrustAnchor};
use serde::Serialize;
use webpki::CertRevocationList;

/// What /config_dump shows of a certificate: never its bytes, let alone its key.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateSummary {
    /// Lower-case hex, no separators.
    pub serial: String,
    pub subject: String,
    pub not_before: String,
    pub not_after: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spiffe_ids: Vec<String>,
}

/// What /config_dump shows of a CRL.
#[derive(Debug, Clone, Serialize)]
pub struct CrlSummary {
    pub issuer: String,
    pub this_update: String,
    /// Serials (lower-case hex) of the certificates it revokes.
    pub revoked_serials: Vec<String>,
}

/// A workload certificate chain and the key that goes with it (Istio's `default`).
pub struct CertificateSecret {
    pub certified_key: Arc<CertifiedKey>,
    /// The leaf's URI SAN, when it has exactly one (the workload's SPIFFE ID): XFCC's `By=`.
    pub spiffe_id: Option<String>,
    pub chain: Vec<CertificateSummary>,
}

/// Trust roots and revocations (Istio's `ROOTCA`); several roots while a root is rotated.
pub struct ValidationSecret {
    pub trust_anchors: Vec<TrustAnchor<'static>>,
    pub crls: Vec<CertRevocationList<'static>>,
    pub roots: Vec<CertificateSummary>,
    pub crl_summaries: Vec<CrlSummary>,
}

pub enum Secret {
    Certificate(Arc<CertificateSecret>),
    Validation(Arc<ValidationSecret>),
}

/// A secret decoded from xDS, ready to be stored under its name.
pub struct NamedSecret {
    pub name: String,
    pub secret: Secret,
}

impl std::fmt::Debug for NamedSecret {
    /// The name and kind only: a secret's contents never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.secret {
            Secret::Certificate(_) => "tls_certificate",
            Secret::Validation(_) => "validation_context",
        };
        f.debug_struct("NamedSecret").field("name", &self.name).field("kind", &kind).finish()
    }
}

pub fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| format!("not PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err("contains no PEM certificate".into());
    }
    Ok(chain)
}

fn rfc3339(time: x509_parser::time::ASN1Time) -> String {
    time.to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time.timestamp().to_string())
}

pub fn summarize_certificate(der: &[u8]) -> Result<CertificateSummary, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let spiffe_ids = super::tls::uri_sans(&cert);
    Ok(CertificateSummary {
        serial: hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        not_before: rfc3339(cert.validity().not_before),
        not_after: rfc3339(cert.validity().not_after),
        spiffe_ids,
    })
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

impl CertificateSecret {
    /// Chain (leaf first) and key, both PEM. Errors never quote the key or its parse details.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertificateSecret, (&'static str, String)> {
        let chain = pem_certificates(chain_pem).map_err(|e| ("certificate_chain", e))?;
        let summaries = chain
            .iter()
            .map(|c| summarize_certificate(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ("certificate_chain", e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| ("private_key", "is not a PEM private key".to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified_key = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| ("private_key", format!("does not match the certificate or is unusable: {e}")))?;
        let spiffe_id = match summaries[0].spiffe_ids.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        };
        Ok(CertificateSecret { certified_key: Arc::new(certified_key), spiffe_id, chain: summaries })
    }
}

impl ValidationSecret {
    /// Roots (one or more PEM certificates) and optional CRLs (zero or more PEM CRLs).
    pub fn from_pem(trusted_ca_pem: &[u8], crl_pem: Option<&[u8]>) -> Result<ValidationSecret, (&'static str, String)> {
        let roots = pem_certificates(trusted_ca_pem).map_err(|e| ("trusted_ca", e))?;
        let mut trust_anchors = Vec::with_capacity(roots.len());
        let mut summaries = Vec::with_capacity(roots.len());
        for (i, root) in roots.iter().enumerate() {
            let anchor = webpki::anchor_from_trusted_cert(root)
                .map_err(|e| ("trusted_ca", format!("certificate {i} cannot be a trust anchor: {e}")))?;
            trust_anchors.push(anchor.to_owned());
            summaries.push(summarize_certificate(root).map_err(|e| ("trusted_ca", format!("certificate {i}: {e}")))?);
        }
        let mut crls = Vec::new();
        let mut crl_summaries = Vec::new();
        if let Some(pem) = crl_pem {
            let ders: Vec<CertificateRevocationListDer<'static>> = CertificateRevocationListDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| ("crl", format!("not PEM CRLs: {e}")))?;
            if ders.is_empty() {
                return Err(("crl", "contains no PEM CRL (\"-----BEGIN X509 CRL-----\")".into()));
            }
            for (i, der) in ders.iter().enumerate() {
                let owned = webpki::OwnedCertRevocationList::from_der(der)
                    .map_err(|e| ("crl", format!("CRL {i} is not usable: {e}")))?;
                crls.push(CertRevocationList::from(owned));
                crl_summaries.push(summarize_crl(der).map_err(|e| ("crl", format!("CRL {i}: {e}")))?);
            }
        }
        Ok(ValidationSecret { trust_anchors, crls, roots: summaries, crl_summaries })
    }
}

impl ValidationSecret {
    /// Whether `other` trusts exactly what this does: the same roots and the same revoked serials
    /// per issuer. A CRL re-issued with a new date but the same revocations (as a restarted
    /// control plane sends) changes nothing a connection was verified against.
    pub fn trusts_the_same_as(&self, other: &ValidationSecret) -> bool {
        let anchor = |a: &TrustAnchor<'_>| (a.subject.to_vec(), a.subject_public_key_info.to_vec(), a.name_constraints.as_ref().map(|n| n.to_vec()));
        let anchors = |v: &ValidationSecret| v.trust_anchors.iter().map(anchor).collect::<std::collections::BTreeSet<_>>();
        let revoked = |v: &ValidationSecret| {
            v.crl_summaries
                .iter()
                .flat_map(|crl| crl.revoked_serials.iter().map(move |serial| (crl.issuer.clone(), serial.clone())))
                .collect::<std::collections::BTreeSet<_>>()
        };
        // The issuers too: a new CRL from an issuer that had none is a change even with no serials.
        let issuers = |v: &ValidationSecret| v.crl_summaries.iter().map(|crl| crl.issuer.clone()).collect::<std::collections::BTreeSet<_>>();
        anchors(self) == anchors(other) && revoked(self) == revoked(other) && issuers(self) == issuers(other)
    }
}

fn summarize_crl(der: &[u8]) -> Result<CrlSummary, String> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| format!("not an X.509 CRL: {e}"))?;
    Ok(CrlSummary {
        issuer: crl.issuer().to_string(),
        this_update: rfc3339(crl.last_update()),
        revoked_serials: crl.iter_revoked_certificates().map(|r| hex(r.raw_serial())).collect(),
    })
}

/// One secret name: empty until the secret arrives (handshakes that need it fail meanwhile, as
/// Envoy's do while warming), then swapped whole on every update.
pub struct SecretSlot {
    pub name: String,
    current: ArcSwapOption<Secret>,
}

impl std::fmt::Debug for SecretSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSlot").field("name", &self.name).finish()
    }
}

impl SecretSlot {
    /// A slot outside the registry, for certificates and roots given inline or by file.
    pub fn fixed(name: impl Into<String>, secret: Secret) -> Arc<SecretSlot> {
        Arc::new(SecretSlot { name: name.into(), current: ArcSwapOption::from_pointee(secret) })
    }

    pub fn certificate(&self) -> Option<Arc<CertificateSecret>> {
        match self.current.load().as_deref() {
            Some(Secret::Certificate(c)) => Some(c.clone()),
            _ => None,
        }
    }

    pub fn validation(&self) -> Option<Arc<ValidationSecret>> {
        match self.current.load().as_deref() {
            Some(Secret::Validation(v)) => Some(v.clone()),
            _ => None,
        }
    }

    fn dump(&self) -> serde_json::Value {
        use serde_json::json;
        match self.current.load().as_deref() {
            None => json!({"name": self.name, "state": "warming (not received yet)"}),
            Some(Secret::Certificate(c)) => json!({
                "name": self.name,
                "type": "tls_certificate",
                "spiffe_id": c.spiffe_id,
                "chain": c.chain,
            }),
            Some(Secret::Validation(v)) => json!({
                "name": self.name,
                "type": "validation_context",
                "trusted_ca": v.roots,
                "crls": v.crl_summaries,
            }),
        }
    }
}

/// Every secret name referenced or applied, each a slot that lives as long as the engine.
#[derive(Debug, Default)]
pub struct SecretRegistry {
    slots: Mutex<BTreeMap<String, Arc<SecretSlot>>>,
}

impl SecretRegistry {
    /// The slot for `name`, created empty if nothing has referenced or applied it yet.
    pub fn slot(&self, name: &str) -> Arc<SecretSlot> {
        self.slots
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(SecretSlot { name: name.to_string(), current: ArcSwapOption::empty() }))
            .clone()
    }

    /// Swap in new secrets; the next handshake that reads each name sees the new one.
    pub fn store(&self, secrets: Vec<NamedSecret>) {
        for NamedSecret { name, secret } in secrets {
            self.slot(&name).current.store(Some(Arc::new(secret)));
        }
    }

    /// Forget secrets: handshakes that need them fail until they are applied again.
    pub fn remove(&self, names: &[String]) {
        let slots = self.slots.lock().unwrap();
        for name in names {
            if let Some(slot) = slots.get(name) {
                slot.current.store(None);
            }
        }
    }

    /// Names, serials, validity and SPIFFE IDs of every secret; no certificate or key bytes.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        self.slots.lock().unwrap().values().map(|slot| slot.dump()).collect()
    }
}
