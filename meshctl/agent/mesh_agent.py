"""The sidecar agent for `meshctl run --service ...`: an engine fed over ADS by the control plane,
the instance's registration and lease, and the application it guards.

Order of a run: start the engine with only its admin endpoint; register with the control plane
(not ready yet) and learn where its xDS server is; follow ADS until the outbound listener is
bound; start the application with HTTP_PROXY pointing at that listener; once the app port
answers, say ready (the instance becomes an endpoint everywhere); renew the lease until the app
exits; then leave the registry, drain the engine and exit with the app's status.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from meshctl.agent.ads_client import AdsClient
from meshctl.agent.backoff import Backoff
from meshctl.agent.bootstrap import bootstrap_from_dict
from meshctl.agent.supervisor import COMMAND_NOT_EXECUTABLE, COMMAND_NOT_FOUND, exit_status

log = logging.getLogger("meshctl.agent")

OUTBOUND_LISTENER = "virtualOutbound"  # meshctl.control.compiler names it so


@dataclass(frozen=True)
class AgentOptions:
    service: str
    control_plane: tuple[str, int]  # the API (the first of control_planes)
    token: str
    version: str = ""
    namespace: str = "default"
    app_port: int | None = None
    service_port: int = 80
    protocol: str = "HTTP"
    address: str = "127.0.0.1"
    outbound_port: int = 15001
    inbound_port: int = 15006
    admin_port: int = 15000
    lease_seconds: float = 10.0
    xds_address: tuple[str, int] | None = None  # default: what the API says at registration
    labels: tuple[tuple[str, str], ...] = ()
    workers: int = 1
    drain_timeout: float = 5.0
    config_wait: float = 15.0  # how long the app waits for the sidecar's first config
    node_id: str = ""
    capture: bool = False  # iptables sends the app's traffic here (meshctl.agent.capture)
    # Every control plane's API, in order of preference; the agent fails over along it.
    control_planes: tuple[tuple[str, int], ...] = ()

    @property
    def planes(self) -> tuple[tuple[str, int], ...]:
        return self.control_planes or (self.control_plane,)

    def with_node_id(self) -> AgentOptions:
        if self.node_id:
            return self
        return replace(self, node_id=f"{self.service}.{self.namespace}-{uuid.uuid4().hex[:12]}")


class RegistrationFailed(Exception):
    pass


class _Api:
    """PUT/DELETE /v1/sidecars/{node} with the token, off the trio thread (blocking http.client)."""

    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.plane = options.planes[0]  # the one it talks to now

    def _call(self, method: str, body: dict[str, Any] | None) -> dict[str, Any]:
        host, port = self.plane
        connection = http.client.HTTPConnection(host, port, timeout=5)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {
                "Authorization": f"Bearer {self.options.token}",
                "Content-Type": "application/json",
            }
            connection.request(
                method, f"/v1/sidecars/{self.options.node_id}", body=payload, headers=headers
            )
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise RegistrationFailed(
                f"cannot reach the control plane at {host}:{port}: {error}"
            ) from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {}
        if response.status >= 400:
            message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
            raise RegistrationFailed(
                f"the control plane refused: {message or f'HTTP {response.status}'}"
            )
        return answer

    async def register(self, ready: bool) -> dict[str, Any]:
        o = self.options
        body = {
            "service": o.service,
            "namespace": o.namespace,
            "version": o.version,
            "address": o.address,
            "servicePort": o.service_port,
            "outboundPort": o.outbound_port,
            "ready": ready,
            "leaseSeconds": o.lease_seconds,
            "protocol": o.protocol,
            "labels": dict(o.labels),
        }
        if o.admin_port:
            body["adminPort"] = o.admin_port
        if o.app_port is not None:
            body.update(appPort=o.app_port, inboundPort=o.inbound_port)
        if o.capture:
            body["capture"] = True
        return await trio.to_thread.run_sync(self._call, "PUT", body)

    async def deregister(self) -> None:
        await trio.to_thread.run_sync(self._call, "DELETE", None)


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _report(message: str) -> None:
    print(f"meshctl run: {message}", file=sys.stderr, flush=True)


def app_environment(options: AgentOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    """The application's environment: HTTP proxy mode through the sidecar's outbound listener."""
    env = dict(os.environ if base is None else base)
    proxy = f"http://127.0.0.1:{options.outbound_port}"
    env["HTTP_PROXY"] = env["http_proxy"] = proxy
    # Loopback stays direct (the app's own health checks, the agent's ports).
    if "NO_PROXY" not in env and "no_proxy" not in env:
        env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    return env


async def _port_answers(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


class Agent:
    def __init__(self, options: AgentOptions, engine: Any) -> None:
        options = options.with_node_id()
        admin = engine.admin_address()
        if admin is not None:  # the port it bound (--admin-port 0 picks one), for `route show`
            options = replace(options, admin_port=admin[1])
        self.options = options
        self.engine = engine
        self.api = _Api(self.options)
        self.ready = False
        self.xds: tuple[str, int] | None = None  # the ADS server of the plane it talks to
        self.switched = trio.Event()  # set when it moved to another control plane

    def _xds_from(self, answer: dict[str, Any]) -> tuple[str, int]:
        if self.options.xds_address is not None:
            return self.options.xds_address
        if not answer.get("xds"):
            raise RegistrationFailed(
                "the control plane has no xDS server to follow (is it `meshctl serve`?)"
            )
        host, port = _parse_address(answer["xds"])
        if host in ("", "0.0.0.0", "::"):
            host = self.api.plane[0]  # it listens everywhere: where we found it
        return host, port

    async def _register_anywhere(self, ready: bool, backoff: Backoff) -> bool:
        """Register with the current plane, else the next ones in turn (one round); True when
        one answered. A plane that refuses (bad token, bad body) is not skipped: that raises."""
        planes = self.options.planes
        start = planes.index(self.api.plane) if self.api.plane in planes else 0
        for step in range(len(planes)):
            plane = planes[(start + step) % len(planes)]
            previous, self.api.plane = self.api.plane, plane
            try:
                answer = await self.api.register(ready=ready)
            except RegistrationFailed as error:
                if "refused:" in str(error):
                    raise
                log.warning("%s", error)
                continue
            xds = self._xds_from(answer)
            if plane != previous or xds != self.xds:
                if self.xds is not None:
                    _report(f"control plane {previous[0]}:{previous[1]} is unreachable; "
                            f"now following {plane[0]}:{plane[1]} (xDS {xds[0]}:{xds[1]})")  # fmt: skip
                    self.switched.set()
                self.xds = xds
            backoff.reset()
            return True
        await trio.sleep(backoff.next_delay())  # every plane is away: back off, with jitter
        return False

    async def register_until_accepted(self) -> tuple[str, int]:
        """First registration (not ready); retried with backoff while every plane is away."""
        backoff = Backoff(0.2, 5.0)
        while not await self._register_anywhere(False, backoff):
            pass
        assert self.xds is not None
        return self.xds

    async def keep_lease(self) -> None:
        """Renew at a third of the lease, so two lost renewals still leave the lease alive; when
        the plane is unreachable, fail over to the next one (the engine keeps its config)."""
        backoff = Backoff(0.2, 5.0)
        while True:
            await trio.sleep(self.options.lease_seconds / 3)
            try:
                while not await self._register_anywhere(self.ready, backoff):
                    pass
            except RegistrationFailed as error:
                log.warning("lease renewal: %s", error)

    async def follow_ads(self, ads: AdsClient) -> None:
        """ADS from the current plane's xDS server; restarted on the new one after a failover
        (the same client, so the engine's accepted versions and names carry over)."""
        while True:
            self.switched = trio.Event()
            assert self.xds is not None
            ads._address = self.xds
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ads.run)
                await self.switched.wait()
                nursery.cancel_scope.cancel()

    async def wait_until_app_answers(self) -> None:
        assert self.options.app_port is not None
        while not await _port_answers("127.0.0.1", self.options.app_port):
            await trio.sleep(0.1)
        self.ready = True
        try:
            await self._register_anywhere(True, Backoff(0.2, 5.0))
        except RegistrationFailed as error:
            log.warning("marking ready: %s (the next renewal retries)", error)
        _report(f"instance {self.options.node_id} ready: app port {self.options.app_port} answers")

    async def wait_for_outbound_listener(self) -> bool:
        with trio.move_on_after(self.options.config_wait):
            while OUTBOUND_LISTENER not in self.engine.listener_addresses():
                await trio.sleep(0.05)
            return True
        return False


