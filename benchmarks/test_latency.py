"""Open-loop latency at a fixed 2,000 req/s (fortio, HTTP/1.1): p50/p90/p99 and added over direct."""

from benchmarks import loadgen, peers
from benchmarks.rounds import Scenario

QPS, CONNECTIONS = 2000, 16

SCENARIO = Scenario(
    name="latency",
    title=f"Open-loop latency at {QPS:,} req/s (fortio -qps {QPS} -c{CONNECTIONS} -uniform, HTTP/1.1)",
    peers=(peers.DIRECT, peers.MESHCTL, peers.ENVOY),
    url=lambda spec: f"http://127.0.0.1:{spec.http1_port}/",
    load=lambda url, seconds: loadgen.fortio(
        url, qps=QPS, connections=CONNECTIONS, seconds=seconds
    ),
    tool="fortio",
    notes="Far below saturation, so queueing in the client does not hide the proxy's own latency.",
)


def test_latency_fixed_rate(benchmark, bench):
    bench.run(benchmark, SCENARIO)
