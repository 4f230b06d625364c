"""Routing differential: one bootstrap with every match kind and action, probed on Envoy and meshctl.

`test_routing_table` checks each data plane against the expectations in the table (validated on
Envoy 1.40); `test_meshctl_matches_envoy` compares the two data planes observation by observation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.dataplane import start_dataplane
from helpers.observe import observe
from helpers.ports import free_port
from helpers.routing_table import CASES, check, routing_bootstrap


def run_table(kind: str, directory: Path, port_a: int, port_b: int) -> dict[str, dict]:
    port = free_port()
    process = start_dataplane(kind, routing_bootstrap(port, port_a, port_b), directory)
    try:
        return {case.id: observe(port, case.method, case.path, case.host, case.headers) for case in CASES}
    finally:
        process.stop()


@pytest.fixture(scope="module")
def observations(tmp_path_factory, echo_a, echo_b):
    """Observations per data plane kind, each table run at most once per module."""
    cache: dict[str, dict[str, dict]] = {}

    def get(kind: str) -> dict[str, dict]:
        if kind not in cache:
            cache[kind] = run_table(kind, tmp_path_factory.mktemp(f"routing-{kind}"), echo_a.port, echo_b.port)
        return cache[kind]

    return get


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


def test_routing_table(dataplane_kind, observations):
    observed = observations(dataplane_kind)
    report = []
    for case in CASES:
        problems = check(case, observed[case.id])
        if problems:
            report.append(f"{case.id}: {case.method} {case.path} Host: {case.host} {case.headers}")
            report.extend(f"    {problem}" for problem in problems)
    assert not report, f"{dataplane_kind} disagrees with the routing table:\n" + "\n".join(report)


@pytest.mark.meshctl_only
def test_meshctl_matches_envoy(observations):
    envoy, meshctl = observations("envoy"), observations("meshctl")
    report = []
    for case in CASES:
        if envoy[case.id] != meshctl[case.id]:
            report.append(f"{case.id}: {case.method} {case.path} Host: {case.host} {case.headers}")
            for key in envoy[case.id]:
                if envoy[case.id][key] != meshctl[case.id][key]:
                    report.append(f"    {key}:\n      envoy:   {json.dumps(envoy[case.id][key], sort_keys=True)}"
                                  f"\n      meshctl: {json.dumps(meshctl[case.id][key], sort_keys=True)}")
    assert not report, f"{len(report)} lines of disagreement between Envoy and meshctl:\n" + "\n".join(report)
