//! Envoy's GrpcService as the engine's own gRPC calls take it (the rate limit service, the
//! tracing collector): the envoy_grpc cluster and the :authority of the calls. What the engine's
//! unary client does not honour is refused by field; the call's timeout is each caller's to read.

use envoy_types::pb::envoy::config::core::v3 as core;

use super::{refuse_if, FieldError, FieldResult};

/// The cluster named by envoy_grpc, and the :authority the calls carry; Envoy's other gRPC
/// client (google_grpc) is refused.
pub(super) fn envoy_grpc_target(grpc: &core::GrpcService) -> FieldResult<(String, http::uri::Authority)> {
    use core::grpc_service::TargetSpecifier;
    refuse_if(!grpc.initial_metadata.is_empty(), "grpc_service.initial_metadata")?;
    refuse_if(grpc.retry_policy.is_some(), "grpc_service.retry_policy")?;
    match &grpc.target_specifier {
        Some(TargetSpecifier::EnvoyGrpc(e)) => {
            if e.cluster_name.is_empty() {
                return Err(FieldError::new("grpc_service.envoy_grpc.cluster_name", "is required"));
            }
            refuse_if(e.retry_policy.is_some(), "grpc_service.envoy_grpc.retry_policy")?;
            refuse_if(e.max_receive_message_length.is_some(), "grpc_service.envoy_grpc.max_receive_message_length")?;
            refuse_if(e.skip_envoy_headers, "grpc_service.envoy_grpc.skip_envoy_headers")?;
            let authority = if e.authority.is_empty() {
                cluster_authority(&e.cluster_name)
            } else {
                http::uri::Authority::try_from(e.authority.as_str())
                    .map_err(|_| FieldError::new("grpc_service.envoy_grpc.authority", format!("{:?} is not a valid authority", e.authority)))?
            };
            Ok((e.cluster_name.clone(), authority))
        }
        Some(TargetSpecifier::GoogleGrpc(_)) => Err(FieldError::new(
            "grpc_service.google_grpc",
            "is not supported by meshctl (use envoy_grpc with a cluster)",
        )),
        None => Err(FieldError::new("grpc_service", "needs envoy_grpc")),
    }
}

/// The cluster's name as an authority: a byte an authority's host may not hold becomes `-`
/// (Envoy sends the name as it is; the HTTP library here refuses such a header, and refuses
/// percent-encoding in a host too). Only the :authority of the calls changes.
fn cluster_authority(name: &str) -> http::uri::Authority {
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=".contains(c) { c } else { '-' })
        .collect();
    http::uri::Authority::try_from(cleaned).unwrap_or_else(|_| http::uri::Authority::from_static("grpc-service"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn istio_cluster_names_become_valid_authorities() {
        assert_eq!(super::cluster_authority("rls").as_str(), "rls");
        assert_eq!(
            super::cluster_authority("outbound|8081||ratelimit.mesh.svc").as_str(),
            "outbound-8081--ratelimit.mesh.svc"
        );
    }
}
