//! DownstreamTlsContext / UpstreamTlsContext → model::tls: certificates and roots from SDS names
//! (bound to the engine's secret slots) or inline/file data, SAN matchers, ALPN, SNI.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;

use super::secret::{tls_certificate, validation_context, DecodedValidation};
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::secret::{Secret, SecretRegistry, SecretSlot};
use crate::model::tls::{ForwardClientCert, ForwardClientCertMode, PeerValidation, ServerTls, UpstreamTls};
use crate::transport::tls::{client_config, server_config};

/// What a CommonTlsContext says, with secrets bound to slots.
struct CommonTls {
    /// The local certificate's slot and where it comes from.
    certificate: Option<(Arc<SecretSlot>, String)>,
    validation: Option<Arc<PeerValidation>>,
    alpn_protocols: Vec<String>,
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
}

pub(crate) fn downstream_tls_context(context: &tls::DownstreamTlsContext, secrets: &SecretRegistry) -> FieldResult<ServerTls> {
    refuse_if(context.require_sni.as_ref().is_some_and(|b| b.value), "require_sni")?;
    refuse_if(context.ocsp_staple_policy != 0, "ocsp_staple_policy")?;
    refuse_if(context.session_ticket_keys_type.is_some(), "session_ticket_keys_type")?;
    refuse_if(context.prefer_client_ciphers, "prefer_client_ciphers")?;
    let common = context.common_tls_context.as_ref().ok_or_else(|| FieldError::new("common_tls_context", "is required"))?;
    let common = common_tls_context(common, secrets).at("common_tls_context")?;
    let require_client_certificate = context.require_client_certificate.as_ref().is_some_and(|b| b.value);
    if require_client_certificate && common.validation.is_none() {
        return Err(FieldError::new(
            "require_client_certificate",
            "needs a validation context (validation_context, validation_context_sds_secret_config or combined_validation_context) to verify client certificates with",
        ));
    }
    let (certificate, certificate_source) = common.certificate.ok_or_else(|| {
        FieldError::new("common_tls_context", "a server needs a certificate: tls_certificates or tls_certificate_sds_secret_configs")
    })?;
    let client_validation = common.validation.map(|v| (v, require_client_certificate));
    let config = server_config(certificate.clone(), client_validation.clone(), &common.alpn_protocols, &common.versions)
        .map_err(|e| FieldError::new("common_tls_context", e))?;
    Ok(ServerTls {
        alpn_protocols: common.alpn_protocols,
        certificate_source,
        require_client_certificate,
        client_validation: client_validation.map(|(v, _)| v),
        certificate,
        config,
    })
}

/// `fingerprint`: the context's encoded bytes, so an unchanged cluster compares equal.
pub(crate) fn upstream_tls_context(context: &tls::UpstreamTlsContext, fingerprint: Vec<u8>, secrets: &SecretRegistry) -> FieldResult<UpstreamTls> {
    refuse_if(context.auto_host_sni, "auto_host_sni")?;
    refuse_if(context.auto_sni_san_validation, "auto_sni_san_validation")?;
    refuse_if(context.allow_renegotiation, "allow_renegotiation")?;
    refuse_if(context.enforce_rsa_key_usage.as_ref().is_some_and(|b| b.value), "enforce_rsa_key_usage")?;
    let sni = Some(context.sni.clone()).filter(|s| !s.is_empty());
    if let Some(sni) = &sni {
        rustls::pki_types::ServerName::try_from(sni.as_str())
            .map_err(|_| FieldError::new("sni", format!("{sni:?} is not a valid server name")))?;
    }
    let common = match &context.common_tls_context {
        Some(common) => common_tls_context(common, secrets).at("common_tls_context")?,
        None => CommonTls { certificate: None, validation: None, alpn_protocols: Vec::new(), versions: protocol_versions(None)? },
    };
    // Expected SPIFFE IDs replace the DNS-name check; without them the SNI is the name checked.
    let check_server_name = sni.is_some() && common.validation.as_ref().is_none_or(|v| v.expected_uri_sans.is_empty());
    let config = client_config(
        common.certificate.as_ref().map(|(slot, _)| slot.clone()),
        common.validation.clone(),
        check_server_name,
        &common.alpn_protocols,
        &common.versions,
    )
    .map_err(|e| FieldError::new("common_tls_context", e))?;
    Ok(UpstreamTls {
        sni,
        alpn_protocols: common.alpn_protocols,
        certificate_source: common.certificate.map(|(_, source)| source),
        server_validation: common.validation,
        config,
        fingerprint,
    })
}

