//! Istio's standard metrics (istio_requests_total and friends): one series per label set, found
//! by a cheap hash of pointers' precomputed hashes and small integers; series not updated for the
//! expiry time are dropped, and their number is capped (the samples the cap refuses are counted).

use std::collections::HashMap;
use std::fmt::Write;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::access_log::ResponseFlags;
use super::metrics::BUCKETS_MS;
use crate::model::workload::{Reporter, ServiceMetadata, WorkloadMetadata};

/// A series not updated for this long is dropped (Istio's concern in istio/istio#21377).
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(600);
/// At most this many series of each kind (HTTP, TCP).
pub const DEFAULT_MAX_SERIES: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

/// Istio's connection_security_policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    MutualTls,
    None,
    /// What a source reporter says: it cannot know how the callee saw the connection.
    Unknown,
}

impl SecurityPolicy {
    fn label(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
            SecurityPolicy::Unknown => "unknown",
        }
    }
}

/// One label set. Workload and service metadata are compared by their precomputed hashes first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesKey {
    pub reporter: Reporter,
    pub source: Arc<WorkloadMetadata>,
    pub destination: Arc<WorkloadMetadata>,
    pub service: Arc<ServiceMetadata>,
    pub protocol: Protocol,
    /// 0: no response.
    pub response_code: u16,
    /// None for anything but gRPC (an empty label).
    pub grpc_status: Option<u32>,
    pub flags: ResponseFlags,
    pub security: SecurityPolicy,
}

impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.source.precomputed_hash());
        state.write_u64(self.destination.precomputed_hash());
        state.write_u64(self.service.precomputed_hash());
        let small = (self.reporter as u64)
            | (self.protocol as u64) << 2
            | (self.security as u64) << 4
            | (self.response_code as u64) << 8
            | (self.grpc_status.map_or(0xffff, |s| s as u64 & 0xffff)) << 24
            | (self.flags.bits() as u64) << 40;
        state.write_u64(small);
    }
}

/// Mixes the few u64s a SeriesKey writes (already good hashes, or small integers): SipHash's
/// DoS resistance buys nothing here, its cost would be paid per request.
#[derive(Default)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(*byte as u64);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type SeriesMap<T> = HashMap<SeriesKey, Arc<T>, BuildHasherDefault<MixHasher>>;

/// A histogram of plain values on Envoy's default buckets (Istio's byte-size histograms use them too).
#[derive(Debug, Default)]
pub struct ValueHistogram {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    /// In thousandths, so that durations keep their sub-millisecond part.
    sum_milli: AtomicU64,
}

impl ValueHistogram {
    /// `value` in thousandths of the unit (microseconds for a duration in ms, millibytes...).
    fn record_milli(&self, value_milli: u64) {
        let value = value_milli as f64 / 1000.0;
        if let Some(i) = BUCKETS_MS.iter().position(|&bound| value <= bound) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_milli.fetch_add(value_milli, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_MS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_milli.load(Relaxed) as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// What one finished HTTP request adds to its series.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpSample {
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub request_messages: u64,
    pub response_messages: u64,
}

#[derive(Debug)]
pub struct HttpSeries {
    /// The label set, rendered once when the series is made.
    labels: String,
    /// Milliseconds since the registry's epoch.
    last_update: AtomicU64,
    requests: AtomicU64,
    duration: ValueHistogram,
    request_bytes: ValueHistogram,
    response_bytes: ValueHistogram,
    request_messages: AtomicU64,
    response_messages: AtomicU64,
}

/// What a TCP connection adds: bytes as they pass, opened and closed once each.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpSample {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub opened: u64,
    pub closed: u64,
}

#[derive(Debug)]
pub struct TcpSeries {
    labels: String,
    last_update: AtomicU64,
    sent_bytes: AtomicU64,
    received_bytes: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
}

trait Series {
    fn new(labels: String, now: u64) -> Self;
    fn last_update(&self) -> &AtomicU64;
}

impl Series for HttpSeries {
    fn new(labels: String, now: u64) -> Self {
        HttpSeries {
            labels,
            last_update: AtomicU64::new(now),
            requests: AtomicU64::new(0),
            duration: ValueHistogram::default(),
            request_bytes: ValueHistogram::default(),
            response_bytes: ValueHistogram::default(),
            request_messages: AtomicU64::new(0),
            response_messages: AtomicU64::new(0),
        }
    }

