"""`meshctl run --service ...`: check the mesh options, then hand over to the sidecar agent."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import typer

from meshctl.agent.sidecar import INVALID_CONFIG

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DEFAULT_TLS_PORT = 15012  # the control plane's CA, registry and xDS port (Istio's)


def run_in_mesh(
    *,
    service: str,
    version: str,
    namespace: str,
    app_port: int | None,
    service_port: int,
    app_protocol: str,
    control_plane: str | None,
    token: str | None,
    xds_address: str | None,
    address: str,
    outbound_port: int,
    inbound_port: int,
    admin_port: int,
    lease: float,
    workers: int,
    drain_timeout: float,
    command: Sequence[str] | None,
    capture: bool = False,
    service_account: str | None = None,
    ca_root: Path | None = None,
    cert_ttl: str | None = None,
    cert_dir: Path | None = None,
    trust_domain: str = "cluster.local",
    istio_metrics_expiry: float = 600.0,
    istio_metrics_max_series: int = 10_000,
) -> NoReturn:
    for flag, value in (("--service", service), ("--namespace", namespace), ("--version", version)):
        if value is None:
            continue
        if (value or flag != "--version") and (len(value) > 63 or not _LABEL.match(value)):
            _refuse(f"{flag} {value!r} is not a DNS label (lowercase letters, digits, '-')")
    ttl_seconds = certificate_ttl(cert_ttl, _refuse)
    check_identity_names(service_account, trust_domain, _refuse)
    protocol = app_protocol.upper()
    if protocol not in ("HTTP", "HTTP2", "GRPC"):
        _refuse(f"--app-protocol {app_protocol!r}: choose HTTP, HTTP2 or GRPC")
    ports = {"--outbound-port": outbound_port, "--admin-port": admin_port}
    if app_port is not None:
        ports.update({"--inbound-port": inbound_port, "--app-port": app_port})
    clashes = [
        flag for flag, port in ports.items() if port and list(ports.values()).count(port) > 1
    ]
    if clashes:
        _refuse(f"{' and '.join(clashes)} must differ")

    from meshctl.agent.mesh_agent import AgentOptions, main
    from meshctl.control.client import ClientError, resolve_token

    if capture:
        # What this machine can tell at once is refused before waiting for a control plane.
        from meshctl.agent.capture import CaptureError, check_capture_possible, check_chains_free

        try:
            check_capture_possible()
            check_chains_free()
        except CaptureError as error:
            _refuse(str(error))
    try:
        presented = resolve_token(token)
        planes = tls_addresses(control_plane, xds_address, presented)
    except ClientError as error:
        _refuse(error.message)
    options = AgentOptions(
        service=service, control_plane=planes[0], token=presented, version=version,
        namespace=namespace or "default", namespace_given=namespace is not None,
        app_port=app_port, service_port=service_port, protocol=protocol, address=address, outbound_port=outbound_port,
        inbound_port=inbound_port, admin_port=admin_port, lease_seconds=lease,
        control_planes=planes, workers=workers, drain_timeout=drain_timeout, capture=capture,
        service_account=service_account, trust_domain=trust_domain,
        cert_ttl=ttl_seconds, cert_dir=cert_dir, **({"ca_root": ca_root} if ca_root else {}),
        istio_metrics_expiry=istio_metrics_expiry, istio_metrics_max_series=istio_metrics_max_series,
    )  # fmt: skip
    if capture:
        from meshctl.agent.capture import run_captured

        try:
            raise typer.Exit(run_captured(options, command or None))
        except CaptureError as error:
            _refuse(str(error))
    raise typer.Exit(main(options, command or None))


def _refuse(message: str) -> NoReturn:
    typer.echo(f"meshctl run: {message}", err=True)
    raise typer.Exit(INVALID_CONFIG)


def certificate_ttl(text: str | None, refuse) -> int:
    """--cert-ttl as whole seconds (0: the CA's default); at least a minute, as the CA requires."""
    if text is None:
        return 0
    from meshctl.cli._durations import parse_duration

    try:
        seconds = parse_duration(text, "--cert-ttl")
    except typer.BadParameter as error:
        refuse(f"--cert-ttl: {error.message}")
    if seconds < 60:
        refuse(f"--cert-ttl {text!r}: at least 1m (the CA issues nothing shorter)")
    return int(seconds)


def check_identity_names(service_account: str | None, trust_domain: str, refuse) -> None:
    from meshctl.identity.spiffe import SpiffeIdError, check_service_account, check_trust_domain

    try:
        if service_account is not None:
            check_service_account(service_account)
        check_trust_domain(trust_domain)
    except SpiffeIdError as error:
        flag = "--service-account" if "service account" in str(error) else "--trust-domain"
        refuse(f"{flag}: {error}")


def tls_addresses(
    control_plane: str | None, xds_address: str | None, token: str
) -> tuple[tuple[str, int], ...]:
    """Each control plane's TLS port (CA, registry, xDS), in failover order.

    --xds-address lists them. Otherwise each --control-plane API is asked where its xDS server
    listens, which needs the API token; with a join token (no API access) it is the API's host
    at the default port. While every plane is away (one restarting as this sidecar starts), or
    answers before its xDS server is up (a restarted plane opens its API first), it asks again
    until one names its xDS address, rather than guess a port the plane may not use; a plane
    still away then gets the default port, and the agent fails over to the next one meanwhile.
    """
    from meshctl.control.client import resolve_address
    from meshctl.identity.tokens import is_join_token

    if xds_address:
        return tuple(_address(part.strip(), "--xds-address") for part in xds_address.split(",") if part.strip())
    # Several control planes (HA), comma-separated: the agent fails over along the list.
    listed = control_plane or os.environ.get("MESHCTL_CONTROL_PLANE") or ""
    apis = tuple(resolve_address(part.strip()) for part in listed.split(",") if part.strip())
    apis = apis or (resolve_address(None),)
    if is_join_token(token):
        return tuple((host, DEFAULT_TLS_PORT) for host, _ in apis)
    delay = 0.2
    while True:
        found = [_ask_xds_address(api, token) for api in apis]
        if any(address is not None for address in found):
            return tuple(address or (api[0], DEFAULT_TLS_PORT) for api, address in zip(apis, found))
        print(f"meshctl run: no control plane names its xDS address yet ({', '.join(f'{h}:{p}' for h, p in apis)}: "
              f"away, or starting); asking again in {delay:.1f}s", file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _ask_xds_address(api: tuple[str, int], token: str) -> tuple[str, int] | None:
    """Where the plane whose API is `api` serves xDS; None while it does not answer, or answers
    without one: a plane that is starting opens its API before its xDS server, and a sidecar that
    guessed the default port then would never find the plane's real one."""
    from meshctl.control.client import Client, ClientError

    host, port = api
    try:
        named = Client((host, port), token).sidecars().get("xds") or ""
    except ClientError as error:
        if not error.message.startswith(("cannot reach", "cannot talk")):
            raise  # it answered: a refused token is not a plane that is away
        return None
    if not named:
        return None
    xds_host, _, xds_port = named.rpartition(":")
    xds_host = xds_host.strip("[]")
    if xds_host in ("", "0.0.0.0", "::"):
        xds_host = host  # it listens everywhere: where we found it
    return xds_host, int(xds_port) if xds_port.isdigit() else DEFAULT_TLS_PORT


def _address(text: str, flag: str) -> tuple[str, int]:
    from meshctl.control.client import ClientError

    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"{flag} {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
