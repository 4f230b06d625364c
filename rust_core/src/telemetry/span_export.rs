//! Spans leave the request path here: a bounded queue per collector, drained by one task that
//! sends OTLP Export calls through the collector's cluster in batches (512 spans or 5 s).
//! A full queue drops the span (counted); a failed call loses its batch (counted); neither ever
//! waits on, or fails, a request.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::uri::Authority;
use prost::Message;
use tokio::sync::mpsc;

use super::otlp;
use super::span::FinishedSpan;
use crate::http::grpc_unary::{self, frame};
use crate::http::proxy::HttpContext;
use crate::model::tracing::CollectorTarget;

/// Spans waiting for export, per collector (OpenTelemetry's batch processor default); beyond
/// it spans are dropped, so a stalled collector holds at most this many in memory.
pub const QUEUE_CAPACITY: usize = 2048;
/// Spans per Export call, at most.
pub const MAX_BATCH: usize = 512;
/// How long a span waits for its batch to fill before the batch is sent anyway.
pub const BATCH_DELAY: Duration = Duration::from_secs(5);

pub struct SpanExporter {
    pub target: CollectorTarget,
    sender: mpsc::Sender<FinishedSpan>,
    /// Taken by the export task when the first span arrives (the task needs a runtime and a
    /// connection context to call the cluster, which config decoding has neither of).
    receiver: Mutex<Option<mpsc::Receiver<FinishedSpan>>>,
    /// Set once the task runs, so that a span's submit takes no lock.
    started: AtomicBool,
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
}

impl std::fmt::Debug for SpanExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanExporter").field("target", &self.target).finish_non_exhaustive()
    }
}

fn exporters() -> &'static Mutex<HashMap<CollectorTarget, Arc<SpanExporter>>> {
    static EXPORTERS: OnceLock<Mutex<HashMap<CollectorTarget, Arc<SpanExporter>>>> = OnceLock::new();
    EXPORTERS.get_or_init(Default::default)
}

/// The exporter for `target`, made on first use and shared by every config that names it, so
/// a config update keeps its queue and counters.
pub fn exporter(target: CollectorTarget) -> Arc<SpanExporter> {
    let mut all = exporters().lock().unwrap();
    all.entry(target.clone())
        .or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
            Arc::new(SpanExporter {
                target,
                sender,
                receiver: Mutex::new(Some(receiver)),
                started: AtomicBool::new(false),
                exported: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            })
        })
        .clone()
}

