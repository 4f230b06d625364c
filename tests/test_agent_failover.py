"""The sidecar agent's control-plane failover: it registers with the first plane that answers,
moves to the next when its plane is unreachable (and says so), and backs off when all are away."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from meshctl.agent.backoff import Backoff
from meshctl.agent.control_channels import ControlPlanes
from meshctl.agent.mesh_agent import Agent, AgentOptions, RegistrationFailed
from meshctl.grpc import GrpcError, StatusCode
from meshctl.identity.ca import CertificateAuthority

A, B = ("127.0.0.1", 1001), ("127.0.0.1", 1002)


class Engine:
    def admin_address(self):
        return None

    def local_rate_limit_counts(self):
        return []


@pytest.fixture
def ca_root(tmp_path: Path) -> Path:
    return CertificateAuthority.open(tmp_path / "ca", "cluster.local").write_bundle()


def agent(up: set, ca_root: Path, refusing: set = frozenset()) -> tuple[Agent, list]:
    options = AgentOptions(service="reviews", control_plane=A, token="t", control_planes=(A, B),
                           ca_root=ca_root, node_id="reviews.default-1")  # fmt: skip
    planes = ControlPlanes(options.planes, ca_root)
    calls: list = []

    async def call_on(plane, method, request, metadata, with_client_certificate) -> bytes:
        calls.append((plane, method.rpartition("/")[2]))
        if plane in refusing:
            raise GrpcError(StatusCode.PERMISSION_DENIED, "namespace shop is not the certificate's")
        if plane not in up:
            raise GrpcError(StatusCode.UNAVAILABLE, f"cannot connect to {plane[0]}:{plane[1]}")
        return b""  # an empty Struct

    planes._call_on = call_on  # type: ignore[method-assign]
    return Agent(options, Engine(), planes), calls


async def test_first_registration_skips_an_unreachable_plane(ca_root):
    made, calls = agent({B}, ca_root)
    assert await made.register_until_accepted() == B
    assert calls == [(A, "Register"), (B, "Register")] and not made.switched.is_set()


async def test_a_lost_plane_moves_the_agent_and_its_ads_to_the_next(ca_root):
    up = {A, B}
    made, calls = agent(up, ca_root)
    assert await made.register_until_accepted() == A
    up.discard(A)
    assert await made._register_anywhere(True, Backoff(0.01, 0.02))
    assert made.xds == B and made.switched.is_set()
    assert calls[-2:] == [(A, "Register"), (B, "Register")]


async def test_every_plane_away_backs_off_then_retries(autojump_clock, ca_root):
    made, calls = agent(set(), ca_root)
    with trio.move_on_after(1.0):
        await made.register_until_accepted()
    assert 4 <= len(calls) <= 20  # a round of both planes per delay, not a tight loop
    assert {plane for plane, _ in calls} == {A, B}


async def test_a_refusal_is_an_answer_not_a_reason_to_fail_over(ca_root):
    made, calls = agent({A, B}, ca_root, refusing={A})
    with pytest.raises(RegistrationFailed, match="refused: namespace shop"):
        await made.register_until_accepted()
    assert calls == [(A, "Register")]
