//! Access logs: Envoy's command operators, formatted once a request ends and handed to a
//! writer thread through a bounded channel (a full channel drops the line and counts it).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, Method, Version};
use serde::Serialize;

use super::resilience::ResponseFlag;

/// Lines a sink holds before the request path drops them rather than wait.
const CHANNEL_CAPACITY: usize = 16 * 1024;
/// Lines the writer takes from the channel before it flushes.
const WRITE_BATCH: usize = 256;

/// Envoy's default access log format (used when a logger names none).
pub const ENVOY_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \
\"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// One access logger of a connection manager: what to write, where, and for which requests.
#[derive(Debug, Serialize)]
pub struct AccessLog {
    pub format: LogFormat,
    #[serde(serialize_with = "sink_path")]
    pub sink: Arc<Sink>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<StatusFilter>,
}

fn sink_path<S: serde::Serializer>(sink: &Arc<Sink>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&sink.path)
}

/// Envoy's status_code_filter: log only requests whose status compares so with `value`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StatusFilter {
    pub op: Comparison,
    pub value: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    Eq,
    Ge,
    Le,
}

impl StatusFilter {
    fn admits(&self, status: u16) -> bool {
        match self.op {
            Comparison::Eq => status == self.value,
            Comparison::Ge => status >= self.value,
            Comparison::Le => status <= self.value,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogFormat {
    /// A text line (the format string's own newline, if any, ends it).
    Text { pieces: Vec<Piece> },
    /// One JSON object per line, its keys in the configured order.
    Json { fields: Vec<(String, Vec<Piece>)> },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Piece {
    Literal(String),
    Operator(Operator),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    StartTime,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    RequestedServerName,
    RouteName,
    /// %REQ(X?Y):len%: header X, else Y (pseudo-headers :method, :path, :authority, :scheme).
    Request { header: HeaderChoice, max_len: Option<usize> },
    /// %RESP(X?Y):len%.
    Response { header: HeaderChoice, max_len: Option<usize> },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderChoice {
    pub main: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// Parses an Envoy format string; Err names the operator meshctl does not support.
pub fn parse_format(format: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = format;
    while let Some(at) = rest.find('%') {
        literal.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        // `%%` is a literal percent sign.
        if let Some(tail) = after.strip_prefix('%') {
            literal.push('%');
            rest = tail;
            continue;
        }
        let end = after.find('%').ok_or_else(|| format!("unterminated command operator at {:?}", &rest[at..]))?;
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut literal)));
        }
        pieces.push(Piece::Operator(parse_operator(&after[..end])?));
        rest = &after[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

fn parse_operator(text: &str) -> Result<Operator, String> {
    let simple = match text {
        "START_TIME" => Some(Operator::StartTime),
        "PROTOCOL" => Some(Operator::Protocol),
        "RESPONSE_CODE" => Some(Operator::ResponseCode),
        "RESPONSE_FLAGS" => Some(Operator::ResponseFlags),
        "RESPONSE_CODE_DETAILS" => Some(Operator::ResponseCodeDetails),
        "BYTES_RECEIVED" => Some(Operator::BytesReceived),
        "BYTES_SENT" => Some(Operator::BytesSent),
        "DURATION" => Some(Operator::Duration),
        "UPSTREAM_HOST" => Some(Operator::UpstreamHost),
        "UPSTREAM_CLUSTER" => Some(Operator::UpstreamCluster),
        "DOWNSTREAM_REMOTE_ADDRESS" => Some(Operator::DownstreamRemoteAddress),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Some(Operator::DownstreamRemoteAddressWithoutPort),
        "REQUESTED_SERVER_NAME" => Some(Operator::RequestedServerName),
        "ROUTE_NAME" => Some(Operator::RouteName),
        _ => None,
    };
    if let Some(operator) = simple {
        return Ok(operator);
    }
    let unsupported = || format!("command operator %{text}% is not supported by meshctl yet");
    let (response, inner) = if let Some(inner) = text.strip_prefix("REQ(") {
        (false, inner)
    } else if let Some(inner) = text.strip_prefix("RESP(") {
        (true, inner)
    } else {
        return Err(unsupported());
    };
    let (names, length) = inner.split_once(')').ok_or_else(|| format!("%{text}%: missing ')'"))?;
    let max_len = match length {
        "" => None,
        _ => {
            let digits = length.strip_prefix(':').ok_or_else(unsupported)?;
            Some(digits.parse::<usize>().map_err(|_| format!("%{text}%: {digits:?} is not a length"))?)
        }
    };
    let (main, fallback) = match names.split_once('?') {
        Some((main, fallback)) => (main, Some(fallback)),
        None => (names, None),
    };
    let checked = |name: &str| -> Result<String, String> {
        let lower = name.to_ascii_lowercase();
        let valid = match lower.strip_prefix(':') {
            Some(pseudo) => matches!(pseudo, "method" | "path" | "authority" | "scheme") && !response,
            None => HeaderName::from_bytes(lower.as_bytes()).is_ok(),
        };
        if valid {
            Ok(lower)
        } else {
            Err(format!("%{text}%: {name:?} is not a header meshctl can log"))
        }
    };
    let header = HeaderChoice { main: checked(main)?, fallback: fallback.map(checked).transpose()? };
    Ok(if response { Operator::Response { header, max_len } } else { Operator::Request { header, max_len } })
}

/// What a request left for its log line, gathered only when the connection manager logs.
#[derive(Debug)]
pub struct RequestRecord {
    pub start_time: SystemTime,
    pub started: Instant,
    pub method: Method,
    /// The request target as the client sent it.
    pub path: String,
    pub authority: Option<String>,
    pub scheme: &'static str,
    pub version: Version,
    pub request_headers: HeaderMap,
    pub downstream_remote: SocketAddr,
    pub requested_server_name: Option<String>,
    pub response: ResponseRecord,
}

/// What the response side adds: status, flags, the upstream, bytes.
#[derive(Debug, Default)]
pub struct ResponseRecord {
    pub status: u16,
    pub headers: HeaderMap,
    pub flags: ResponseFlags,
    pub details: &'static str,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub route_name: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
}

/// The response flags a request collected, in Envoy's order when printed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    pub fn insert(&mut self, flag: ResponseFlag) {
        self.0 |= 1 << flag as u16;
    }

    pub fn contains(&self, flag: ResponseFlag) -> bool {
        self.0 & (1 << flag as u16) != 0
    }

    /// One bit per flag (a compact hash key for Istio's series).
    pub fn bits(&self) -> u16 {
        self.0
    }

    fn write(&self, out: &mut String) {
        if self.0 == 0 {
            out.push('-');
            return;
        }
        let mut first = true;
        for flag in ResponseFlag::ALL.iter().filter(|flag| self.contains(**flag)) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(flag.short_name());
        }
    }
}

/// Envoy's short flags joined by commas, `-` for none (as %RESPONSE_FLAGS% prints them).
impl std::fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        self.write(&mut out);
        f.write_str(&out)
    }
}

