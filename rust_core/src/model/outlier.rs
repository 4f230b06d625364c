//! Outlier detection (passive health checking) settings of a cluster, with Envoy's defaults.

use std::time::Duration;

use serde::Serialize;

/// Envoy's `OutlierDetection`, every field resolved to its value (defaults applied). Percentages
/// are 0..=100; `enforcing_*` is the chance, in percent, that a detected outlier is ejected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierDetection {
    /// 0 disables each consecutive-failure detector (its counter never equals 0 once counted).
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    /// Local-origin failures (connect failures, resets, timeouts) count apart from HTTP statuses.
    pub split_external_local_origin_errors: bool,
    #[serde(with = "super::millis")]
    pub interval: Duration,
    #[serde(with = "super::millis")]
    pub base_ejection_time: Duration,
    #[serde(with = "super::millis")]
    pub max_ejection_time: Duration,
    #[serde(with = "super::millis")]
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u32,
    pub always_eject_one_host: bool,
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub enforcing_success_rate: u32,
    pub enforcing_local_origin_success_rate: u32,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    /// Thousandths: 1900 is 1.9 standard deviations below the mean.
    pub success_rate_stdev_factor: u32,
    pub failure_percentage_threshold: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
}

impl Default for OutlierDetection {
    /// Envoy's defaults (outlier_detection_impl.h), for a message with no field set.
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_time_jitter: Duration::ZERO,
            max_ejection_percent: 10,
            always_eject_one_host: false,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            enforcing_local_origin_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
        }
    }
}
