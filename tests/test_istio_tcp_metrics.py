"""Istio's TCP metrics on a standalone meshctl sidecar: a tcp_proxy listener that reports as source
(listener metadata `meshctl.istio_stats`) in front of a server-speaks-first TCP upstream whose
endpoint and cluster metadata name its workload and service, as the control plane's EDS does.
The connection's bytes each way and its opening and closing are counted on the admin endpoint."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import pytest
from helpers.bootstrap import bootstrap, cluster, listener, socket_address, tcp_proxy
from helpers.dataplane import start_dataplane
from helpers.mesh import wait_until
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

WORKLOAD = {"workload": "lines-v1", "namespace": "data", "app": "lines", "version": "v1"}


def scrape(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as response:
        return response.read().decode()


def sample(text: str, metric: str) -> float:
    found = re.search(rf"^{metric}\{{(.*)\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(2)) if found else 0.0


METRICS = [f"istio_tcp_{name}_total" for name in ("connections_opened", "connections_closed", "received_bytes", "sent_bytes")]


def settled(admin_port: int) -> dict[str, float]:
    """The four counters once every connection counted as opened is counted as closed (the
    test's start-up probes of the listener port are connections too)."""
    found: dict[str, float] = {}

    def check() -> bool:
        found.update({metric: sample(scrape(admin_port), metric) for metric in METRICS})
        return found[METRICS[0]] == found[METRICS[1]]

    wait_until(check, 10, "every connection closed")
    return dict(found)


def test_tcp_bytes_and_connections_are_counted_with_the_endpoints_workload(tmp_path: Path, line_upstream):
    port, admin_port = free_port(), free_port()
    upstream = cluster("lines", line_upstream.port)
    upstream["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = {
        "filter_metadata": {"meshctl": {"workload": WORKLOAD}}
    }
    upstream["metadata"] = {
        "filter_metadata": {"istio": {"services": [{"host": "lines.data.svc.cluster.local", "name": "lines", "namespace": "data"}]}}
    }
    tcp = listener("tcp", port, [{"filters": [tcp_proxy("lines")]}], metadata={
        "filter_metadata": {"meshctl": {"istio_stats": {"reporter": "source", "workload": {"workload": "client-v2", "namespace": "web", "app": "client"}}}}
    })  # fmt: skip
    config = bootstrap([tcp], [upstream], admin={"address": socket_address(admin_port)})
    sidecar = start_dataplane("meshctl", config, tmp_path)
    try:
        before = settled(admin_port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            stream = connection.makefile("rwb")
            assert stream.readline() == b"HELLO lines\n"
            stream.write(b"abc\n")
            stream.flush()
            assert stream.readline() == b"ECHO abc\n"
            assert sample(scrape(admin_port), METRICS[0]) == before[METRICS[0]] + 1
            stream.close()
        after = settled(admin_port)
        text = scrape(admin_port)
        labels = re.search(r"^istio_tcp_sent_bytes_total\{(.*)\} \S+$", text, re.MULTILINE).group(1)
        assert labels.startswith('reporter="source",source_workload="client-v2",source_canonical_service="unknown"')
        for expected in [
            'destination_workload="lines-v1"', 'destination_workload_namespace="data"', 'destination_app="lines"',
            'destination_service="lines.data.svc.cluster.local"', 'destination_service_name="lines"',
            'request_protocol="tcp"', 'response_flags="-"', 'connection_security_policy="unknown"',
        ]:  # fmt: skip
            assert expected in labels, labels
        assert "response_code" not in labels
        delta = [after[metric] - before[metric] for metric in METRICS]
        assert delta == [1, 1, len(b"abc\n"), len(b"HELLO lines\nECHO abc\n")]
    except BaseException:
        print(sidecar.log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        sidecar.stop()