/// A local reply's cause, carried in the response's extensions to the access log (set only on
/// responses the proxy made itself, which are already the slow path).
#[derive(Debug, Clone, Copy)]
pub struct LocalReplyCause {
    pub flags: ResponseFlags,
    pub details: &'static str,
}

/// The cluster and endpoint a forwarded request went to (in the response's extensions, only
/// when the connection manager logs).
#[derive(Debug, Clone)]
pub struct UpstreamInfo {
    pub cluster: String,
    pub host: SocketAddr,
}

/// How one operator's value renders: absent, a number, or text.
enum Value<'a> {
    Absent,
    Number(u64),
    Text(std::borrow::Cow<'a, str>),
}

fn value<'a>(operator: &Operator, record: &'a RequestRecord) -> Value<'a> {
    use std::borrow::Cow;
    let response = &record.response;
    let text = |s: &'a str| Value::Text(Cow::Borrowed(s));
    let owned = |s: String| Value::Text(Cow::Owned(s));
    match operator {
        Operator::StartTime => owned(start_time(record.start_time)),
        Operator::Protocol => text(match record.version {
            Version::HTTP_09 => "HTTP/0.9",
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_11 => "HTTP/1.1",
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_3 => "HTTP/3",
            _ => return Value::Absent,
        }),
        // Envoy logs 0 for a request that got no response.
        Operator::ResponseCode => Value::Number(response.status.into()),
        Operator::ResponseFlags => {
            let mut out = String::new();
            response.flags.write(&mut out);
            owned(out)
        }
        Operator::ResponseCodeDetails if response.details.is_empty() => Value::Absent,
        Operator::ResponseCodeDetails => text(response.details),
        Operator::BytesReceived => Value::Number(response.bytes_received),
        Operator::BytesSent => Value::Number(response.bytes_sent),
        Operator::Duration => Value::Number(response.duration.as_millis() as u64),
        Operator::UpstreamHost => response.upstream_host.map_or(Value::Absent, |host| owned(host.to_string())),
        Operator::UpstreamCluster => response.upstream_cluster.as_deref().map_or(Value::Absent, text),
        Operator::DownstreamRemoteAddress => owned(record.downstream_remote.to_string()),
        Operator::DownstreamRemoteAddressWithoutPort => owned(record.downstream_remote.ip().to_string()),
        Operator::RequestedServerName => record.requested_server_name.as_deref().map_or(Value::Absent, text),
        Operator::RouteName => response.route_name.as_deref().filter(|n| !n.is_empty()).map_or(Value::Absent, text),
        Operator::Request { header, max_len } => {
            let found = request_header(record, &header.main).or_else(|| header.fallback.as_deref().and_then(|h| request_header(record, h)));
            truncated(found, *max_len)
        }
        Operator::Response { header, max_len } => {
            let get = |name: &str| response.headers.get(name).and_then(|v| v.to_str().ok());
            let found = get(&header.main).or_else(|| header.fallback.as_deref().and_then(get));
            truncated(found, *max_len)
        }
    }
}