impl SpanExporter {
    /// Queues `span` without waiting; drops it (counted) when the queue is full.
    pub fn submit(self: &Arc<Self>, context: &Arc<HttpContext>, span: FinishedSpan) {
        self.start(context);
        if self.sender.try_send(span).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    fn start(self: &Arc<Self>, context: &Arc<HttpContext>) {
        if self.started.load(Relaxed) {
            return;
        }
        let mut slot = self.receiver.lock().unwrap();
        if slot.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let receiver = slot.take().expect("checked above");
        self.started.store(true, Relaxed);
        runtime.spawn(self.clone().run(receiver, context.clone()));
    }

    async fn run(self: Arc<Self>, mut receiver: mpsc::Receiver<FinishedSpan>, context: Arc<HttpContext>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut healthy = true;
        loop {
            if receiver.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < MAX_BATCH {
                let room = MAX_BATCH - batch.len();
                match tokio::time::timeout_at(deadline, receiver.recv_many(&mut batch, room)).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let outcome = self.export(&context, &batch).await;
            let count = batch.len() as u64;
            batch.clear();
            match outcome {
                Ok(rejected) => {
                    self.exported.fetch_add(count - rejected.min(count), Relaxed);
                    self.failed.fetch_add(rejected.min(count), Relaxed);
                    healthy = true;
                }
                Err(why) => {
                    self.failed.fetch_add(count, Relaxed);
                    // Said once per outage, not once per batch.
                    if healthy {
                        eprintln!("meshctl: tracing: exporting {count} spans to {} failed: {why}", self.target);
                    }
                    healthy = false;
                }
            }
        }
    }

    /// One Export call: Ok(the spans the collector rejected) or why the call failed.
    async fn export(&self, context: &Arc<HttpContext>, batch: &[FinishedSpan]) -> Result<u64, String> {
        let request = export_request(&self.target.service_name, batch);
        let authority = Authority::try_from(self.target.authority.as_str()).map_err(|e| format!("authority: {e}"))?;
        let target = grpc_unary::Target { cluster: &self.target.cluster, authority: &authority, path: otlp::EXPORT_PATH };
        let answer = grpc_unary::call(context, target, &[], frame(&request), self.target.timeout).await.map_err(|e| e.to_string())?;
        let response = otlp::ExportTraceServiceResponse::decode(answer).map_err(|e| format!("answer: {e}"))?;
        Ok(response.partial_success.map_or(0, |partial| partial.rejected_spans.max(0) as u64))
    }
}

pub fn export_request(service_name: &str, batch: &[FinishedSpan]) -> otlp::ExportTraceServiceRequest {
    otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(otlp::Resource { attributes: vec![otlp::KeyValue::string("service.name", service_name)] }),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope { name: "meshctl".into(), version: env!("CARGO_PKG_VERSION").into() }),
                spans: batch.iter().map(FinishedSpan::to_otlp).collect(),
            }],
        }],
    }
}

/// meshctl_tracing_spans_{exported,failed,dropped}_total, per collector cluster and service.
pub fn render_prometheus(out: &mut String) {
    let all = exporters().lock().unwrap();
    let mut targets: Vec<&CollectorTarget> = all.keys().collect();
    targets.sort_by(|a, b| (&a.cluster, &a.service_name).cmp(&(&b.cluster, &b.service_name)));
    let escape = |value: &str| value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    for (metric, get) in [
        ("meshctl_tracing_spans_exported_total", (|e: &SpanExporter| e.exported.load(Relaxed)) as fn(&SpanExporter) -> u64),
        ("meshctl_tracing_spans_failed_total", |e| e.failed.load(Relaxed)),
        ("meshctl_tracing_spans_dropped_total", |e| e.dropped.load(Relaxed)),
    ] {
        let _ = writeln!(out, "# TYPE {metric} counter");
        for target in &targets {
            let _ = writeln!(
                out,
                "{metric}{{cluster=\"{}\",service=\"{}\"}} {}",
                escape(&target.cluster),
                escape(&target.service_name),
                get(&all[*target])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tracing::SpanKind;
    use std::time::SystemTime;

    fn target(cluster: &str) -> CollectorTarget {
        CollectorTarget { cluster: cluster.into(), authority: "collector".into(), timeout: Duration::from_secs(1), service_name: "svc.ns".into() }
    }

    #[test]
    fn the_same_target_shares_one_exporter() {
        assert!(Arc::ptr_eq(&exporter(target("same")), &exporter(target("same"))));
        assert!(!Arc::ptr_eq(&exporter(target("same")), &exporter(target("other"))));
    }

    #[test]
    fn a_batch_is_one_resource_named_for_the_service() {
        let span = FinishedSpan {
            trace_id: 1,
            span_id: 2,
            parent_span_id: None,
            tracestate: None,
            name: "x".into(),
            kind: SpanKind::Server,
            start: SystemTime::now(),
            duration: Duration::ZERO,
            tags: vec![],
            error: false,
        };
        let request = export_request("reviews.default", &[span.clone(), span]);
        let resource = &request.resource_spans[0];
        assert_eq!(resource.resource.as_ref().unwrap().attributes[0], otlp::KeyValue::string("service.name", "reviews.default"));
        assert_eq!(resource.scope_spans[0].spans.len(), 2);
    }
}