    fn last_update(&self) -> &AtomicU64 {
        &self.last_update
    }
}

impl Series for TcpSeries {
    fn new(labels: String, now: u64) -> Self {
        TcpSeries {
            labels,
            last_update: AtomicU64::new(now),
            sent_bytes: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
        }
    }

    fn last_update(&self) -> &AtomicU64 {
        &self.last_update
    }
}

/// The engine's Istio series. Requests take a read lock (shared by every worker, never waited
/// on unless a new label set is being added) and update atomics.
#[derive(Debug)]
pub struct IstioMetrics {
    epoch: Instant,
    expiry_ms: AtomicU64,
    max_series: AtomicUsize,
    http: RwLock<SeriesMap<HttpSeries>>,
    tcp: RwLock<SeriesMap<TcpSeries>>,
    /// Samples dropped because their series would have exceeded the cap.
    overflow: AtomicU64,
}

impl Default for IstioMetrics {
    fn default() -> Self {
        IstioMetrics {
            epoch: Instant::now(),
            expiry_ms: AtomicU64::new(DEFAULT_EXPIRY.as_millis() as u64),
            max_series: AtomicUsize::new(DEFAULT_MAX_SERIES),
            http: RwLock::default(),
            tcp: RwLock::default(),
            overflow: AtomicU64::new(0),
        }
    }
}

impl IstioMetrics {
    /// The sidecar's settings (`meshctl run --istio-metrics-expiry/--istio-metrics-max-series`).
    pub fn configure(&self, expiry: Duration, max_series: usize) {
        self.expiry_ms.store(expiry.as_millis() as u64, Relaxed);
        self.max_series.store(max_series, Relaxed);
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn millis_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// `at`: when the request ended (read once by the caller, who also timed the request).
    pub fn record_http(&self, key: &SeriesKey, sample: HttpSample, at: Instant) {
        let Some(series) = self.series(&self.http, key, self.millis_at(at)) else { return };
        series.requests.fetch_add(1, Relaxed);
        series.duration.record_milli(sample.duration.as_micros() as u64);
        series.request_bytes.record_milli(sample.request_bytes.saturating_mul(1000));
        series.response_bytes.record_milli(sample.response_bytes.saturating_mul(1000));
        if key.protocol == Protocol::Grpc {
            series.request_messages.fetch_add(sample.request_messages, Relaxed);
            series.response_messages.fetch_add(sample.response_messages, Relaxed);
        }
    }

    pub fn record_tcp(&self, key: &SeriesKey, sample: TcpSample) {
        let Some(series) = self.series(&self.tcp, key, self.now()) else { return };
        series.sent_bytes.fetch_add(sample.sent_bytes, Relaxed);
        series.received_bytes.fetch_add(sample.received_bytes, Relaxed);
        series.opened.fetch_add(sample.opened, Relaxed);
        series.closed.fetch_add(sample.closed, Relaxed);
    }

    /// The series of `key`, made if new; None when the cap refuses a new one (counted).
    fn series<T: Series>(&self, map: &RwLock<SeriesMap<T>>, key: &SeriesKey, now: u64) -> Option<Arc<T>> {
        if let Some(found) = map.read().unwrap().get(key) {
            found.last_update().store(now, Relaxed);
            return Some(found.clone());
        }
        let mut series = map.write().unwrap();
        if let Some(found) = series.get(key) {
            found.last_update().store(now, Relaxed);
            return Some(found.clone());
        }
        let max = self.max_series.load(Relaxed);
        if series.len() >= max {
            self.expire(&mut series, now);
            if series.len() >= max {
                self.overflow.fetch_add(1, Relaxed);
                return None;
            }
        }
        let made = Arc::new(T::new(labels(key), now));
        series.insert(key.clone(), made.clone());
        Some(made)
    }

    fn expire<T: Series>(&self, series: &mut SeriesMap<T>, now: u64) {
        let expiry = self.expiry_ms.load(Relaxed);
        series.retain(|_, s| now.saturating_sub(s.last_update().load(Relaxed)) < expiry);
    }

    pub fn render(&self, out: &mut String) {
        let now = self.now();
        self.expire(&mut self.http.write().unwrap(), now);
        self.expire(&mut self.tcp.write().unwrap(), now);
        let http: Vec<Arc<HttpSeries>> = self.http.read().unwrap().values().cloned().collect();
        let tcp: Vec<Arc<TcpSeries>> = self.tcp.read().unwrap().values().cloned().collect();
        if !http.is_empty() {
            out.push_str("# TYPE istio_requests_total counter\n");
            for s in &http {
                let _ = writeln!(out, "istio_requests_total{{{}}} {}", s.labels, s.requests.load(Relaxed));
            }
            for (name, get) in [
                ("istio_request_duration_milliseconds", (|s: &HttpSeries| &s.duration) as fn(&HttpSeries) -> &ValueHistogram),
                ("istio_request_bytes", |s| &s.request_bytes),
                ("istio_response_bytes", |s| &s.response_bytes),
            ] {
                let _ = writeln!(out, "# TYPE {name} histogram");
                for s in &http {
                    get(s).render(out, name, &s.labels);
                }
            }
            let grpc: Vec<&Arc<HttpSeries>> = http.iter().filter(|s| s.labels.contains("request_protocol=\"grpc\"")).collect();
            if !grpc.is_empty() {
                for (name, get) in [
                    ("istio_request_messages_total", (|s: &HttpSeries| &s.request_messages) as fn(&HttpSeries) -> &AtomicU64),
                    ("istio_response_messages_total", |s| &s.response_messages),
                ] {
                    let _ = writeln!(out, "# TYPE {name} counter");
                    for s in &grpc {
                        let _ = writeln!(out, "{name}{{{}}} {}", s.labels, get(s).load(Relaxed));
                    }
                }
            }
        }
        if !tcp.is_empty() {
            for (name, get) in [
                ("istio_tcp_sent_bytes_total", (|s: &TcpSeries| &s.sent_bytes) as fn(&TcpSeries) -> &AtomicU64),
                ("istio_tcp_received_bytes_total", |s| &s.received_bytes),
                ("istio_tcp_connections_opened_total", |s| &s.opened),
                ("istio_tcp_connections_closed_total", |s| &s.closed),
            ] {
                let _ = writeln!(out, "# TYPE {name} counter");
                for s in &tcp {
                    let _ = writeln!(out, "{name}{{{}}} {}", s.labels, get(s).load(Relaxed));
                }
            }
        }
        out.push_str("# TYPE meshctl_istio_series gauge\n");
        let _ = writeln!(out, "meshctl_istio_series{{kind=\"http\"}} {}", http.len());
        let _ = writeln!(out, "meshctl_istio_series{{kind=\"tcp\"}} {}", tcp.len());
        out.push_str("# TYPE meshctl_istio_series_overflow_total counter\n");
        let _ = writeln!(out, "meshctl_istio_series_overflow_total {}", self.overflow.load(Relaxed));
    }
}

/// The label set in Istio's order (istio/proxy's istio_stats). TCP series have no response
/// code or gRPC status, as in Istio.
fn labels(key: &SeriesKey) -> String {
    let (s, d, service) = (&key.source, &key.destination, &key.service);
    let mut out = String::with_capacity(1024);
    let mut label = |name: &str, value: &str| {
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape(value));
    };
    label("reporter", key.reporter.label());
    label("source_workload", &s.workload);
    label("source_canonical_service", &s.canonical_service);
    label("source_canonical_revision", &s.canonical_revision);
    label("source_workload_namespace", &s.namespace);
    label("source_principal", &s.principal);
    label("source_app", &s.app);
    label("source_version", &s.version);
    label("source_cluster", &s.cluster);
    label("destination_workload", &d.workload);
    label("destination_workload_namespace", &d.namespace);
    label("destination_principal", &d.principal);
    label("destination_app", &d.app);
    label("destination_version", &d.version);
    label("destination_service", &service.host);
    label("destination_canonical_service", &d.canonical_service);
    label("destination_canonical_revision", &d.canonical_revision);
    label("destination_service_name", &service.name);
    label("destination_service_namespace", &service.namespace);
    label("destination_cluster", &d.cluster);
    label("request_protocol", key.protocol.label());
    if key.protocol != Protocol::Tcp {
        label("response_code", &key.response_code.to_string());
        label("grpc_response_status", &key.grpc_status.map(|s| s.to_string()).unwrap_or_default());
    }
    label("response_flags", &key.flags.to_string());
    label("connection_security_policy", key.security.label());
    out
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::resilience::ResponseFlag;

