//! The TLS identity layer: SPIFFE SAN rules on real certificates, and the decoder's refusals of
//! secrets and TLS contexts (each naming the resource, the field and the reason).

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use meshctl_engine::model::matcher::{StringMatch, StringMatcher};
use meshctl_engine::model::secret::{Secret, SecretRegistry};
use meshctl_engine::model::tls::{spiffe_id, SanError};
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds::{self, ConfigError};
use prost::{Message, Name};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};

mod common;
use common::static_cluster;

struct Issued {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn root() -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Issued { cert: params.self_signed(&key).unwrap(), key }
}

fn leaf(issuer: &Issued, sans: Vec<SanType>) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Issued { cert: params.signed_by(&key, &issuer.cert, &issuer.key).unwrap(), key }
}

fn uri(value: &str) -> SanType {
    SanType::URI(value.try_into().unwrap())
}

fn matcher_of(pattern: StringMatch) -> StringMatcher {
    StringMatcher { pattern, ignore_case: false }
}

const A: &str = "spiffe://cluster.local/ns/default/sa/a";

#[test]
fn a_spiffe_certificate_yields_its_id_and_matchers_decide() {
    let ca = root();
    let cert = leaf(&ca, vec![uri(A)]);
    let der = cert.cert.der();
    assert_eq!(spiffe_id(der, &[]).unwrap(), A);
    assert_eq!(spiffe_id(der, &[matcher_of(StringMatch::Prefix("spiffe://cluster.local/".into()))]).unwrap(), A);
    assert_eq!(spiffe_id(der, &[matcher_of(StringMatch::Suffix("/sa/a".into()))]).unwrap(), A);
    let namespace = meshctl_engine::model::matcher::full_match_regex("spiffe://[^/]+/ns/default/sa/[^/]+").unwrap();
    assert_eq!(spiffe_id(der, &[matcher_of(StringMatch::Regex(namespace))]).unwrap(), A);
    // Any one of several expected identities will do; none at all is refused with the ID.
    let others = [
        matcher_of(StringMatch::Exact("spiffe://cluster.local/ns/default/sa/b".into())),
        matcher_of(StringMatch::Exact(A.into())),
    ];
    assert_eq!(spiffe_id(der, &others).unwrap(), A);
    assert_eq!(
        spiffe_id(der, &others[..1]),
        Err(SanError::NotExpected(A.into()))
    );
}

#[test]
fn certificates_that_are_not_one_clean_spiffe_id_are_refused() {
    let ca = root();
    let two = leaf(&ca, vec![uri(A), uri("spiffe://cluster.local/ns/default/sa/b")]);
    assert_eq!(spiffe_id(two.cert.der(), &[]), Err(SanError::UriSanCount(2)));
    let dns_only = leaf(&ca, vec![SanType::DnsName("a.default.svc".try_into().unwrap())]);
    assert_eq!(spiffe_id(dns_only.cert.der(), &[]), Err(SanError::UriSanCount(0)));
    let https = leaf(&ca, vec![uri("https://cluster.local/ns/default/sa/a")]);
    assert_eq!(spiffe_id(https.cert.der(), &[]), Err(SanError::NotSpiffe));
    let no_trust_domain = leaf(&ca, vec![uri("spiffe:///ns/default/sa/a")]);
    assert_eq!(spiffe_id(no_trust_domain.cert.der(), &[]), Err(SanError::NotSpiffe));
    for not_an_id in [
        "spiffe://cluster.local/ns/default/../kube-system/sa/admin",
        "spiffe://cluster.local/ns//sa/a",
        "spiffe://Cluster.Local/ns/default/sa/a",
        "spiffe://cluster.local/ns/default/sa/a%2F..",
        "spiffe://cluster.local/ns/default/sa/a?x=1",
        "spiffe://cluster.local/ns/default/sa/a/",
    ] {
        let cert = leaf(&ca, vec![uri(not_an_id)]);
        assert_eq!(spiffe_id(cert.cert.der(), &[]), Err(SanError::NotSpiffe), "{not_an_id}");
    }
    let nul = leaf(&ca, vec![uri("spiffe://cluster.local/ns/default/sa/a\0.evil")]);
    assert_eq!(spiffe_id(nul.cert.der(), &[]), Err(SanError::ControlCharacter));
    // A prefix matcher must not let a NUL-smuggled ID through either.
    let prefix = [matcher_of(StringMatch::Prefix(A.into()))];
    assert_eq!(spiffe_id(nul.cert.der(), &prefix), Err(SanError::ControlCharacter));
}

