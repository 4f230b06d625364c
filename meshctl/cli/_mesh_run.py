"""`meshctl run --service ...`: check the mesh options, then hand over to the sidecar agent."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import NoReturn

import typer

from meshctl.agent.sidecar import INVALID_CONFIG

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


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
) -> NoReturn:
    for flag, value in (("--service", service), ("--namespace", namespace), ("--version", version)):
        if (value or flag != "--version") and (len(value) > 63 or not _LABEL.match(value)):
            _refuse(f"{flag} {value!r} is not a DNS label (lowercase letters, digits, '-')")
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
    from meshctl.control.client import ClientError, resolve_address, resolve_token

    try:
        # Several control planes (HA), comma-separated: the agent fails over along the list.
        listed = control_plane or os.environ.get("MESHCTL_CONTROL_PLANE") or ""
        planes = tuple(resolve_address(part.strip()) for part in listed.split(",") if part.strip())
        api = planes[0] if planes else resolve_address(None)
        api_token = resolve_token(token)
        xds = resolve_address(xds_address) if xds_address else None
    except ClientError as error:
        _refuse(error.message)
    options = AgentOptions(
        service=service, control_plane=api, token=api_token, version=version, namespace=namespace,
        app_port=app_port, service_port=service_port, protocol=protocol, address=address, outbound_port=outbound_port,
        inbound_port=inbound_port, admin_port=admin_port, lease_seconds=lease, xds_address=xds,
        control_planes=planes or (api,),
        workers=workers, drain_timeout=drain_timeout, capture=capture,
    )  # fmt: skip
    if capture:
        from meshctl.agent.capture import CaptureError, run_captured

        try:
            raise typer.Exit(run_captured(options, command or None))
        except CaptureError as error:
            _refuse(str(error))
    raise typer.Exit(main(options, command or None))


def _refuse(message: str) -> NoReturn:
    typer.echo(f"meshctl run: {message}", err=True)
    raise typer.Exit(INVALID_CONFIG)