fn common_tls_context(c: &tls::CommonTlsContext, secrets: &SecretRegistry) -> FieldResult<CommonTls> {
    use tls::common_tls_context::ValidationContextType;
    let versions = protocol_versions(c.tls_params.as_ref()).at("tls_params")?;
    refuse_if(c.tls_certificate_provider_instance.is_some(), "tls_certificate_provider_instance")?;
    refuse_if(c.custom_tls_certificate_selector.is_some(), "custom_tls_certificate_selector")?;
    refuse_if(c.tls_certificate_certificate_provider.is_some(), "tls_certificate_certificate_provider")?;
    refuse_if(c.tls_certificate_certificate_provider_instance.is_some(), "tls_certificate_certificate_provider_instance")?;
    refuse_if(c.custom_handshaker.is_some(), "custom_handshaker")?;
    refuse_if(c.key_log.is_some(), "key_log")?;
    if c.tls_certificates.len() + c.tls_certificate_sds_secret_configs.len() > 1 {
        return Err(FieldError::new(
            "tls_certificates",
            "exactly one certificate is supported (in tls_certificates or tls_certificate_sds_secret_configs)",
        ));
    }
    let certificate = if let Some(inline) = c.tls_certificates.first() {
        let (secret, source) = tls_certificate(inline).at("tls_certificates[0]")?;
        Some((SecretSlot::fixed(format!("inline certificate ({source})"), Secret::Certificate(secret.into())), source))
    } else if let Some(sds) = c.tls_certificate_sds_secret_configs.first() {
        let slot = sds_slot(sds, secrets).at("tls_certificate_sds_secret_configs[0]")?;
        let source = format!("sds:{}", slot.name);
        Some((slot, source))
    } else {
        None
    };
    let validation = match &c.validation_context_type {
        None => None,
        Some(ValidationContextType::ValidationContext(v)) => {
            let DecodedValidation { trust, expected_uri_sans } = validation_context(v).at("validation_context")?;
            match trust {
                Some((roots, source)) => Some(Arc::new(PeerValidation {
                    roots: SecretSlot::fixed(format!("inline roots ({source})"), Secret::Validation(roots.into())),
                    trust_source: source,
                    expected_uri_sans,
                })),
                None if expected_uri_sans.is_empty() => None,
                None => {
                    return Err(FieldError::new(
                        "validation_context.trusted_ca",
                        "is required with match_typed_subject_alt_names (SAN checks without a trusted CA would prove nothing)",
                    ))
                }
            }
        }
        Some(ValidationContextType::ValidationContextSdsSecretConfig(sds)) => {
            let roots = sds_slot(sds, secrets).at("validation_context_sds_secret_config")?;
            Some(Arc::new(PeerValidation { trust_source: format!("sds:{}", roots.name), expected_uri_sans: Vec::new(), roots }))
        }
        Some(ValidationContextType::CombinedValidationContext(combined)) => {
            Some(Arc::new(combined_validation(combined, secrets).at("combined_validation_context")?))
        }
        Some(ValidationContextType::ValidationContextCertificateProvider(_)) => {
            return Err(FieldError::unsupported("validation_context_certificate_provider"))
        }
        Some(ValidationContextType::ValidationContextCertificateProviderInstance(_)) => {
            return Err(FieldError::unsupported("validation_context_certificate_provider_instance"))
        }
    };
    Ok(CommonTls { certificate, validation, alpn_protocols: c.alpn_protocols.clone(), versions })
}

/// TLS versions from tls_params (rustls speaks 1.2 and 1.3; a lower minimum changes nothing).
/// Cipher suites, curves and signature algorithms are rustls' safe defaults; choosing them is refused.
fn protocol_versions(params: Option<&tls::TlsParameters>) -> FieldResult<Vec<&'static rustls::SupportedProtocolVersion>> {
    use tls::tls_parameters::TlsProtocol;
    let Some(params) = params else { return Ok(rustls::DEFAULT_VERSIONS.to_vec()) };
    refuse_if(!params.cipher_suites.is_empty(), "cipher_suites")?;
    refuse_if(!params.ecdh_curves.is_empty(), "ecdh_curves")?;
    refuse_if(!params.signature_algorithms.is_empty(), "signature_algorithms")?;
    refuse_if(!params.compliance_policies.is_empty(), "compliance_policies")?;
    let rank = |field: &str, value: i32, auto: u8| match TlsProtocol::try_from(value) {
        Ok(TlsProtocol::TlsAuto) => Ok(auto),
        Ok(TlsProtocol::TlSv10) => Ok(10),
        Ok(TlsProtocol::TlSv11) => Ok(11),
        Ok(TlsProtocol::TlSv12) => Ok(12),
        Ok(TlsProtocol::TlSv13) => Ok(13),
        Err(_) => Err(FieldError::new(field, format!("unknown value {value}"))),
    };
    let minimum = rank("tls_minimum_protocol_version", params.tls_minimum_protocol_version, 12)?;
    let maximum = rank("tls_maximum_protocol_version", params.tls_maximum_protocol_version, 13)?;
    let versions: Vec<_> = [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(rank, _)| (minimum..=maximum).contains(rank))
        .map(|(_, version)| version)
        .collect();
    if versions.is_empty() {
        return Err(FieldError::new("tls_maximum_protocol_version", "meshctl speaks TLS 1.2 and 1.3 only; this range has neither"));
    }
    Ok(versions)
}

