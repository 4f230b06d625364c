"""The sidecar agent for `meshctl run --service ...`: an engine fed over ADS by the control plane,
the workload's certificate, the instance's registration and lease, and the application it guards.

Order of a run: start the engine with only its admin endpoint; obtain the workload's certificate
from the control plane's CA (a key made here, a CSR, the token) and give it to the engine as the
SDS secret `default`; register with the control plane over mTLS (not ready yet); follow ADS (over
mTLS) until the outbound listener is bound; start the application with HTTP_PROXY pointing at
that listener; once the app port answers, say ready (the instance becomes an endpoint
everywhere), and not ready the moment it stops answering; renew the lease and the certificate until the app exits; then leave the registry,
drain the engine and exit with the app's status.

Every call to the control plane goes to its TLS port (15012): CreateCertificate, Registry and
ADS, failing over along the planes given.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from meshctl.agent import xds_references as refs
from meshctl.agent.ads_client import AdsClient
from meshctl.agent.backoff import Backoff
from meshctl.agent.bootstrap import bootstrap_from_dict
from meshctl.agent.cert_files import write_cert_dir
from meshctl.agent.cert_renewal import (
    CertificateRefused,
    Credentials,
    WorkloadCertificate,
)
from meshctl.agent.control_calls import CertificateService, RegistryService
from meshctl.agent.control_channels import ControlPlanes, TrustAnchorError
from meshctl.agent.rate_limit_report import rule_counts
from meshctl.agent.sds_secret import SECRET_TYPE, workload_secret
from meshctl.agent.supervisor import COMMAND_NOT_EXECUTABLE, COMMAND_NOT_FOUND, exit_status
from meshctl.agent.workload_identity import IdentityAsk, IdentityConflict
from meshctl.control.paths import default_ca_root_path
from meshctl.grpc import GrpcError, StatusCode
from meshctl.identity.spiffe import DEFAULT_TRUST_DOMAIN

log = logging.getLogger("meshctl.agent")

OUTBOUND_LISTENER = "virtualOutbound"  # meshctl.control.compiler names it so
# How often a ready app's port is checked: a dead app stops being an endpoint within about this.
APP_PROBE_INTERVAL = 0.5


# A control plane that is away (or too slow) is failed over; any other status is its answer.
_AWAY = (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class AgentOptions:
    service: str
    control_plane: tuple[str, int]  # the TLS port (CA, registry, xDS): the first of control_planes
    token: str  # a join token, or the API token (an operator's: the CSR names the identity)
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
    labels: tuple[tuple[str, str], ...] = ()
    workers: int = 1
    drain_timeout: float = 5.0
    config_wait: float = 15.0  # how long the app waits for the sidecar's first config
    node_id: str = ""
    capture: bool = False  # iptables sends the app's traffic here (meshctl.agent.capture)
    # Every control plane's TLS port, in order of preference; the agent fails over along it.
    control_planes: tuple[tuple[str, int], ...] = ()
    # Identity. With a join token, service account and namespace are the token's; the flags
    # (None: not given) may only repeat them.
    service_account: str | None = None
    namespace_given: bool = True
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_root: Path = field(default_factory=default_ca_root_path)  # the planes' trust anchor (--ca-root)
    cert_ttl: int = 0  # seconds asked of the CA; 0: its default
    cert_dir: Path | None = None  # also keep cert.pem, key.pem, root.pem there
    # Istio's standard metrics: series not updated for this long expire; at most this many.
    istio_metrics_expiry: float = 600.0
    istio_metrics_max_series: int = 10_000

    @property
    def planes(self) -> tuple[tuple[str, int], ...]:
        return self.control_planes or (self.control_plane,)

    def with_node_id(self) -> AgentOptions:
        """A node id naming service and namespace (known for sure once the certificate is)."""
        if self.node_id:
            return self
        return replace(self, node_id=f"{self.service}.{self.namespace}-{uuid.uuid4().hex[:12]}")


class RegistrationFailed(Exception):
    pass


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
        with trio.fail_after(1.0):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError):
        return False
    await stream.aclose()
    return True


class Agent:
    def __init__(self, options: AgentOptions, engine: Any, planes: ControlPlanes | None = None) -> None:
        admin = engine.admin_address()
        if admin is not None:  # the port it bound (--admin-port 0 picks one), for `route show`
            options = replace(options, admin_port=admin[1])
        if options.namespace_given:  # else the namespace (in the node id) is the join token's
            options = options.with_node_id()
        self.options = options
        self.engine = engine
        self.planes = planes or ControlPlanes(options.planes, options.ca_root)
        self.registry = RegistryService(self.planes)
        self.certificate: WorkloadCertificate | None = None
        self.ready = False
        self.registered = False
        self.xds: tuple[str, int] | None = None  # the plane whose ADS the engine follows
        self.switched = trio.Event()  # set when it moved to another control plane
        self.ads: AdsClient | None = None

    # --- identity ----------------------------------------------------------------------------

    async def obtain_identity(self) -> None:
        """The first certificate, in the engine (and the cert dir) before anything refers to it.
        Its namespace is the instance's (the registry accepts no other)."""
        o = self.options
        ask = IdentityAsk(
            token=o.token, service=o.service, namespace=o.namespace if o.namespace_given else None,
            service_account=o.service_account, trust_domain=o.trust_domain,
        )  # fmt: skip
        service = CertificateService(self.planes, o.node_id)
        self.certificate = WorkloadCertificate(ask, service, o.cert_ttl, report=_report)
        self.certificate.subscribe(self._use_certificate)
        await self.certificate.obtain_first()
        assert self.certificate.identity is not None
        self.options = replace(o, namespace=self.certificate.identity.namespace).with_node_id()
        service.node_id = self.options.node_id  # renewals name the instance

    async def _use_certificate(self, credentials: Credentials) -> None:
        self.planes.use_client_certificate(credentials.chain_pem, credentials.key_pem)
        secret = workload_secret(credentials.chain_pem, credentials.key_pem)
        await trio.to_thread.run_sync(self.engine.apply, SECRET_TYPE, [secret])
        await self._write_cert_dir()

    async def _write_cert_dir(self) -> None:
        if self.options.cert_dir is None or self.certificate is None or self.certificate.current is None:
            return
        credentials = self.certificate.current
        roots = trust_bundle(self.planes.roots_pem(), credentials.certificate.root_pem)
        try:
            await trio.to_thread.run_sync(
                write_cert_dir, self.options.cert_dir, credentials.chain_pem, credentials.key_pem, roots
            )
        except OSError as error:  # the engine has the certificate; the files wait for the next one
            _report(f"cannot write --cert-dir {self.options.cert_dir}: {error.strerror or error}")

    async def _on_secret(self, name: str, message: Any) -> None:
        """The control plane's trust bundle (ROOTCA) also verifies the planes themselves (a root
        rotation reaches us before the --ca-root file changes) and goes to root.pem."""
        if name != refs.TRUST_BUNDLE_SECRET:
            return
        source = message.validation_context.trusted_ca
        roots = source.inline_bytes or source.inline_string.encode()
        if roots and roots != self.planes.extra_roots_pem:
            self.planes.trust_roots(roots)
            await self._write_cert_dir()

    # --- registration ------------------------------------------------------------------------

    def _registration(self, ready: bool) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {
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
            # The engine serves /stats/prometheus on its admin endpoint, which listens on
            # loopback only (see main()): a Prometheus on this host scrapes it.
            body["metricsAddress"] = f"127.0.0.1:{o.admin_port}"
        if o.app_port is not None:
            body.update(appPort=o.app_port, inboundPort=o.inbound_port)
        if o.capture:
            body["capture"] = True
        # Cumulative: a lost renewal loses no count, the plane takes differences. Sent empty too:
        # the first registration (before any config) is the plane's zero for this sidecar.
        body["rateLimitCounts"] = rule_counts(self.engine)
        return body

    async def _register_anywhere(self, ready: bool, backoff: Backoff) -> bool:
        """Register with the current plane, else the next ones in turn (one round); True when
        one answered. A plane that refuses (bad identity, bad body) is not skipped: that raises."""
        previous = self.planes.current
        try:
            await self.registry.register(self.options.node_id, self._registration(ready))
        except GrpcError as error:
            if error.code not in _AWAY:
                raise RegistrationFailed(f"the control plane refused: {error.message}") from None
            log.warning("registering: no control plane answers (%s)", error.message)
            await trio.sleep(backoff.next_delay())  # every plane is away: back off, with jitter
            return False
        plane = self.planes.current
        if plane != self.xds:
            if self.xds is not None:
                _report(f"control plane {previous[0]}:{previous[1]} is unreachable; "
                        f"now following {plane[0]}:{plane[1]}")  # fmt: skip
                self.switched.set()
            self.xds = plane
        backoff.reset()
        return True

    async def register_until_accepted(self) -> tuple[str, int]:
        """First registration (not ready); retried with backoff while every plane is away."""
        backoff = Backoff(0.2, 5.0)
        while not await self._register_anywhere(False, backoff):
            pass
        assert self.xds is not None
        return self.xds

    async def keep_lease(self) -> None:
        """Renew at a third of the lease, so two lost renewals still leave the lease alive; when
        the plane is unreachable, fail over to the next one (the engine keeps its config).
        While every plane is away, retries come at least every third of the lease too: a plane
        that restarts gives each instance it knew one lease to renew before it drops it."""
        retry_at_most = min(5.0, self.options.lease_seconds / 3)
        backoff = Backoff(min(0.2, retry_at_most), retry_at_most)
        while True:
            await trio.sleep(self.options.lease_seconds / 3)
            try:
                while not await self._register_anywhere(self.ready, backoff):
                    pass
            except RegistrationFailed as error:
                log.warning("lease renewal: %s", error)

    async def deregister(self) -> None:
        try:
            await self.registry.deregister(self.options.node_id)
        except GrpcError as error:
            log.info("leaving the registry: %s (the lease runs out instead)", error.message)

    # --- configuration -----------------------------------------------------------------------

    def new_ads_client(self) -> AdsClient:
        assert self.xds is not None
        o = self.options
        ads = AdsClient(
            self.engine, self.xds, o.node_id, node_cluster=o.service, backoff=Backoff(0.2, 5.0),
            tls=self.planes.ssl_context, pinned_secrets=frozenset({refs.TRUST_BUNDLE_SECRET}),
            on_secret=self._on_secret,
        )  # fmt: skip
        # Registration rides on the ADS connection while it is up (one TLS session, not one a call).
        self.planes.shared_channel = lambda plane: ads.channel if ads._address == plane else None
        self.ads = ads
        return ads

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

    async def follow_app_readiness(self) -> None:
        """Ready once the app's port answers; not ready the moment it stops answering, so
        callers stop sending to it at once instead of failing until its lease runs out; ready
        again when it answers again."""
        assert self.options.app_port is not None
        while True:
            answers = await _port_answers("127.0.0.1", self.options.app_port)
            if answers != self.ready:
                self.ready = answers
                try:
                    await self._register_anywhere(answers, Backoff(0.2, 5.0))
                except RegistrationFailed as error:
                    log.warning("marking %s: %s (the next renewal retries)",
                                "ready" if answers else "not ready", error)  # fmt: skip
                port = self.options.app_port
                _report(f"instance {self.options.node_id} "
                        + (f"ready: app port {port} answers" if answers else f"not ready: app port {port} stopped answering"))  # fmt: skip
            await trio.sleep(APP_PROBE_INTERVAL if self.ready else 0.1)

    async def wait_for_outbound_listener(self) -> bool:
        with trio.move_on_after(self.options.config_wait):
            while OUTBOUND_LISTENER not in self.engine.listener_addresses():
                await trio.sleep(0.05)
            return True
        return False


def trust_bundle(*bundles: bytes) -> bytes:
    """The PEM certificates of `bundles`, each once, in order."""
    seen: list[bytes] = []
    for bundle in bundles:
        for block in bundle.split(b"-----END CERTIFICATE-----")[:-1]:
            pem = block[block.index(b"-----BEGIN CERTIFICATE-----"):] + b"-----END CERTIFICATE-----\n"
            if pem not in seen:
                seen.append(pem)
    return b"".join(seen)


async def run_agent(options: AgentOptions, engine: Any, command: Sequence[str] | None) -> int:
    try:
        agent = Agent(options, engine)
    except TrustAnchorError as error:
        _report(str(error))
        return 2
    try:
        await agent.obtain_identity()
    except IdentityConflict as error:
        _report(str(error))
        return 2
    except CertificateRefused as error:
        _report(str(error))
        return 1
    options = agent.options
    assert agent.certificate is not None
    try:
        xds = await agent.register_until_accepted()
    except RegistrationFailed as error:
        _report(str(error))
        return 1
    status = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.certificate.keep_renewed)
        ads = agent.new_ads_client()
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
            nursery.start_soon(agent.follow_app_readiness)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            if command:
                status = await _supervise(command, app_environment(options), signals)
            else:
                async for _ in signals:
                    break
        nursery.cancel_scope.cancel()
    with trio.move_on_after(2):
        await agent.deregister()
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
        engine = _core.Engine(
            bootstrap,
            worker_threads=options.workers,
            istio_metrics_expiry=options.istio_metrics_expiry,
            istio_metrics_max_series=options.istio_metrics_max_series,
        )
    except OSError as error:
        _report(f"cannot bind the admin port 127.0.0.1:{options.admin_port}: {error}")
        return 2
    try:
        return trio.run(run_agent, options, engine, command)
    finally:
        engine.stop()
