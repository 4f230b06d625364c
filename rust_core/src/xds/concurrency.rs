//! A cluster's `meshctl.concurrency` metadata (compiled from a RateLimit concurrency rule's
//! `queueTimeout`) → how long a request may wait for a connection to the app. Envoy keeps such
//! metadata and ignores it (its requests wait until the route's timeout); meshctl enforces it, so a
//! malformed one is refused here like any other field.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use serde::Deserialize;

use super::fallback::struct_to_json;
use super::{At, FieldError, FieldResult};

pub(crate) const METADATA_KEY: &str = "meshctl.concurrency";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    /// A protobuf JSON duration, e.g. "0.25s".
    queue_timeout: String,
}

/// The queue timeout in a cluster's metadata; None when it has none.
pub(crate) fn queue_timeout(metadata: Option<&Metadata>) -> FieldResult<Option<Duration>> {
    let Some(found) = metadata.and_then(|m| m.filter_metadata.get(METADATA_KEY)) else { return Ok(None) };
    let at = format!("filter_metadata[{METADATA_KEY:?}]");
    let wire: Wire = serde_json::from_value(struct_to_json(found)).map_err(|e| FieldError::new("", e.to_string())).at(&at)?;
    let seconds = wire
        .queue_timeout
        .strip_suffix('s')
        .and_then(|number| number.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0 && *seconds <= 86_400.0)
        .ok_or_else(|| FieldError::new("queue_timeout", format!("{:?} is not a duration in seconds between 0 and 1 day, e.g. \"0.25s\"", wire.queue_timeout)))
        .at(&at)?;
    Ok(Some(Duration::from_secs_f64(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

    fn metadata(field: &str, value: &str) -> Metadata {
        let mut fields = std::collections::HashMap::new();
        fields.insert(field.to_string(), Value { kind: Some(Kind::StringValue(value.to_string())) });
        let mut metadata = Metadata::default();
        metadata.filter_metadata.insert(METADATA_KEY.to_string(), Struct { fields: fields.into_iter().collect() });
        metadata
    }

    #[test]
    fn a_queue_timeout_is_read_and_bad_ones_are_refused_by_field() {
        assert_eq!(queue_timeout(None).unwrap(), None);
        assert_eq!(queue_timeout(Some(&metadata("queue_timeout", "0.25s"))).unwrap(), Some(Duration::from_millis(250)));
        for bad in ["0s", "-1s", "soon", "1", "NaNs"] {
            let error = queue_timeout(Some(&metadata("queue_timeout", bad))).unwrap_err().into_config_error("Cluster \"c\"").to_string();
            assert!(error.contains("queue_timeout"), "{bad}: {error}");
        }
        let error = queue_timeout(Some(&metadata("queue_timeot", "1s"))).unwrap_err().into_config_error("Cluster \"c\"").to_string();
        assert!(error.contains("unknown field"), "{error}");
    }
}