fn combined_validation(
    combined: &tls::common_tls_context::CombinedCertificateValidationContext,
    secrets: &SecretRegistry,
) -> FieldResult<PeerValidation> {
    refuse_if(combined.validation_context_certificate_provider.is_some(), "validation_context_certificate_provider")?;
    refuse_if(
        combined.validation_context_certificate_provider_instance.is_some(),
        "validation_context_certificate_provider_instance",
    )?;
    let expected_uri_sans = match &combined.default_validation_context {
        Some(v) => {
            let DecodedValidation { trust, expected_uri_sans } = validation_context(v).at("default_validation_context")?;
            if trust.is_some() {
                // Envoy would merge the two; meshctl keeps one source of roots so a rotation of
                // the secret cannot be shadowed by stale inline roots.
                return Err(FieldError::new(
                    "default_validation_context.trusted_ca",
                    "roots come from validation_context_sds_secret_config here; set trusted_ca in that secret",
                ));
            }
            expected_uri_sans
        }
        None => Vec::new(),
    };
    let sds = combined
        .validation_context_sds_secret_config
        .as_ref()
        .ok_or_else(|| FieldError::new("validation_context_sds_secret_config", "is required"))?;
    let roots = sds_slot(sds, secrets).at("validation_context_sds_secret_config")?;
    Ok(PeerValidation { trust_source: format!("sds:{}", roots.name), expected_uri_sans, roots })
}

/// The slot a secret reference reads. Secrets arrive over ADS (or Engine.apply) or from the
/// bootstrap's static secrets (no sds_config); any other source is refused.
fn sds_slot(config: &tls::SdsSecretConfig, secrets: &SecretRegistry) -> FieldResult<Arc<SecretSlot>> {
    use core::config_source::ConfigSourceSpecifier;
    if config.name.is_empty() {
        return Err(FieldError::new("name", "is required"));
    }
    if let Some(source) = &config.sds_config {
        refuse_if(!source.authorities.is_empty(), "sds_config.authorities")?;
        if source.resource_api_version == core::ApiVersion::V2 as i32 {
            return Err(FieldError::new("sds_config.resource_api_version", "V2 is not supported; use V3"));
        }
        match &source.config_source_specifier {
            Some(ConfigSourceSpecifier::Ads(_)) => {}
            _ => {
                return Err(FieldError::new(
                    "sds_config",
                    "only {ads: {}} is supported: secrets arrive on the ADS stream (or through Engine.apply)",
                ))
            }
        }
    }
    Ok(secrets.slot(&config.name))
}

/// The HCM's forward_client_cert_details and set_current_client_cert_details.
pub(crate) fn forward_client_cert(
    m: &envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager,
) -> FieldResult<ForwardClientCert> {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::ForwardClientCertDetails as Details;
    let mode = match Details::try_from(m.forward_client_cert_details) {
        Ok(Details::Sanitize) => ForwardClientCertMode::Sanitize,
        Ok(Details::ForwardOnly) => ForwardClientCertMode::ForwardOnly,
        Ok(Details::AppendForward) => ForwardClientCertMode::AppendForward,
        Ok(Details::SanitizeSet) => ForwardClientCertMode::SanitizeSet,
        Ok(Details::AlwaysForwardOnly) => ForwardClientCertMode::AlwaysForwardOnly,
        Err(_) => {
            return Err(FieldError::new("forward_client_cert_details", format!("unknown value {}", m.forward_client_cert_details)))
        }
    };
    let mut uri = false;
    if let Some(details) = &m.set_current_client_cert_details {
        let at = |f: &str| format!("set_current_client_cert_details.{f}");
        refuse_if(details.subject.as_ref().is_some_and(|b| b.value), &at("subject"))?;
        refuse_if(details.cert, &at("cert"))?;
        refuse_if(details.chain, &at("chain"))?;
        refuse_if(details.dns, &at("dns"))?;
        uri = details.uri;
    }
    Ok(ForwardClientCert { mode, uri })
}