async def run_agent(options: AgentOptions, engine: Any, command: Sequence[str] | None) -> int:
    agent = Agent(options, engine)
    options = agent.options
    try:
        xds = await agent.register_until_accepted()
    except RegistrationFailed as error:
        _report(str(error))
        return 1
    status = 0
    async with trio.open_nursery() as nursery:
        ads = AdsClient(
            engine, xds, options.node_id, node_cluster=options.service, backoff=Backoff(0.2, 5.0)
        )
        nursery.start_soon(agent.follow_ads, ads)
        nursery.start_soon(agent.keep_lease)
        if not await agent.wait_for_outbound_listener():
            _report(
                f"no config from {xds[0]}:{xds[1]} after {options.config_wait:.0f}s; starting anyway"
            )
        where = ", ".join(
            f"{name} on {host}:{port}"
            for name, (host, port) in sorted(engine.listener_addresses().items())
        )
        _report(
            f"sidecar {options.node_id} ready: {where or 'no listeners'}; xDS from {xds[0]}:{xds[1]}"
        )
        if options.app_port is not None:
            nursery.start_soon(agent.wait_until_app_answers)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            if command:
                status = await _supervise(command, app_environment(options), signals)
            else:
                async for _ in signals:
                    break
        nursery.cancel_scope.cancel()
    with trio.move_on_after(2):
        try:
            await agent.api.deregister()
        except RegistrationFailed as error:
            log.info("leaving the registry: %s (the lease runs out instead)", error)
    await trio.to_thread.run_sync(engine.drain, options.drain_timeout)
    return status


