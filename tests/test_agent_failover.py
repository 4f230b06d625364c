"""The sidecar agent's control-plane failover: it registers with the first plane that answers,
moves to the next when its plane is unreachable (and says so), and backs off when all are away."""

from __future__ import annotations

import trio

from meshctl.agent.backoff import Backoff
from meshctl.agent.mesh_agent import Agent, AgentOptions, RegistrationFailed

A, B = ("127.0.0.1", 1001), ("127.0.0.1", 1002)


class Engine:
    def admin_address(self):
        return None


def agent(up: set) -> tuple[Agent, list]:
    options = AgentOptions(service="reviews", control_plane=A, token="t", control_planes=(A, B))
    made = Agent(options, Engine())
    calls: list = []

    async def register(ready: bool) -> dict:
        plane = made.api.plane
        calls.append((plane, ready))
        if plane not in up:
            raise RegistrationFailed(f"cannot reach the control plane at {plane}")
        return {"xds": f"127.0.0.1:{plane[1] + 10}"}

    made.api.register = register
    return made, calls


async def test_first_registration_skips_an_unreachable_plane():
    made, calls = agent(up={B})
    assert await made.register_until_accepted() == ("127.0.0.1", 1012)
    assert calls == [(A, False), (B, False)] and not made.switched.is_set()


async def test_a_lost_plane_moves_the_agent_and_its_ads_to_the_next():
    up = {A, B}
    made, calls = agent(up)
    assert await made.register_until_accepted() == ("127.0.0.1", 1011)
    up.discard(A)
    assert await made._register_anywhere(True, Backoff(0.01, 0.02))
    assert made.xds == ("127.0.0.1", 1012) and made.switched.is_set()
    assert calls[-2:] == [(A, True), (B, True)]


async def test_every_plane_away_backs_off_then_retries(autojump_clock):
    made, calls = agent(up=set())
    with trio.move_on_after(1.0):
        await made.register_until_accepted()
    assert 4 <= len(calls) <= 20  # a round of both planes per delay, not a tight loop
    assert {plane for plane, _ in calls} == {A, B}
