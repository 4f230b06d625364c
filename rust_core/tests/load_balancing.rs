//! Load balancing over a cluster's endpoints.

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds;
use prost::Message;

fn static_cluster(name: &str, port: u32) -> cluster::Cluster {
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

#[test]
fn least_request_prefers_the_endpoint_with_fewer_requests_in_flight() {
    use meshctl_engine::model::{EndpointConfig, LbPolicy};
    use meshctl_engine::upstream::ClusterRuntime;
    let mut config = xds::decode_cluster(&static_cluster("web", 8080).encode_to_vec()).unwrap();
    config.lb_policy = LbPolicy::LeastRequest;
    let endpoints: Vec<EndpointConfig> = [8081, 8082]
        .iter()
        .map(|port| EndpointConfig { address: format!("127.0.0.1:{port}").parse().unwrap(), weight: 1, labels: Default::default() })
        .collect();
    let runtime = ClusterRuntime::new(config, &endpoints, &Metrics::default());
    let busy = runtime.pick_endpoint().unwrap();
    let _in_flight: Vec<_> = (0..10).map(|_| busy.start_request()).collect();
    let picks = 10_000;
    let busy_picks = (0..picks).filter(|_| runtime.pick_endpoint().unwrap().address == busy.address).count();
    // Two random choices: the busy endpoint wins only when both draws land on it (1 in 4).
    let share = busy_picks as f64 / picks as f64;
    assert!((0.20..0.30).contains(&share), "busy endpoint got {share:.3} of picks");
}
