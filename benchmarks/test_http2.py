"""HTTP/2 throughput, h2load -c16 -m10: direct (nginx h2c), meshctl and Envoy (h2c downstream, HTTP/1.1 upstream)."""

from benchmarks import loadgen, peers
from benchmarks.rounds import Scenario

CLIENTS, STREAMS = 16, 10

SCENARIO = Scenario(
    name="http2",
    title=f"HTTP/2 throughput (h2load -c{CLIENTS} -m{STREAMS}; h2c downstream, HTTP/1.1 upstream)",
    peers=(peers.DIRECT, peers.MESHCTL, peers.ENVOY),
    # http:// makes h2load speak h2c with prior knowledge; direct goes to the upstream's h2c port.
    url=lambda spec: f"http://127.0.0.1:{spec.h2c_port}/",
    load=lambda url, seconds: loadgen.h2load(
        url, clients=CLIENTS, streams=STREAMS, seconds=seconds
    ),
    tool="h2load",
    notes="Proxies terminate h2c and forward over pooled HTTP/1.1, like a sidecar's inbound hop; "
    "direct is nginx serving h2c itself.",
)


def test_http2_throughput(benchmark, bench):
    bench.run(benchmark, SCENARIO)
