//! PyO3 bindings for the engine (`meshctl._core`): type conversion, error mapping and releasing
//! the GIL around every call that can block. No logic lives here.

use std::sync::Mutex;
use std::time::Duration;

use meshctl_engine::engine::StartError;
use meshctl_engine::{xds, Engine as RustEngine, EngineOptions};
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

create_exception!(_core, ConfigError, PyValueError, "A bootstrap or xDS resource was refused.");

fn config_error(error: meshctl_engine::ConfigError) -> PyErr {
    ConfigError::new_err(error.to_string())
}

#[pyfunction]
fn validate_bootstrap(py: Python<'_>, bootstrap: Vec<u8>) -> PyResult<()> {
    py.detach(|| {
        let metrics = meshctl_engine::telemetry::metrics::Metrics::default();
        let secrets = meshctl_engine::model::secret::SecretRegistry::default();
        xds::decode_bootstrap(&bootstrap, &metrics, &secrets).map(|_| ())
    })
    .map_err(config_error)
}

#[pyfunction]
fn weighted_pick(weights: Vec<u64>, draw: u64) -> PyResult<usize> {
    let cumulative = meshctl_engine::model::route::cumulative_weights(weights);
    let total = cumulative.last().copied().unwrap_or(0);
    if draw >= total {
        return Err(PyValueError::new_err(format!("draw {draw} is not below the weights' sum {total}")));
    }
    Ok(meshctl_engine::model::route::pick_index(&cumulative, draw))
}

#[pyclass(frozen, module = "meshctl._core")]
struct Engine {
    inner: Mutex<Option<RustEngine>>,
}

impl Engine {
    fn with<T>(&self, f: impl FnOnce(&RustEngine) -> T) -> PyResult<T> {
        let guard = self.inner.lock().map_err(|_| PyRuntimeError::new_err("engine lock poisoned"))?;
        guard.as_ref().map(f).ok_or_else(|| PyRuntimeError::new_err("the engine has been stopped"))
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (bootstrap, *, worker_threads = 1, istio_metrics_expiry = 600.0, istio_metrics_max_series = 10_000))]
    fn new(py: Python<'_>, bootstrap: Vec<u8>, worker_threads: usize, istio_metrics_expiry: f64, istio_metrics_max_series: usize) -> PyResult<Self> {
        if !(istio_metrics_expiry.is_finite() && istio_metrics_expiry > 0.0) {
            return Err(PyValueError::new_err(format!("istio_metrics_expiry: {istio_metrics_expiry} is not a positive number of seconds")));
        }
        if istio_metrics_max_series == 0 {
            return Err(PyValueError::new_err("istio_metrics_max_series: must be at least 1"));
        }
        let options = EngineOptions {
            worker_threads,
            istio_metrics_expiry: std::time::Duration::from_secs_f64(istio_metrics_expiry),
            istio_metrics_max_series,
        };
        let engine = py
            .detach(|| RustEngine::start(&bootstrap, options))
            .map_err(|e| match e {
                StartError::Config(c) => config_error(c),
                io @ StartError::Io { .. } => PyOSError::new_err(io.to_string()),
            })?;
        Ok(Engine { inner: Mutex::new(Some(engine)) })
    }

    fn apply(&self, py: Python<'_>, type_url: String, resources: Vec<Vec<u8>>) -> PyResult<()> {
        py.detach(|| self.with(|e| e.apply(&type_url, &resources)))?.map_err(config_error)
    }

    fn remove(&self, py: Python<'_>, type_url: String, names: Vec<String>) -> PyResult<()> {
        py.detach(|| self.with(|e| e.remove(&type_url, &names)))?.map_err(config_error)
    }

    fn stats_prometheus(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.with(|e| e.stats_prometheus()))
    }

    /// (stat_prefix, descriptor entries, allowed, limited) per local rate limit descriptor.
    #[allow(clippy::type_complexity)]
    fn local_rate_limit_counts(&self, py: Python<'_>) -> PyResult<Vec<(String, Vec<(String, String)>, u64, u64)>> {
        py.detach(|| {
            self.with(|e| {
                e.local_rate_limit_descriptor_counts()
                    .into_iter()
                    .map(|c| (c.stat_prefix, c.descriptor, c.allowed, c.limited))
                    .collect()
            })
        })
    }

    fn config_dump(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.with(|e| e.config_dump()))
    }

    fn admin_address(&self) -> PyResult<Option<(String, u16)>> {
        self.with(|e| e.admin_address().map(|a| (a.ip().to_string(), a.port())))
    }

    fn listener_addresses(&self) -> PyResult<std::collections::HashMap<String, (String, u16)>> {
        self.with(|e| {
            e.listener_addresses().into_iter().map(|(name, a)| (name, (a.ip().to_string(), a.port()))).collect()
        })
    }

    #[pyo3(signature = (timeout = 5.0))]
    fn drain(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(PyValueError::new_err(format!("timeout must be a non-negative number of seconds, got {timeout}")));
        }
        py.detach(|| self.with(|e| e.drain(Duration::from_secs_f64(timeout))))
    }

    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let engine = self.inner.lock().map_err(|_| PyRuntimeError::new_err("engine lock poisoned"))?.take();
        // Dropping the engine joins its runtime threads: do it without the GIL.
        py.detach(move || drop(engine));
        Ok(())
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ConfigError", m.py().get_type::<ConfigError>())?;
    m.add("LISTENER_TYPE", xds::LISTENER_TYPE)?;
    m.add("ROUTE_CONFIGURATION_TYPE", xds::ROUTE_CONFIGURATION_TYPE)?;
    m.add("CLUSTER_TYPE", xds::CLUSTER_TYPE)?;
    m.add("CLUSTER_LOAD_ASSIGNMENT_TYPE", xds::CLUSTER_LOAD_ASSIGNMENT_TYPE)?;
    m.add("SECRET_TYPE", xds::SECRET_TYPE)?;
    m.add_function(wrap_pyfunction!(validate_bootstrap, m)?)?;
    m.add_function(wrap_pyfunction!(weighted_pick, m)?)?;
    m.add_class::<Engine>()?;
    Ok(())
}
