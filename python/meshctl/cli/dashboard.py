"""`meshctl dashboard`: serve the mesh's web dashboard (services, the calls between them, traffic
splits, recent errors) from the control plane's registry and the sidecars' metrics."""

from __future__ import annotations

from typing import Annotated

import typer

from meshctl.cli._control_plane import (
    CaRootOption,
    ClientCertOption,
    ClientKeyOption,
    ControlPlaneOption,
    TokenOption,
    connect,
    fail,
)

# Kiali's port, which `istioctl dashboard kiali` forwards to: where Istio users look first.
DEFAULT_PORT = 20001

HELP = (
    "Serve the mesh's web dashboard until Ctrl-C.\n\n"
    "The page shows every registered service and the calls between them, each edge with "
    "requests/s, success rate (not 5xx and answered) and p99 over the last window, green where the "
    "callee's sidecar saw mutual TLS; the split of each service's requests across its versions; "
    "and the failed responses of the last 5 minutes with their response flags. It reads only the "
    "control plane's registry and the sidecars' Istio metrics (istio_requests_total, "
    "istio_request_duration_milliseconds), every --interval, from the sidecars on this machine "
    "(their admin endpoints are loopback-only). GET /api/graph answers the same as JSON."
)


def register(app: typer.Typer) -> None:
    app.command("dashboard", help=HELP)(dashboard)


def dashboard(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to serve on (0: any free one).")] = DEFAULT_PORT,
    address: Annotated[str, typer.Option(help="Address to serve on (loopback by default: the page has no login).")] = "127.0.0.1",
    interval: Annotated[str, typer.Option(help="Seconds between reads of the sidecars: 2, 500ms, 5s.")] = "2",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Serve the dashboard; see HELP."""
    import threading

    from meshctl.cli._durations import parse_duration
    from meshctl.control.client import ClientError
    from meshctl.dashboard.server import Dashboard

    seconds = parse_duration(interval, "--interval")
    client = connect(control_plane, token, "dashboard", client_cert, client_key, ca_root)
    try:
        client.sidecars()  # unreachable or refusing: said now, not on the page later
    except ClientError as error:
        fail("dashboard", error)
    try:
        served = Dashboard(lambda: client.sidecars()["items"], address, port, seconds).start()
    except OSError as error:
        typer.echo(f"meshctl dashboard: cannot serve on {address}:{port}: {error.strerror or error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"dashboard: {served.url} (Ctrl-C stops it)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        served.close()