    fn key(code: u16) -> SeriesKey {
        SeriesKey {
            reporter: Reporter::Destination,
            source: Arc::new(WorkloadMetadata::new("web-v1", "shop", "spiffe://cluster.local/ns/shop/sa/web", "web", "v1", "web", "v1", "")),
            destination: Arc::new(WorkloadMetadata::new("cart-v2", "shop", "", "cart", "v2", "cart", "v2", "")),
            service: Arc::new(ServiceMetadata::new("cart.shop.svc.cluster.local", "cart", "shop")),
            protocol: Protocol::Http,
            response_code: code,
            grpc_status: None,
            flags: ResponseFlags::default(),
            security: SecurityPolicy::MutualTls,
        }
    }

    fn sample(ms: u64, bytes: u64) -> HttpSample {
        HttpSample { duration: Duration::from_millis(ms), request_bytes: 0, response_bytes: bytes, ..Default::default() }
    }

    #[test]
    fn equal_label_sets_from_different_objects_share_one_series() {
        let metrics = IstioMetrics::default();
        metrics.record_http(&key(200), sample(3, 100), Instant::now());
        metrics.record_http(&key(200), sample(7, 2000), Instant::now());
        let mut flagged = key(503);
        flagged.flags.insert(ResponseFlag::UpstreamConnectionFailure);
        metrics.record_http(&flagged, sample(1, 0), Instant::now());
        let mut out = String::new();
        metrics.render(&mut out);
        let expected = "istio_requests_total{reporter=\"destination\",source_workload=\"web-v1\",source_canonical_service=\"web\",\
source_canonical_revision=\"v1\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/web\",\
source_app=\"web\",source_version=\"v1\",source_cluster=\"unknown\",destination_workload=\"cart-v2\",destination_workload_namespace=\"shop\",\
destination_principal=\"unknown\",destination_app=\"cart\",destination_version=\"v2\",destination_service=\"cart.shop.svc.cluster.local\",\
destination_canonical_service=\"cart\",destination_canonical_revision=\"v2\",destination_service_name=\"cart\",\
destination_service_namespace=\"shop\",destination_cluster=\"unknown\",request_protocol=\"http\",response_code=\"200\",\
grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 2";
        assert!(out.contains(expected), "{out}");
        assert!(out.contains("response_code=\"503\",grpc_response_status=\"\",response_flags=\"UF\""), "{out}");
        // 3 ms and 7 ms: both within le=10, one within le=5; the sum keeps both.
        assert!(out.contains("response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\",le=\"5\"} 1"));
        assert!(out.contains("response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\",le=\"10\"} 2"));
        assert!(out.contains("istio_request_duration_milliseconds_sum{reporter=\"destination\""));
        assert!(out.contains("connection_security_policy=\"mutual_tls\"} 10\n"), "the duration sum is 10 ms: {out}");
        assert!(out.contains("istio_response_bytes_sum{") && out.contains("} 2100\n"));
        assert!(!out.contains("istio_request_messages_total"), "no gRPC series, no message counters");
        assert!(out.contains("meshctl_istio_series{kind=\"http\"} 2"));
    }

