//! Cluster `outlier_detection` and `common_lb_config` → the model's ejection and panic settings.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::google::protobuf;

use super::common::duration;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::outlier::OutlierDetection;

/// What `common_lb_config` sets that meshctl implements, with Envoy's defaults.
pub(crate) struct CommonLb {
    pub healthy_panic_threshold: u32,
    pub update_merge_window: Duration,
}

impl Default for CommonLb {
    fn default() -> Self {
        CommonLb { healthy_panic_threshold: 50, update_merge_window: Duration::from_secs(1) }
    }
}

pub(crate) fn outlier_detection(o: &cluster::OutlierDetection) -> FieldResult<OutlierDetection> {
    refuse_if(!o.monitors.is_empty(), "monitors")?;
    refuse_if(o.detect_degraded_hosts.as_ref().is_some_and(|v| v.value), "detect_degraded_hosts")?;
    // Active health checks are refused on the cluster, so this has nothing to act on.
    let _ = &o.successful_active_health_check_uneject_host;
    let defaults = OutlierDetection::default();
    let count = |v: &Option<protobuf::UInt32Value>, default: u32| v.as_ref().map_or(default, |v| v.value);
    let percent = |v: &Option<protobuf::UInt32Value>, default: u32, field: &str| -> FieldResult<u32> {
        let value = count(v, default);
        if value > 100 {
            return Err(FieldError::new(field, format!("{value} is not a percentage (0-100)")));
        }
        Ok(value)
    };
    let positive = |d: &Option<protobuf::Duration>, default: Duration, field: &str| -> FieldResult<Duration> {
        let Some(d) = d else { return Ok(default) };
        // Envoy keeps these in whole milliseconds; a timer of 0 ms would spin.
        let value = whole_millis(duration(d).at(field)?);
        if value.is_zero() {
            return Err(FieldError::new(field, "must be at least 1ms"));
        }
        Ok(value)
    };
    let base_ejection_time = positive(&o.base_ejection_time, defaults.base_ejection_time, "base_ejection_time")?;
    // Unset, the cap is 300 s or the base ejection time, whichever is longer (as Envoy).
    let max_ejection_time =
        positive(&o.max_ejection_time, defaults.max_ejection_time.max(base_ejection_time), "max_ejection_time")?;
    if max_ejection_time < base_ejection_time {
        return Err(FieldError::new("max_ejection_time", "must not be smaller than base_ejection_time"));
    }
    let max_ejection_time_jitter = match &o.max_ejection_time_jitter {
        Some(d) => whole_millis(duration(d).at("max_ejection_time_jitter")?),
        None => Duration::ZERO,
    };
    Ok(OutlierDetection {
        consecutive_5xx: count(&o.consecutive_5xx, defaults.consecutive_5xx),
        consecutive_gateway_failure: count(&o.consecutive_gateway_failure, defaults.consecutive_gateway_failure),
        consecutive_local_origin_failure: count(&o.consecutive_local_origin_failure, defaults.consecutive_local_origin_failure),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        interval: positive(&o.interval, defaults.interval, "interval")?,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter,
        max_ejection_percent: percent(&o.max_ejection_percent, defaults.max_ejection_percent, "max_ejection_percent")?,
        always_eject_one_host: o.always_eject_one_host.as_ref().is_some_and(|v| v.value),
        enforcing_consecutive_5xx: percent(&o.enforcing_consecutive_5xx, defaults.enforcing_consecutive_5xx, "enforcing_consecutive_5xx")?,
        enforcing_consecutive_gateway_failure: percent(
            &o.enforcing_consecutive_gateway_failure,
            defaults.enforcing_consecutive_gateway_failure,
            "enforcing_consecutive_gateway_failure",
        )?,
        enforcing_consecutive_local_origin_failure: percent(
            &o.enforcing_consecutive_local_origin_failure,
            defaults.enforcing_consecutive_local_origin_failure,
            "enforcing_consecutive_local_origin_failure",
        )?,
        enforcing_success_rate: percent(&o.enforcing_success_rate, defaults.enforcing_success_rate, "enforcing_success_rate")?,
        enforcing_local_origin_success_rate: percent(
            &o.enforcing_local_origin_success_rate,
            defaults.enforcing_local_origin_success_rate,
            "enforcing_local_origin_success_rate",
        )?,
        success_rate_minimum_hosts: count(&o.success_rate_minimum_hosts, defaults.success_rate_minimum_hosts),
        success_rate_request_volume: count(&o.success_rate_request_volume, defaults.success_rate_request_volume),
        success_rate_stdev_factor: count(&o.success_rate_stdev_factor, defaults.success_rate_stdev_factor),
        failure_percentage_threshold: percent(
            &o.failure_percentage_threshold,
            defaults.failure_percentage_threshold,
            "failure_percentage_threshold",
        )?,
        enforcing_failure_percentage: percent(
            &o.enforcing_failure_percentage,
            defaults.enforcing_failure_percentage,
            "enforcing_failure_percentage",
        )?,
        enforcing_failure_percentage_local_origin: percent(
            &o.enforcing_failure_percentage_local_origin,
            defaults.enforcing_failure_percentage_local_origin,
            "enforcing_failure_percentage_local_origin",
        )?,
        failure_percentage_minimum_hosts: count(&o.failure_percentage_minimum_hosts, defaults.failure_percentage_minimum_hosts),
        failure_percentage_request_volume: count(&o.failure_percentage_request_volume, defaults.failure_percentage_request_volume),
    })
}

fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// The panic threshold and merge window from `common_lb_config`; every other field of it
/// changes balancing in ways meshctl does not implement, so it is refused.
pub(crate) fn common_lb_config(c: &cluster::cluster::CommonLbConfig) -> FieldResult<CommonLb> {
    refuse_if(c.locality_config_specifier.is_some(), "locality_config_specifier")?;
    refuse_if(c.close_connections_on_host_set_change, "close_connections_on_host_set_change")?;
    refuse_if(c.consistent_hashing_lb_config.is_some(), "consistent_hashing_lb_config")?;
    refuse_if(c.override_host_status.is_some(), "override_host_status")?;
    // ignore_new_hosts_until_first_hc needs active health checks, which are refused.
    let defaults = CommonLb::default();
    let healthy_panic_threshold = match &c.healthy_panic_threshold {
        None => defaults.healthy_panic_threshold,
        Some(threshold) if (0.0..=100.0).contains(&threshold.value) => {
            // Envoy rounds it to a whole percentage (PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT).
            threshold.value.round() as u32
        }
        Some(threshold) => {
            return Err(FieldError::new(
                "healthy_panic_threshold.value",
                format!("{} is not a percentage (0-100)", threshold.value),
            ))
        }
    };
    let update_merge_window = match &c.update_merge_window {
        Some(d) => whole_millis(duration(d).at("update_merge_window")?),
        None => defaults.update_merge_window,
    };
    Ok(CommonLb { healthy_panic_threshold, update_merge_window })
}