fn inline(text: &str) -> Option<core::DataSource> {
    Some(core::DataSource { specifier: Some(core::data_source::Specifier::InlineString(text.into())), ..Default::default() })
}

fn certificate_secret(name: &str, cert: &Issued) -> tls::Secret {
    tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(&cert.cert.pem()),
            private_key: inline(&cert.key.serialize_pem()),
            ..Default::default()
        })),
    }
}

fn roots_secret(name: &str, ca: &Issued) -> tls::Secret {
    tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::ValidationContext(tls::CertificateValidationContext {
            trusted_ca: inline(&ca.cert.pem()),
            ..Default::default()
        })),
    }
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, ConfigError>, resource: &str, field: &str, reason_part: &str) -> ConfigError {
    let error = result.expect_err("should be refused");
    assert_eq!(error.resource, resource, "{error}");
    assert_eq!(error.field, field, "{error}");
    assert!(error.reason.contains(reason_part), "{error}");
    error
}

#[test]
fn secrets_decode_and_are_swapped_by_name() {
    let ca = root();
    let registry = SecretRegistry::default();
    let slot = registry.slot("default");
    assert!(slot.certificate().is_none(), "empty until applied (warming)");
    let first = leaf(&ca, vec![uri(A)]);
    registry.store(vec![xds::decode_secret(&certificate_secret("default", &first).encode_to_vec()).unwrap()]);
    let stored = slot.certificate().expect("the slot a context holds sees the applied secret");
    assert_eq!(stored.spiffe_id.as_deref(), Some(A));
    let second = leaf(&ca, vec![uri(A)]);
    registry.store(vec![xds::decode_secret(&certificate_secret("default", &second).encode_to_vec()).unwrap()]);
    assert_ne!(slot.certificate().unwrap().chain[0].serial, stored.chain[0].serial);
    let roots = xds::decode_secret(&roots_secret("ROOTCA", &ca).encode_to_vec()).unwrap();
    assert!(matches!(roots.secret, Secret::Validation(_)));
    let dump = serde_json::to_string(&registry.dump()).unwrap();
    assert!(dump.contains(A) && !dump.contains("PRIVATE KEY") && !dump.contains("BEGIN CERTIFICATE"), "{dump}");
}

#[test]
fn bad_secrets_are_refused_by_field_without_quoting_keys() {
    let ca = root();
    let cert = leaf(&ca, vec![uri(A)]);
    let other = leaf(&ca, vec![uri(A)]);
    let mut mismatched = certificate_secret("default", &cert);
    if let Some(tls::secret::Type::TlsCertificate(c)) = &mut mismatched.r#type {
        c.private_key = inline(&other.key.serialize_pem());
    }
    let error = assert_refused(
        xds::decode_secret(&mismatched.encode_to_vec()),
        "Secret \"default\"",
        "tls_certificate.private_key",
        "does not match",
    );
    assert!(!error.to_string().contains("PRIVATE KEY"));
    let mut garbage_key = certificate_secret("default", &cert);
    if let Some(tls::secret::Type::TlsCertificate(c)) = &mut garbage_key.r#type {
        c.private_key = inline("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n");
    }
    let error = assert_refused(xds::decode_secret(&garbage_key.encode_to_vec()), "Secret \"default\"", "tls_certificate.private_key", "");
    assert!(!error.to_string().contains("c2VjcmV0"));

    let generic = tls::Secret { name: "x".into(), r#type: Some(tls::secret::Type::GenericSecret(Default::default())) };
    assert_refused(xds::decode_secret(&generic.encode_to_vec()), "Secret \"x\"", "generic_secret", "not supported");
    assert_refused(xds::decode_secret(&tls::Secret::default().encode_to_vec()), "Secret \"\"", "name", "required");

    let mut crl_only = roots_secret("ROOTCA", &ca);
    if let Some(tls::secret::Type::ValidationContext(v)) = &mut crl_only.r#type {
        v.crl = v.trusted_ca.take();
    }
    assert_refused(xds::decode_secret(&crl_only.encode_to_vec()), "Secret \"ROOTCA\"", "validation_context.crl", "trusted_ca");
    let mut not_pem = roots_secret("ROOTCA", &ca);
    if let Some(tls::secret::Type::ValidationContext(v)) = &mut not_pem.r#type {
        v.trusted_ca = inline("hello");
    }
    assert_refused(xds::decode_secret(&not_pem.encode_to_vec()), "Secret \"ROOTCA\"", "validation_context.trusted_ca", "no PEM");
    let mut matchers_in_secret = roots_secret("ROOTCA", &ca);
    if let Some(tls::secret::Type::ValidationContext(v)) = &mut matchers_in_secret.r#type {
        v.match_typed_subject_alt_names = vec![uri_matcher(3, "spiffe://cluster.local/")];
    }
    assert_refused(
        xds::decode_secret(&matchers_in_secret.encode_to_vec()),
        "Secret \"ROOTCA\"",
        "validation_context.match_typed_subject_alt_names",
        "TLS context",
    );
}

