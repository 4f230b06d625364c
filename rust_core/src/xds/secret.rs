//! Secret (SDS) → model::secret: a certificate chain with its key, or trust roots with CRLs; and
//! the inline/file forms of both that TLS contexts may carry instead of a secret name.

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use prost::Message;

use super::common::{data_source, string_matcher};
use super::{refuse_if, At, ConfigError, FieldError, FieldResult};
use crate::model::matcher::StringMatcher;
use crate::model::secret::{CertificateSecret, NamedSecret, Secret, ValidationSecret};

pub fn decode_secret(bytes: &[u8]) -> Result<NamedSecret, ConfigError> {
    let message = tls::Secret::decode(bytes).map_err(|e| ConfigError::new("Secret", "", format!("not a valid protobuf: {e}")))?;
    secret(&message).map_err(|e| e.into_config_error(format!("Secret {:?}", message.name)))
}

pub(crate) fn secret(s: &tls::Secret) -> FieldResult<NamedSecret> {
    use tls::secret::Type;
    if s.name.is_empty() {
        return Err(FieldError::new("name", "is required"));
    }
    let secret = match &s.r#type {
        Some(Type::TlsCertificate(c)) => Secret::Certificate(tls_certificate(c).at("tls_certificate")?.0.into()),
        Some(Type::ValidationContext(v)) => {
            let DecodedValidation { trust, expected_uri_sans } = validation_context(v).at("validation_context")?;
            if !expected_uri_sans.is_empty() {
                return Err(FieldError::new(
                    "validation_context.match_typed_subject_alt_names",
                    "SAN matchers belong in the TLS context (combined_validation_context.default_validation_context), not in the secret",
                ));
            }
            let (roots, _) = trust.ok_or_else(|| FieldError::new("validation_context.trusted_ca", "is required"))?;
            Secret::Validation(roots.into())
        }
        Some(Type::SessionTicketKeys(_)) => return Err(FieldError::unsupported("session_ticket_keys")),
        Some(Type::GenericSecret(_)) => return Err(FieldError::unsupported("generic_secret")),
        None => return Err(FieldError::new("", "a secret needs tls_certificate or validation_context")),
    };
    Ok(NamedSecret { name: s.name.clone(), secret })
}

/// A certificate chain and key (inline, file or environment), with where the chain came from.
pub(crate) fn tls_certificate(c: &tls::TlsCertificate) -> FieldResult<(CertificateSecret, String)> {
    refuse_if(c.pkcs12.is_some(), "pkcs12")?;
    refuse_if(c.watched_directory.is_some(), "watched_directory")?;
    refuse_if(c.private_key_provider.is_some(), "private_key_provider")?;
    refuse_if(c.password.is_some(), "password")?;
    refuse_if(c.ocsp_staple.is_some(), "ocsp_staple")?;
    refuse_if(!c.signed_certificate_timestamp.is_empty(), "signed_certificate_timestamp")?;
    refuse_if(c.tls_params.is_some(), "tls_params")?;
    let chain = c.certificate_chain.as_ref().ok_or_else(|| FieldError::new("certificate_chain", "is required"))?;
    let (chain_pem, source) = data_source(chain).at("certificate_chain")?;
    let key = c.private_key.as_ref().ok_or_else(|| FieldError::new("private_key", "is required"))?;
    let (key_pem, _) = data_source(key).at("private_key")?;
    let secret = CertificateSecret::from_pem(&chain_pem, &key_pem).map_err(|(field, reason)| FieldError::new(field, reason))?;
    Ok((secret, source))
}

/// A CertificateValidationContext: roots and CRLs, and the peer SAN matchers.
pub(crate) struct DecodedValidation {
    /// When trusted_ca is set: the roots with their CRLs, and where they came from.
    pub trust: Option<(ValidationSecret, String)>,
    pub expected_uri_sans: Vec<StringMatcher>,
}

pub(crate) fn validation_context(v: &tls::CertificateValidationContext) -> FieldResult<DecodedValidation> {
    refuse_if(v.ca_certificate_provider_instance.is_some(), "ca_certificate_provider_instance")?;
    refuse_if(v.system_root_certs.is_some(), "system_root_certs")?;
    refuse_if(v.watched_directory.is_some(), "watched_directory")?;
    refuse_if(!v.verify_certificate_spki.is_empty(), "verify_certificate_spki")?;
    refuse_if(!v.verify_certificate_hash.is_empty(), "verify_certificate_hash")?;
    refuse_if(!v.match_subject_alt_names.is_empty(), "match_subject_alt_names")?;
    refuse_if(v.require_signed_certificate_timestamp.as_ref().is_some_and(|b| b.value), "require_signed_certificate_timestamp")?;
    refuse_if(v.allow_expired_certificate, "allow_expired_certificate")?;
    refuse_if(v.trust_chain_verification != 0, "trust_chain_verification")?;
    refuse_if(v.custom_validator_config.is_some(), "custom_validator_config")?;
    refuse_if(v.only_verify_leaf_cert_crl, "only_verify_leaf_cert_crl")?;
    refuse_if(v.max_verify_depth.is_some(), "max_verify_depth")?;
    let mut matchers = Vec::with_capacity(v.match_typed_subject_alt_names.len());
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        matchers.push(san_matcher(m).at(format!("match_typed_subject_alt_names[{i}]"))?);
    }
    let trust = match &v.trusted_ca {
        Some(ca) => {
            let (ca_pem, source) = data_source(ca).at("trusted_ca")?;
            let crl_pem = match &v.crl {
                Some(crl) => Some(data_source(crl).at("crl")?.0),
                None => None,
            };
            let roots = ValidationSecret::from_pem(&ca_pem, crl_pem.as_deref()).map_err(|(field, reason)| FieldError::new(field, reason))?;
            Some((roots, source))
        }
        None if v.crl.is_some() => return Err(FieldError::new("crl", "needs trusted_ca in the same validation context")),
        None => None,
    };
    Ok(DecodedValidation { trust, expected_uri_sans: matchers })
}

fn san_matcher(m: &tls::SubjectAltNameMatcher) -> FieldResult<StringMatcher> {
    const URI: i32 = tls::subject_alt_name_matcher::SanType::Uri as i32;
    if m.san_type != URI {
        let name = tls::subject_alt_name_matcher::SanType::try_from(m.san_type)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_else(|_| m.san_type.to_string());
        return Err(FieldError::new(
            "san_type",
            format!("{name} is not supported: meshctl identities are SPIFFE IDs, matched as san_type URI"),
        ));
    }
    let matcher = m.matcher.as_ref().ok_or_else(|| FieldError::new("matcher", "is required"))?;
    string_matcher(matcher).at("matcher")
}
