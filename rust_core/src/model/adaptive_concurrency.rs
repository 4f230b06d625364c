//! Envoy's adaptive concurrency filter (envoy.filters.http.adaptive_concurrency) as configured:
//! whether it runs, what a shed request is answered, and the gradient controller it admits through.

use http::StatusCode;
use serde::Serialize;

use crate::policy::adaptive_concurrency::{GradientController, GradientSettings};

#[derive(Debug, Serialize)]
pub struct AdaptiveConcurrency {
    /// `enabled`'s default_value (Envoy's runtime feature flag; meshctl has no runtime): false
    /// passes every request through untouched.
    pub enabled: bool,
    #[serde(serialize_with = "serialize_status")]
    pub limit_exceeded_status: StatusCode,
    pub gradient: GradientSettings,
    /// Lives with this config: a new config starts measuring again, as Envoy's does.
    #[serde(skip)]
    pub controller: GradientController,
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}