fn ads_secret(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(core::ConfigSource {
            resource_api_version: core::ApiVersion::V3 as i32,
            config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(Default::default())),
            ..Default::default()
        }),
    }
}

fn uri_matcher(san_type: i32, prefix: &str) -> tls::SubjectAltNameMatcher {
    tls::SubjectAltNameMatcher {
        san_type,
        matcher: Some(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(prefix.into())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Istio's inbound context: SDS `default`, SAN prefix, SDS `ROOTCA`.
fn mesh_common_context(san_type: i32) -> tls::CommonTlsContext {
    tls::CommonTlsContext {
        alpn_protocols: vec!["h2".into(), "http/1.1".into()],
        tls_certificate_sds_secret_configs: vec![ads_secret("default")],
        validation_context_type: Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(
            tls::common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(tls::CertificateValidationContext {
                    match_typed_subject_alt_names: vec![uri_matcher(san_type, "spiffe://cluster.local/")],
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(ads_secret("ROOTCA")),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn any_of<M: Message + Name>(message: &M) -> Any {
    Any { type_url: M::type_url(), value: message.encode_to_vec() }
}

fn tls_listener(context: tls::DownstreamTlsContext, manager: hcm::HttpConnectionManager) -> listener::Listener {
    listener::Listener {
        name: "inbound".into(),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(15006)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any_of(&manager))),
            }],
            transport_socket: Some(core::TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(core::transport_socket::ConfigType::TypedConfig(any_of(&context))),
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn inbound_manager() -> hcm::HttpConnectionManager {
    use envoy_types::pb::envoy::config::route::v3 as route;
    hcm::HttpConnectionManager {
        stat_prefix: "inbound".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(route::RouteConfiguration::default())),
        http_filters: vec![hcm::HttpFilter { name: "envoy.filters.http.router".into(), ..Default::default() }],
        forward_client_cert_details: hcm::http_connection_manager::ForwardClientCertDetails::SanitizeSet as i32,
        set_current_client_cert_details: Some(hcm::http_connection_manager::SetCurrentClientCertDetails { uri: true, ..Default::default() }),
        ..Default::default()
    }
}

fn decode_listener(l: &listener::Listener, secrets: &SecretRegistry) -> Result<meshctl_engine::model::ListenerConfig, ConfigError> {
    xds::decode_listener(&l.encode_to_vec(), &Metrics::default(), secrets)
}

const SOCKET: &str = "filter_chains[0].transport_socket.typed_config";

#[test]
fn istio_inbound_context_decodes_before_its_secrets_arrive() {
    let secrets = SecretRegistry::default();
    let context = tls::DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(mesh_common_context(3)),
        ..Default::default()
    };
    let decoded = decode_listener(&tls_listener(context, inbound_manager()), &secrets).unwrap();
    let server = decoded.filter_chains[0].tls.as_ref().unwrap();
    assert!(server.require_client_certificate);
    assert_eq!(server.certificate_source, "sds:default");
    // Both names now have (empty) slots: handshakes wait for them like Envoy's warming.
    assert!(secrets.slot("default").certificate().is_none());
    assert!(secrets.slot("ROOTCA").validation().is_none());
}

#[test]
fn tls_contexts_refuse_what_meshctl_cannot_honour() {
    let secrets = SecretRegistry::default();
    let dns_matcher = tls::DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(mesh_common_context(2)),
        ..Default::default()
    };
    assert_refused(
        decode_listener(&tls_listener(dns_matcher, inbound_manager()), &secrets),
        "Listener \"inbound\"",
        &format!("{SOCKET}.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names[0].san_type"),
        "DNS is not supported",
    );

    let mut without_roots = mesh_common_context(3);
    without_roots.validation_context_type = None;
    let unverifiable = tls::DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(without_roots),
        ..Default::default()
    };
    assert_refused(
        decode_listener(&tls_listener(unverifiable, inbound_manager()), &secrets),
        "Listener \"inbound\"",
        &format!("{SOCKET}.require_client_certificate"),
        "validation context",
    );

    let mut from_a_file_server = mesh_common_context(3);
    #[allow(deprecated)]
    let path = core::config_source::ConfigSourceSpecifier::Path("/etc/sds.yaml".into());
    from_a_file_server.tls_certificate_sds_secret_configs[0].sds_config = Some(core::ConfigSource {
        config_source_specifier: Some(path),
        ..Default::default()
    });
    let path_sds = tls::DownstreamTlsContext { common_tls_context: Some(from_a_file_server), ..Default::default() };
    assert_refused(
        decode_listener(&tls_listener(path_sds, inbound_manager()), &secrets),
        "Listener \"inbound\"",
        &format!("{SOCKET}.common_tls_context.tls_certificate_sds_secret_configs[0].sds_config"),
        "ads",
    );

    let mut subject = inbound_manager();
    subject.set_current_client_cert_details.as_mut().unwrap().subject = Some(BoolValue { value: true });
    let context = tls::DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(mesh_common_context(3)),
        ..Default::default()
    };
    assert_refused(
        decode_listener(&tls_listener(context, subject), &secrets),
        "Listener \"inbound\"",
        "filter_chains[0].filters[0].typed_config.set_current_client_cert_details.subject",
        "not supported",
    );
}

fn tls_cluster(context: &tls::UpstreamTlsContext) -> Vec<u8> {
    let mut cluster = static_cluster("outbound|9080||reviews", 15006);
    cluster.transport_socket = Some(core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any_of(context))),
    });
    cluster.encode_to_vec()
}