    #[test]
    fn the_cap_drops_and_counts_and_expired_series_make_room() {
        let metrics = IstioMetrics::default();
        metrics.configure(Duration::from_millis(50), 2);
        metrics.record_http(&key(200), sample(1, 1), Instant::now());
        metrics.record_http(&key(201), sample(1, 1), Instant::now());
        metrics.record_http(&key(202), sample(1, 1), Instant::now());
        metrics.record_http(&key(200), sample(1, 1), Instant::now()); // an existing series still counts
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains("meshctl_istio_series_overflow_total 1"), "{out}");
        assert!(!out.contains("response_code=\"202\""));
        std::thread::sleep(Duration::from_millis(80));
        metrics.record_http(&key(202), sample(1, 1), Instant::now());
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains("response_code=\"202\""));
        assert!(!out.contains("response_code=\"200\""), "expired: {out}");
        assert!(out.contains("meshctl_istio_series{kind=\"http\"} 1"));
    }

    #[test]
    fn tcp_series_have_no_response_code() {
        let metrics = IstioMetrics::default();
        let mut tcp = key(0);
        tcp.protocol = Protocol::Tcp;
        metrics.record_tcp(&tcp, TcpSample { sent_bytes: 5, received_bytes: 7, opened: 1, closed: 0 });
        metrics.record_tcp(&tcp, TcpSample { closed: 1, ..Default::default() });
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains("request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 5"), "{out}");
        assert!(out.contains("istio_tcp_received_bytes_total{") && out.contains("istio_tcp_connections_closed_total{"));
        assert!(!out.contains("istio_requests_total"));
    }
}