async def _supervise(command: Sequence[str], env: dict[str, str], signals) -> int:
    try:
        process = await trio.lowlevel.open_process(list(command), env=env)
    except FileNotFoundError:
        _report(f"cannot start {command[0]}: command not found")
        return COMMAND_NOT_FOUND
    except OSError as error:
        _report(f"cannot start {command[0]}: {error.strerror or error}")
        return COMMAND_NOT_EXECUTABLE
    async with trio.open_nursery() as nursery:

        async def forward() -> None:
            async for received in signals:
                # SIGINT from a terminal already reached the app (same process group).
                if received == signal.SIGTERM:
                    process.send_signal(signal.SIGTERM)

        nursery.start_soon(forward)
        returncode = await process.wait()
        nursery.cancel_scope.cancel()
    return exit_status(returncode)


def main(options: AgentOptions, command: Sequence[str] | None) -> int:
    """Start the engine (admin only; everything else comes over ADS) and run the agent."""
    logging.basicConfig(level=logging.WARNING, format="meshctl run: %(message)s")
    try:
        from meshctl import _core
    except ImportError as error:
        _report(f"the engine is not built ({error}); run `pip install .`")
        return 1
    bootstrap = bootstrap_from_dict(
        {
            "admin": {
                "address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": options.admin_port}
                }
            }
        }
    )
    try:
        engine = _core.Engine(bootstrap, worker_threads=options.workers)
    except OSError as error:
        _report(f"cannot bind the admin port 127.0.0.1:{options.admin_port}: {error}")
        return 2
    try:
        return trio.run(run_agent, options, engine, command)
    finally:
        engine.stop()