#[test]
fn upstream_contexts_decode_and_refuse_by_field() {
    let secrets = SecretRegistry::default();
    let context = tls::UpstreamTlsContext {
        sni: "outbound_.9080_._.reviews.default.svc.cluster.local".into(),
        common_tls_context: Some(mesh_common_context(3)),
        ..Default::default()
    };
    let decoded = xds::decode_cluster(&tls_cluster(&context), &secrets).unwrap();
    let upstream = decoded.tls.as_ref().unwrap();
    assert_eq!(upstream.sni.as_deref(), Some("outbound_.9080_._.reviews.default.svc.cluster.local"));
    assert_eq!(upstream.alpn_protocols, ["h2", "http/1.1"]);
    // The same context decodes equal: a re-applied cluster keeps its pools.
    assert_eq!(decoded, xds::decode_cluster(&tls_cluster(&context), &secrets).unwrap());

    let mut tls13_only = mesh_common_context(3);
    tls13_only.tls_params = Some(tls::TlsParameters {
        tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
        ..Default::default()
    });
    let modern = tls::UpstreamTlsContext { common_tls_context: Some(tls13_only.clone()), ..context.clone() };
    assert!(xds::decode_cluster(&tls_cluster(&modern), &secrets).is_ok());
    tls13_only.tls_params.as_mut().unwrap().cipher_suites = vec!["ECDHE-RSA-AES128-GCM-SHA256".into()];
    let ciphers = tls::UpstreamTlsContext { common_tls_context: Some(tls13_only), ..context.clone() };
    assert_refused(
        xds::decode_cluster(&tls_cluster(&ciphers), &secrets),
        "Cluster \"outbound|9080||reviews\"",
        "transport_socket.typed_config.common_tls_context.tls_params.cipher_suites",
        "not supported",
    );

    let auto_sni = tls::UpstreamTlsContext { auto_host_sni: true, ..context.clone() };
    assert_refused(
        xds::decode_cluster(&tls_cluster(&auto_sni), &secrets),
        "Cluster \"outbound|9080||reviews\"",
        "transport_socket.typed_config.auto_host_sni",
        "not supported",
    );
    let mut spki = mesh_common_context(3);
    if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(combined)) = &mut spki.validation_context_type {
        combined.default_validation_context.as_mut().unwrap().verify_certificate_spki = vec!["abc".into()];
    }
    let pinned = tls::UpstreamTlsContext { common_tls_context: Some(spki), ..context.clone() };
    assert_refused(
        xds::decode_cluster(&tls_cluster(&pinned), &secrets),
        "Cluster \"outbound|9080||reviews\"",
        "transport_socket.typed_config.common_tls_context.combined_validation_context.default_validation_context.verify_certificate_spki",
        "not supported",
    );
}