fn request_header<'a>(record: &'a RequestRecord, name: &str) -> Option<&'a str> {
    match name {
        ":method" => Some(record.method.as_str()),
        ":path" => Some(record.path.as_str()),
        ":authority" => record.authority.as_deref(),
        ":scheme" => Some(record.scheme),
        _ => record.request_headers.get(name).and_then(|v| v.to_str().ok()),
    }
}

fn truncated(found: Option<&str>, max_len: Option<usize>) -> Value<'_> {
    match found {
        None => Value::Absent,
        Some(s) => {
            let end = max_len.map_or(s.len(), |n| (0..=n.min(s.len())).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0));
            Value::Text(std::borrow::Cow::Borrowed(&s[..end]))
        }
    }
}

/// Envoy's default %START_TIME%: UTC, milliseconds, e.g. 2026-12-07T17:50:07.123Z.
fn start_time(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        at.month() as u8,
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

fn write_pieces(out: &mut String, pieces: &[Piece], record: &RequestRecord) {
    for piece in pieces {
        match piece {
            Piece::Literal(text) => out.push_str(text),
            Piece::Operator(operator) => match value(operator, record) {
                Value::Absent => out.push('-'),
                Value::Number(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Text(text) => out.push_str(&text),
            },
        }
    }
}

impl LogFormat {
    /// One log line, newline-terminated for JSON (as Envoy's JSON formatter is).
    pub fn format(&self, record: &RequestRecord) -> String {
        let mut out = String::with_capacity(256);
        match self {
            LogFormat::Text { pieces } => write_pieces(&mut out, pieces, record),
            LogFormat::Json { fields } => {
                let mut object = serde_json::Map::with_capacity(fields.len());
                for (key, pieces) in fields {
                    // A value that is one operator keeps its type (numbers, null when absent), as
                    // Envoy's JSON formatter does; anything else is a string.
                    let json = match pieces.as_slice() {
                        [Piece::Operator(operator)] => match value(operator, record) {
                            Value::Absent => serde_json::Value::Null,
                            Value::Number(n) => n.into(),
                            Value::Text(text) => text.into_owned().into(),
                        },
                        _ => {
                            let mut text = String::new();
                            write_pieces(&mut text, pieces, record);
                            text.into()
                        }
                    };
                    object.insert(key.clone(), json);
                }
                out = serde_json::Value::Object(object).to_string();
                out.push('\n');
            }
        }
        out
    }
}

impl AccessLog {
    /// Formats and queues the request's line; never waits (a full channel drops it).
    pub fn log(&self, record: &RequestRecord) {
        if self.filter.is_some_and(|filter| !filter.admits(record.response.status)) {
            return;
        }
        self.sink.push(self.format.format(record));
    }
}

/// Where lines go: a file (or /dev/stdout, /dev/stderr), written by its own thread. One per path
/// per process, shared by every logger that names it, so a config update keeps its writer.
#[derive(Debug)]
pub struct Sink {
    pub path: String,
    sender: SyncSender<String>,
    written: AtomicU64,
    dropped: AtomicU64,
}

impl Sink {
    fn push(&self, line: String) {
        match self.sender.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

fn sinks() -> &'static Mutex<HashMap<String, Arc<Sink>>> {
    static SINKS: OnceLock<Mutex<HashMap<String, Arc<Sink>>>> = OnceLock::new();
    SINKS.get_or_init(Default::default)
}

/// The sink writing to `path`, made (file opened, writer started) on first use. Err: the file
/// cannot be opened for appending.
pub fn sink(path: &str) -> Result<Arc<Sink>, String> {
    let mut all = sinks().lock().unwrap();
    if let Some(sink) = all.get(path) {
        return Ok(sink.clone());
    }
    let output: Box<dyn std::io::Write + Send> = match path {
        "/dev/stdout" => Box::new(std::io::stdout()),
        "/dev/stderr" => Box::new(std::io::stderr()),
        _ => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open {path:?} for appending: {e}"))?,
        ),
    };
    let (sender, receiver) = sync_channel(CHANNEL_CAPACITY);
    let sink = Arc::new(Sink { path: path.to_string(), sender, written: AtomicU64::new(0), dropped: AtomicU64::new(0) });
    let for_writer = Arc::downgrade(&sink);
    std::thread::Builder::new()
        .name("meshctl-access-log".into())
        .spawn(move || write_lines(receiver, output, for_writer))
        .map_err(|e| format!("cannot start the access log writer: {e}"))?;
    all.insert(path.to_string(), sink.clone());
    Ok(sink)
}

/// The writer: waits for a line, then takes whatever else is queued (up to a batch) and writes
/// it in one buffered flush.
fn write_lines(receiver: Receiver<String>, output: Box<dyn std::io::Write + Send>, sink: std::sync::Weak<Sink>) {
    let mut output = std::io::BufWriter::with_capacity(64 * 1024, output);
    while let Ok(first) = receiver.recv() {
        let mut count: u64 = 1;
        let _ = output.write_all(first.as_bytes());
        while count < WRITE_BATCH as u64 {
            let Ok(line) = receiver.try_recv() else { break };
            let _ = output.write_all(line.as_bytes());
            count += 1;
        }
        let _ = output.flush();
        if let Some(sink) = sink.upgrade() {
            sink.written.fetch_add(count, Relaxed);
        }
    }
}

/// meshctl_access_log_written_total and meshctl_access_log_dropped_total, per sink path.
pub fn render_prometheus(out: &mut String) {
    let all = sinks().lock().unwrap();
    let mut paths: Vec<&String> = all.keys().collect();
    paths.sort();
    for (metric, get) in [
        ("meshctl_access_log_written_total", (|s: &Sink| s.written.load(Relaxed)) as fn(&Sink) -> u64),
        ("meshctl_access_log_dropped_total", |s| s.dropped.load(Relaxed)),
    ] {
        let _ = writeln!(out, "# TYPE {metric} counter");
        for path in &paths {
            let _ = writeln!(out, "{metric}{{path=\"{}\"}} {}", path.replace('\\', "\\\\").replace('"', "\\\""), get(&all[*path]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn record() -> RequestRecord {
        let mut request_headers = HeaderMap::new();
        request_headers.insert("user-agent", HeaderValue::from_static("curl/8.0"));
        request_headers.insert("x-request-id", HeaderValue::from_static("abc-123"));
        request_headers.insert("x-envoy-original-path", HeaderValue::from_static("/before"));
        let mut headers = HeaderMap::new();
        headers.insert("x-envoy-upstream-service-time", HeaderValue::from_static("7"));
        let mut flags = ResponseFlags::default();
        flags.insert(ResponseFlag::UpstreamConnectionFailure);
        flags.insert(ResponseFlag::UpstreamRetryLimitExceeded);
        RequestRecord {
            start_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_765_130_400_123),
            started: Instant::now(),
            method: Method::POST,
            path: "/items?x=1".into(),
            authority: Some("shop.local".into()),
            scheme: "http",
            version: Version::HTTP_11,
            request_headers,
            downstream_remote: "10.0.0.9:40000".parse().unwrap(),
            requested_server_name: None,
            response: ResponseRecord {
                status: 503,
                headers,
                flags,
                details: "upstream_reset_before_response_started{connection_failure}",
                upstream_host: Some("127.0.0.1:8080".parse().unwrap()),
                upstream_cluster: Some("shop".into()),
                route_name: Some("default".into()),
                bytes_received: 12,
                bytes_sent: 91,
                duration: Duration::from_millis(42),
            },
        }
    }

    fn text(format: &str) -> String {
        LogFormat::Text { pieces: parse_format(format).unwrap() }.format(&record())
    }

    #[test]
    fn envoy_default_format() {
        assert_eq!(
            text(ENVOY_DEFAULT_FORMAT),
            "[2025-12-07T18:00:00.123Z] \"POST /before HTTP/1.1\" 503 UF,URX 12 91 42 7 \"-\" \"curl/8.0\" \"abc-123\" \"shop.local\" \"127.0.0.1:8080\"\n"
        );
    }

    #[test]
    fn operators_of_istio_fields() {
        assert_eq!(text("%REQ(:PATH)% %ROUTE_NAME% %UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME%"), "/items?x=1 default shop 10.0.0.9:40000 -");
        assert_eq!(text("%RESPONSE_CODE_DETAILS%"), "upstream_reset_before_response_started{connection_failure}");
        assert_eq!(text("%REQ(USER-AGENT):4% 100%% %REQ(X-MISSING?USER-AGENT)%"), "curl 100% curl/8.0");
        assert_eq!(text("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"), "10.0.0.9");
    }

    #[test]
    fn unsupported_or_malformed_operators_are_named() {
        assert_eq!(parse_format("%UPSTREAM_TRANSPORT_FAILURE_REASON%").unwrap_err(), "command operator %UPSTREAM_TRANSPORT_FAILURE_REASON% is not supported by meshctl yet");
        assert!(parse_format("%REQ(:METHOD)").unwrap_err().contains("unterminated"));
        assert!(parse_format("%REQ(:foo)%").unwrap_err().contains(":foo"));
        assert!(parse_format("%REQ(A):x%").unwrap_err().contains("not a length"));
        assert!(parse_format("%RESP(:PATH)%").is_err());
    }

    #[test]
    fn json_keeps_types_and_nulls_absent_values() {
        let fields = [("code", "%RESPONSE_CODE%"), ("flags", "%RESPONSE_FLAGS%"), ("xff", "%REQ(X-FORWARDED-FOR)%"), ("line", "%REQ(:METHOD)% %RESPONSE_CODE%")]
            .iter()
            .map(|(k, v)| (k.to_string(), parse_format(v).unwrap()))
            .collect();
        let line = LogFormat::Json { fields }.format(&record());
        assert!(line.ends_with('\n'));
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["code"], 503);
        assert_eq!(parsed["flags"], "UF,URX");
        assert_eq!(parsed["xff"], serde_json::Value::Null);
        assert_eq!(parsed["line"], "POST 503");
    }

    #[test]
    fn status_filter_and_a_full_channel_drops_and_counts() {
        let filter = StatusFilter { op: Comparison::Ge, value: 500 };
        assert!(filter.admits(503) && !filter.admits(404));
        let (sender, receiver) = sync_channel(1);
        let sink = Sink { path: "test".into(), sender, written: AtomicU64::new(0), dropped: AtomicU64::new(0) };
        sink.push("a".into());
        sink.push("b".into());
        assert_eq!(sink.dropped.load(Relaxed), 1);
        assert_eq!(receiver.try_recv().unwrap(), "a");
    }

    #[test]
    fn a_file_sink_writes_lines_off_the_caller() {
        let path = std::env::temp_dir().join(format!("meshctl-access-log-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = sink(path.to_str().unwrap()).unwrap();
        let log = AccessLog { format: LogFormat::Text { pieces: parse_format("%RESPONSE_CODE% %REQ(:METHOD)%\n").unwrap() }, sink, filter: None };
        log.log(&record());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path).unwrap_or_default().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "503 POST\n");
        let _ = std::fs::remove_file(&path);
    }
}
