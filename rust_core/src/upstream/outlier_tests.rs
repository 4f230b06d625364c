//! The detector in paused time: outcomes recorded on endpoints by hand, the real interval sweeps
//! running as time is advanced.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use prost::Message;
use tokio::time::sleep;

use super::LocalResult;
use crate::model::cluster::HealthStatus;
use crate::model::outlier::OutlierDetection;
use crate::model::EndpointConfig;
use crate::telemetry::metrics::{EjectionType, Metrics};
use crate::upstream::{ClusterRuntime, Endpoint};

const SECOND: Duration = Duration::from_secs(1);
const HALF: Duration = Duration::from_millis(500);

fn detection() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: 3,
        interval: SECOND,
        base_ejection_time: 5 * SECOND,
        max_ejection_percent: 50,
        ..Default::default()
    }
}

/// A round-robin cluster of `n` endpoints (nothing listens: outcomes are recorded by hand), its
/// sweeps running from now on (every second with `detection()`).
fn cluster_of(n: u16, detection: OutlierDetection, panic_threshold: u32) -> (Arc<ClusterRuntime>, Arc<Metrics>) {
    // The balancer takes each change at once here; the merge window has a test of its own.
    cluster_with_merge_window(n, detection, panic_threshold, Duration::ZERO)
}

fn cluster_with_merge_window(
    n: u16,
    detection: OutlierDetection,
    panic_threshold: u32,
    merge_window: Duration,
) -> (Arc<ClusterRuntime>, Arc<Metrics>) {
    let proto = cluster::Cluster { name: "web".into(), load_assignment: Some(Default::default()), ..Default::default() };
    let mut config = crate::xds::decode_cluster(&proto.encode_to_vec(), &Default::default()).unwrap();
    config.outlier_detection = Some(detection);
    config.healthy_panic_threshold = panic_threshold;
    config.update_merge_window = merge_window;
    let endpoints: Vec<EndpointConfig> = (0..n)
        .map(|i| EndpointConfig {
            address: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
            weight: 1,
            labels: Default::default(),
            health_status: HealthStatus::Healthy,
            workload: None,
        })
        .collect();
    let metrics = Arc::new(Metrics::default());
    let cluster = ClusterRuntime::new(config, &endpoints, &metrics);
    tokio::spawn(cluster.sweeps().unwrap());
    (cluster, metrics)
}

/// Endpoint `i` (port 9000 + i).
fn endpoint(cluster: &ClusterRuntime, i: u16) -> Arc<Endpoint> {
    let set = cluster.endpoint_set();
    set.endpoints.iter().find(|e| e.address.port() == 9000 + i).unwrap().clone()
}

fn fail(endpoint: &Endpoint, times: usize, status: u16) {
    for _ in 0..times {
        endpoint.monitor().unwrap().record_status(status);
    }
}

/// Which endpoints `n` picks went to (1-based; 0 for none).
fn picks(cluster: &ClusterRuntime, n: usize) -> Vec<u16> {
    (0..n).map(|_| cluster.pick_endpoint(None).map_or(0, |e| e.address.port() - 9000 + 1)).collect()
}

