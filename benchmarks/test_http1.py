"""HTTP/1.1 keep-alive throughput, wrk -t1 -c64, small body: direct, meshctl, Envoy, HAProxy, nginx."""

from benchmarks import loadgen, peers
from benchmarks.rounds import Scenario

CONNECTIONS = 64

SCENARIO = Scenario(
    name="http1",
    title=f"HTTP/1.1 keep-alive throughput (wrk -t1 -c{CONNECTIONS}, small body)",
    peers=(peers.DIRECT, peers.MESHCTL, peers.ENVOY, peers.HAPROXY, peers.NGINX),
    url=lambda spec: f"http://127.0.0.1:{spec.http1_port}/",
    load=lambda url, seconds: loadgen.wrk(url, connections=CONNECTIONS, threads=1, seconds=seconds),
    tool="wrk",
    notes="HTTP/1.1 both legs; proxies keep pooled keep-alive connections to the upstream.",
)


def test_http1_keepalive_throughput(benchmark, bench):
    bench.run(benchmark, SCENARIO)
