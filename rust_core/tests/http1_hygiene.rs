//! HTTP/1.1 hygiene through a running engine: CONNECT without a CONNECT route is answered 404 and
//! never reaches the upstream; a malformed chunked body is the client's error (400, a downstream
//! protocol error), never an upstream failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3 as bootstrap;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::Any;
use meshctl_engine::engine::{Engine, EngineOptions};
use prost::{Message, Name};

mod common;
use common::static_cluster;

/// An HTTP/1.1 upstream that keeps every byte it receives and answers each connection's first
/// complete request with `200 ok`, then closes.
struct RecordingUpstream {
    port: u16,
    received: Arc<Mutex<Vec<u8>>>,
}

impl RecordingUpstream {
    fn start() -> RecordingUpstream {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        thread::spawn(move || {
            for connection in socket.incoming() {
                let Ok(mut connection) = connection else { return };
                let log = log.clone();
                thread::spawn(move || serve_one(&mut connection, &log));
            }
        });
        RecordingUpstream { port, received }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

fn serve_one(connection: &mut TcpStream, log: &Mutex<Vec<u8>>) {
    let _ = connection.set_read_timeout(Some(Duration::from_secs(5)));
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !request_complete(&seen) {
        match connection.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                seen.extend_from_slice(&buffer[..n]);
                log.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        }
    }
    let _ = connection.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
}

fn request_complete(seen: &[u8]) -> bool {
    let Some(head_end) = find(seen, b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
    !head.contains("transfer-encoding: chunked") || find(&seen[head_end..], b"\r\n0\r\n\r\n").is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn any_of<M: Message + Name>(message: &M) -> Any {
    Any { type_url: M::type_url(), value: message.encode_to_vec() }
}

fn loopback(port: u32) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: "127.0.0.1".into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

/// One listener (an ephemeral port, codec AUTO) routing every path to the cluster `upstream`.
fn proxy_to(upstream_port: u16) -> Engine {
    let routes = route::RouteConfiguration {
        name: "local".into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster("upstream".into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "ingress_http".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(routes)),
        http_filters: vec![hcm::HttpFilter { name: "envoy.filters.http.router".into(), ..Default::default() }],
        ..Default::default()
    };
    let config = bootstrap::Bootstrap {
        static_resources: Some(bootstrap::bootstrap::StaticResources {
            listeners: vec![listener::Listener {
                name: "http".into(),
                address: loopback(0),
                filter_chains: vec![listener::FilterChain {
                    filters: vec![listener::Filter {
                        name: "envoy.filters.network.http_connection_manager".into(),
                        config_type: Some(listener::filter::ConfigType::TypedConfig(any_of(&manager))),
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            clusters: vec![static_cluster("upstream", upstream_port as u32)],
            ..Default::default()
        }),
        ..Default::default()
    };
    Engine::start(&config.encode_to_vec(), EngineOptions::default()).expect("the bootstrap starts")
}

fn listener_address(engine: &Engine) -> SocketAddr {
    engine.listener_addresses().into_iter().find(|(name, _)| name == "http").expect("listener http").1
}

/// Send `request` on a fresh connection and read until the proxy closes it (or 5 s pass).
fn exchange(address: SocketAddr, request: &[u8]) -> String {
    let mut client = TcpStream::connect(address).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = client.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The value of one un-histogrammed series line on /stats/prometheus.
fn stat(engine: &Engine, series: &str) -> u64 {
    let text = engine.stats_prometheus();
    let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

const PROTOCOL_ERRORS: &str = "meshctl_downstream_cx_protocol_error_total{listener=\"http\"}";
const UPSTREAM_5XX: &str = "meshctl_upstream_rs_total{cluster=\"upstream\",code_class=\"5xx\"}";
const CONNECT_FAILURES: &str = "meshctl_upstream_cx_connect_fail_total{cluster=\"upstream\"}";

#[test]
fn connect_without_a_connect_route_is_404_and_never_forwarded() {
    let upstream = RecordingUpstream::start();
    let engine = proxy_to(upstream.port);
    let address = listener_address(&engine);
    for request in [&b"CONNECT svc.test:80 HTTP/1.1\r\nhost: svc.test:80\r\n\r\n"[..], b"CONNECT svc.test:80 HTTP/1.1\r\n\r\n"] {
        let answer = exchange(address, request);
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        // The bytes after a CONNECT would be tunnel payload: the connection must not stay open.
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    }
    assert_eq!(String::from_utf8_lossy(&upstream.received()), "", "the upstream saw the CONNECT");
}

#[test]
fn a_malformed_chunk_size_is_the_clients_error() {
    let upstream = RecordingUpstream::start();
    let engine = proxy_to(upstream.port);
    let address = listener_address(&engine);
    let cases: [(&str, &[u8]); 3] = [
        ("not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
        ("overflowing u64", b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("bad after a good chunk", b"5\r\nhello\r\nzz\r\n"),
    ];
    for (i, (what, body)) in cases.iter().enumerate() {
        let mut request = b"POST /upload HTTP/1.1\r\nhost: svc.test\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(body);
        let answer = exchange(address, &request);
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{what}: {answer}");
        assert_eq!(stat(&engine, PROTOCOL_ERRORS), i as u64 + 1, "{what}");
    }
    assert_eq!(stat(&engine, UPSTREAM_5XX), 0);
    assert_eq!(stat(&engine, CONNECT_FAILURES), 0);

    // The positive control: a well-formed chunked body goes through whole.
    let answer = exchange(
        address,
        b"POST /upload HTTP/1.1\r\nhost: svc.test\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    assert!(String::from_utf8_lossy(&upstream.received()).contains("5\r\nhello\r\n0\r\n\r\n"));
    assert_eq!(stat(&engine, PROTOCOL_ERRORS), 3);
}

#[test]
fn a_malformed_request_head_counts_as_a_protocol_error() {
    let upstream = RecordingUpstream::start();
    let engine = proxy_to(upstream.port);
    let answer = exchange(listener_address(&engine), b"GET / HTTP/1.1\r\nhost: svc.test\r\nbad header\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // hyper answers the head itself; the count comes when the connection ends, just after.
    let mut counted = 0;
    for _ in 0..50 {
        counted = stat(&engine, PROTOCOL_ERRORS);
        if counted == 1 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counted, 1);
    assert_eq!(upstream.received(), b"");
}