#[tokio::test(start_paused = true)]
async fn consecutive_5xx_ejects_at_the_threshold_and_the_balancer_skips_the_endpoint() {
    let (cluster, metrics) = cluster_of(2, detection(), 50);
    let bad = endpoint(&cluster, 0);
    fail(&bad, 2, 500);
    assert!(!bad.is_ejected());
    fail(&bad, 1, 500);
    assert!(bad.is_ejected(), "ejected at once when the third 5xx arrives");
    assert!(picks(&cluster, 20).iter().all(|&p| p == 2), "only the healthy endpoint is picked");
    let stats = metrics.outlier("web");
    assert_eq!(stats.ejections_active.load(Relaxed), 1);
    assert_eq!(stats.ejections_enforced_total.load(Relaxed), 1);
    assert_eq!(stats.ejections_enforced[EjectionType::Consecutive5xx as usize].load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_consecutive_counters() {
    let (cluster, _) = cluster_of(2, detection(), 50);
    let bad = endpoint(&cluster, 0);
    fail(&bad, 2, 503);
    fail(&bad, 1, 200);
    fail(&bad, 2, 502);
    assert!(!bad.is_ejected());
    // 4xx are successes for outlier detection.
    fail(&bad, 1, 404);
    fail(&bad, 2, 500);
    assert!(!bad.is_ejected());
    fail(&bad, 1, 500);
    assert!(bad.is_ejected());
}

#[tokio::test(start_paused = true)]
async fn an_ejected_endpoint_returns_at_the_sweep_after_its_time_and_is_ejected_longer_next_time() {
    let (cluster, metrics) = cluster_of(2, detection(), 50);
    let bad = endpoint(&cluster, 0);
    // Sweeps run at t = 1, 2, 3 ... s; the endpoint fails at t = 0.5 s.
    sleep(HALF).await;
    fail(&bad, 3, 503);
    assert!(bad.is_ejected());
    sleep(5 * SECOND).await; // t = 5.5: the sweep at 5 s found 4.5 s < 5 s
    assert!(bad.is_ejected(), "base_ejection_time is 5 s");
    sleep(SECOND).await; // t = 6.5
    assert!(!bad.is_ejected(), "back at the first sweep after 5 s (t = 6)");
    assert_eq!(metrics.outlier("web").ejections_active.load(Relaxed), 0);
    assert!(picks(&cluster, 4).contains(&1), "picked again");
    // Failing again at once: the second ejection lasts 2 × 5 s.
    fail(&bad, 3, 503);
    assert!(bad.is_ejected());
    sleep(9 * SECOND).await; // t = 15.5
    assert!(bad.is_ejected(), "10 s the second time");
    sleep(2 * SECOND).await; // t = 17.5: the sweep at 17 s found 10.5 s
    assert!(!bad.is_ejected());
    assert_eq!(metrics.outlier("web").ejections_enforced_total.load(Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn the_ejection_multiplier_decays_one_step_per_interval_spent_back() {
    let (cluster, _) = cluster_of(2, detection(), 50);
    let bad = endpoint(&cluster, 0);
    // Sweeps run on whole seconds; the test looks and acts on half seconds.
    sleep(HALF).await;
    // Three ejections in a row, each half a second after the endpoint is back (before the next
    // sweep could lower the multiplier): 5, 10, then 15 s.
    for k in 1..=3u32 {
        fail(&bad, 3, 503);
        sleep(k * 5 * SECOND - SECOND).await;
        assert!(bad.is_ejected(), "ejection {k} lasts {k} × 5 s");
        sleep(2 * SECOND).await;
        assert!(!bad.is_ejected(), "ejection {k} is over");
    }
    // Back for two sweeps an interval apart: the multiplier steps down from 3 to 1.
    sleep(2 * SECOND).await;
    fail(&bad, 3, 503);
    sleep(9 * SECOND).await;
    assert!(bad.is_ejected(), "(3 - 2) + 1 = 2: 10 s this time, not 5");
    sleep(2 * SECOND).await;
    assert!(!bad.is_ejected(), "nor 15");
}

#[tokio::test(start_paused = true)]
async fn max_ejection_time_caps_the_growth() {
    let config = OutlierDetection { max_ejection_time: 7 * SECOND, ..detection() };
    let (cluster, _) = cluster_of(2, config, 50);
    let bad = endpoint(&cluster, 0);
    sleep(HALF).await;
    for k in 1..=4u32 {
        fail(&bad, 3, 503);
        assert!(bad.is_ejected());
        // Out for min(k × 5, 7) s, back at the next whole-second sweep; looked at half a second later.
        sleep((k * 5 * SECOND).min(7 * SECOND) + SECOND).await;
        assert!(!bad.is_ejected(), "ejection {k}: never out longer than max_ejection_time");
    }
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_overflows_and_always_eject_one_host_overrides_it() {
    // 10% of 2 endpoints: one ejection would be 50%. Envoy 1.40 ejects none.
    let (cluster, metrics) = cluster_of(2, OutlierDetection { max_ejection_percent: 10, ..detection() }, 50);
    let bad = endpoint(&cluster, 0);
    fail(&bad, 3, 500);
    assert!(!bad.is_ejected());
    let stats = metrics.outlier("web");
    assert_eq!(stats.ejections_overflow.load(Relaxed), 1);
    assert_eq!(stats.ejections_detected[EjectionType::Consecutive5xx as usize].load(Relaxed), 1);
    // The counter was reset by the detection: three more are needed.
    fail(&bad, 2, 500);
    assert_eq!(stats.ejections_overflow.load(Relaxed), 1);

    let config = OutlierDetection { max_ejection_percent: 10, always_eject_one_host: true, ..detection() };
    let (cluster, metrics) = cluster_of(2, config, 50);
    let (first, second) = (endpoint(&cluster, 0), endpoint(&cluster, 1));
    fail(&first, 3, 500);
    assert!(first.is_ejected(), "one host may always be ejected");
    fail(&second, 3, 500);
    assert!(!second.is_ejected(), "but not a second beyond the percentage");
    assert_eq!(metrics.outlier("web").ejections_overflow.load(Relaxed), 1);

    // 50% of 2: the first goes, the second would make 100%.
    let (cluster, _) = cluster_of(2, detection(), 50);
    let (first, second) = (endpoint(&cluster, 0), endpoint(&cluster, 1));
    fail(&first, 3, 500);
    fail(&second, 3, 500);
    assert!(first.is_ejected() && !second.is_ejected());
}

#[tokio::test(start_paused = true)]
async fn gateway_failures_are_detected_but_not_enforced_by_default() {
    let config = OutlierDetection { consecutive_5xx: 0, consecutive_gateway_failure: 3, ..detection() };
    let (cluster, metrics) = cluster_of(2, config, 50);
    let bad = endpoint(&cluster, 0);
    fail(&bad, 3, 502);
    assert!(!bad.is_ejected(), "enforcing_consecutive_gateway_failure defaults to 0");
    let stats = metrics.outlier("web");
    assert_eq!(stats.ejections_detected[EjectionType::ConsecutiveGatewayFailure as usize].load(Relaxed), 1);
    assert_eq!(stats.ejections_enforced_total.load(Relaxed), 0);

    let config = OutlierDetection {
        consecutive_5xx: 0,
        consecutive_gateway_failure: 3,
        enforcing_consecutive_gateway_failure: 100,
        ..detection()
    };
    let (cluster, metrics) = cluster_of(2, config, 50);
    let bad = endpoint(&cluster, 0);
    // A 500 is no gateway failure: it breaks the run.
    fail(&bad, 2, 504);
    fail(&bad, 1, 500);
    fail(&bad, 2, 503);
    assert!(!bad.is_ejected());
    fail(&bad, 1, 502);
    assert!(bad.is_ejected());
    let stats = metrics.outlier("web");
    assert_eq!(stats.ejections_enforced[EjectionType::ConsecutiveGatewayFailure as usize].load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn local_origin_failures_count_as_503_unless_split() {
    let (cluster, _) = cluster_of(2, detection(), 50);
    let dead = endpoint(&cluster, 0);
    for _ in 0..3 {
        dead.monitor().unwrap().record_local(LocalResult::ConnectFailed);
    }
    assert!(dead.is_ejected(), "three connect failures are three 503s");

    let (cluster, _) = cluster_of(2, detection(), 50);
    let slow = endpoint(&cluster, 0);
    for _ in 0..3 {
        slow.record_timeout();
    }
    assert!(slow.is_ejected(), "three timeouts are three 504s");
}

#[tokio::test(start_paused = true)]
async fn split_local_origin_failures_have_their_own_counter_reset_by_a_made_connection() {
    let config = OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: 2,
        ..detection()
    };
    let (cluster, metrics) = cluster_of(2, config, 50);
    let flaky = endpoint(&cluster, 0);
    let monitor = flaky.monitor().unwrap();
    // A reset after the request went out: the connection was made first (counter back to 0).
    for _ in 0..5 {
        monitor.record_local(LocalResult::ConnectSuccess);
        monitor.record_local(LocalResult::ConnectFailed);
    }
    assert!(!flaky.is_ejected(), "as Envoy: each made connection resets the run");
    // Local-origin failures are not 5xx.
    fail(&flaky, 2, 200);
    monitor.record_local(LocalResult::ConnectFailed);
    monitor.record_local(LocalResult::Timeout);
    assert!(flaky.is_ejected(), "two in a row without a connection");
    let stats = metrics.outlier("web");
    assert_eq!(stats.ejections_enforced[EjectionType::ConsecutiveLocalOriginFailure as usize].load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn panic_mode_balances_over_every_endpoint_and_threshold_zero_picks_none() {
    let config = OutlierDetection { max_ejection_percent: 100, ..detection() };
    let (cluster, metrics) = cluster_of(2, config.clone(), 50);
    fail(&endpoint(&cluster, 0), 3, 503);
    fail(&endpoint(&cluster, 1), 3, 503);
    let picked = picks(&cluster, 10);
    assert!(picked.contains(&1) && picked.contains(&2), "panic: both endpoints, {picked:?}");
    assert_eq!(metrics.outlier("web").lb_healthy_panic.load(Relaxed), 10);

    let (cluster, metrics) = cluster_of(2, config, 0);
    fail(&endpoint(&cluster, 0), 3, 503);
    assert_eq!(picks(&cluster, 4), vec![2, 2, 2, 2]);
    fail(&endpoint(&cluster, 1), 3, 503);
    assert_eq!(picks(&cluster, 4), vec![0, 0, 0, 0], "no healthy upstream");
    assert_eq!(metrics.outlier("web").none_healthy.load(Relaxed), 4);
}

#[tokio::test(start_paused = true)]
async fn changes_within_the_merge_window_reach_the_balancer_together_at_its_end() {
    let config = OutlierDetection { max_ejection_percent: 100, ..detection() };
    let (cluster, metrics) = cluster_with_merge_window(3, config, 0, SECOND);
    sleep(HALF).await;
    fail(&endpoint(&cluster, 0), 3, 503);
    assert!(!picks(&cluster, 6).contains(&1), "the first change is taken at once");
    sleep(Duration::from_millis(100)).await;
    fail(&endpoint(&cluster, 1), 3, 503);
    assert_eq!(metrics.outlier("web").ejections_active.load(Relaxed), 2, "counted at once");
    assert!(picks(&cluster, 6).contains(&2), "but balanced over until 1 s after the first");
    sleep(SECOND + Duration::from_millis(100)).await;
    assert_eq!(picks(&cluster, 6), vec![3; 6]);
}

#[tokio::test(start_paused = true)]
async fn endpoints_updated_in_place_keep_their_ejection() {
    let (cluster, _) = cluster_of(2, detection(), 50);
    fail(&endpoint(&cluster, 0), 3, 503);
    let mut configs = cluster.endpoints();
    configs[0].weight = 7;
    cluster.set_endpoints(&configs);
    let updated = endpoint(&cluster, 0);
    assert_eq!(updated.weight, 7);
    assert!(updated.is_ejected());
    assert!(picks(&cluster, 6).iter().all(|&p| p == 2));
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejects_the_outlier_of_the_interval() {
    let config = OutlierDetection { consecutive_5xx: 0, ..detection() };
    let (cluster, metrics) = cluster_of(6, config, 50);
    for i in 0..6 {
        let e = endpoint(&cluster, i);
        for n in 0..100 {
            // Endpoint 0 fails one request in two (never 3 in a row matters: 5xx detection is off).
            let status = if i == 0 && n % 2 == 0 { 500 } else { 200 };
            e.monitor().unwrap().record_status(status);
        }
    }
    sleep(SECOND + HALF).await;
    // mean 91.7, stdev 18.6: threshold 56.3 > 50 (max_ejection_percent 50 allows it).
    assert!(endpoint(&cluster, 0).is_ejected());
    assert!((1..6).all(|i| !endpoint(&cluster, i).is_ejected()));
    assert_eq!(metrics.outlier("web").ejections_enforced[EjectionType::SuccessRate as usize].load(Relaxed), 1);
    // Too little traffic in the next interval: no verdict.
    fail(&endpoint(&cluster, 1), 50, 500);
    sleep(SECOND).await;
    assert!(!endpoint(&cluster, 1).is_ejected());
}

#[tokio::test(start_paused = true)]
async fn failure_percentage_ejects_when_enforced() {
    let config = OutlierDetection { consecutive_5xx: 0, enforcing_success_rate: 0, enforcing_failure_percentage: 100, ..detection() };
    let (cluster, metrics) = cluster_of(5, config, 50);
    for i in 0..5 {
        let e = endpoint(&cluster, i);
        for n in 0..100 {
            let status = if i == 3 && n % 10 != 0 { 503 } else { 200 };
            e.monitor().unwrap().record_status(status);
        }
    }
    sleep(SECOND + HALF).await;
    assert!(endpoint(&cluster, 3).is_ejected(), "90% failures ≥ 85%");
    let stats = metrics.outlier("web");
    assert_eq!(stats.ejections_enforced[EjectionType::FailurePercentage as usize].load(Relaxed), 1);
    assert_eq!(stats.ejections_detected[EjectionType::SuccessRate as usize].load(Relaxed), 1, "also a success-rate outlier (threshold 13.6%), not enforced");
}

#[test]
fn grpc_statuses_map_as_envoy_maps_them() {
    assert_eq!(super::grpc_status_to_http(b"0"), 200);
    assert_eq!(super::grpc_status_to_http(b"14"), 503);
    assert_eq!(super::grpc_status_to_http(b"4"), 504);
    assert_eq!(super::grpc_status_to_http(b"99"), 500);
    assert_eq!(super::grpc_status_to_http(b"x"), 500);
}
