//! Builders shared by the engine's integration tests.

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;

/// A STATIC cluster with one endpoint on 127.0.0.1:`port` (ports above 65535 on purpose are allowed).
pub fn static_cluster(name: &str, port: u32) -> cluster::Cluster {
    cluster::Cluster {
        name: name.into(),
        load_assignment: Some(endpoint::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint::LbEndpoint {
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
                        address: Some(core::Address {
                            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                                address: "127.0.0.1".into(),
                                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
