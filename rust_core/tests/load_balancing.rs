//! Load balancing over a cluster's endpoints.

use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds;
use prost::Message;

mod common;
use common::static_cluster;


#[test]
fn least_request_prefers_the_endpoint_with_fewer_requests_in_flight() {
    use meshctl_engine::model::{EndpointConfig, LbPolicy};
    use meshctl_engine::upstream::ClusterRuntime;
    let mut config = xds::decode_cluster(&static_cluster("web", 8080).encode_to_vec(), &Default::default()).unwrap();
    config.lb_policy = LbPolicy::LeastRequest;
    let endpoints: Vec<EndpointConfig> = [8081, 8082]
        .iter()
        .map(|port| EndpointConfig {
            address: format!("127.0.0.1:{port}").parse().unwrap(),
            weight: 1,
            labels: Default::default(),
            health_status: Default::default(),
            workload: None,
        })
        .collect();
    let runtime = ClusterRuntime::new(config, &endpoints, &Metrics::default());
    let busy = runtime.pick_endpoint(None).unwrap();
    let _in_flight: Vec<_> = (0..10).map(|_| busy.start_request()).collect();
    let picks = 10_000;
    let busy_picks = (0..picks).filter(|_| runtime.pick_endpoint(None).unwrap().address == busy.address).count();
    // Two random choices: the busy endpoint wins only when both draws land on it (1 in 4).
    let share = busy_picks as f64 / picks as f64;
    assert!((0.20..0.30).contains(&share), "busy endpoint got {share:.3} of picks");
}
