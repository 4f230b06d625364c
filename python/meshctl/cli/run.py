"""`meshctl run`: a standalone sidecar from a bootstrap file, optionally guarding an application."""

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from meshctl.agent.bootstrap import BootstrapError, load_bootstrap_file
from meshctl.agent.sidecar import INVALID_CONFIG, exec_sidecar


def register(app: typer.Typer) -> None:
    """Add `run` to the meshctl app."""
    # Everything from the first word that is not an option on belongs to the application, so
    # its own options (`python app.py --port 1`) need no `--` in front of them.
    app.command(context_settings={"allow_interspersed_args": False})(run)


_MESH = "Mesh sidecar (with --service)"
_IDENTITY = "Identity (with --service)"


def run(
    bootstrap: Annotated[
        Path | None,
        typer.Option(
            "--bootstrap",
            "-c",
            dir_okay=False,
            help="Envoy-style bootstrap file, YAML or JSON: a standalone sidecar. "
            "Without it, --service joins the mesh of a control plane.",
        ),
    ] = None,
    service: Annotated[
        str | None,
        typer.Option(help="Join the mesh as an instance of this service.", rich_help_panel=_MESH),
    ] = None,
    version: Annotated[
        str, typer.Option(help="The instance's version label (version=V).", rich_help_panel=_MESH)
    ] = "",
    namespace: Annotated[
        str | None,
        typer.Option(
            help="The instance's namespace. Default: the join token's, else default.",
            rich_help_panel=_MESH,
        ),
    ] = None,
    app_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Port the application serves on (127.0.0.1). Without it the "
            "sidecar only sends (a client).",
            rich_help_panel=_MESH,
        ),
    ] = None,
    service_port: Annotated[
        int,
        typer.Option(
            min=1,
            max=65535,
            help="The port clients call the service by (reviews:9080).",
            rich_help_panel=_MESH,
        ),
    ] = 80,
    app_protocol: Annotated[
        str,
        typer.Option(
            help="What the app speaks: HTTP (HTTP/1.1 to it), HTTP2 or GRPC (h2c to it).",
            rich_help_panel=_MESH,
        ),
    ] = "HTTP",
    control_plane: Annotated[
        str | None,
        typer.Option(
            envvar="MESHCTL_CONTROL_PLANE",
            help="The control plane's API, HOST:PORT, or several comma-separated to fail over between planes. Default: 127.0.0.1:15080. The sidecar talks to each plane's TLS port (--xds-address).",
            rich_help_panel=_MESH,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MESHCTL_TOKEN",
            help="A join token (`meshctl identity token create`: the workload's service account "
            "and namespace) or the API token (an operator: any service account). "
            "Default: the API token `meshctl serve` wrote.",
            rich_help_panel=_IDENTITY,
        ),
    ] = None,
    service_account: Annotated[
        str | None,
        typer.Option(
            help="The workload's service account (its SPIFFE ID's sa/). Default: the join "
            "token's, else the service's name.",
            rich_help_panel=_IDENTITY,
        ),
    ] = None,
    ca_root: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHCTL_CA_ROOT",
            dir_okay=False,
            help="The mesh's root bundle (PEM), to verify the control plane. "
            "Default: <data dir>/ca/root-bundle.pem, which a local `meshctl serve` writes.",
            rich_help_panel=_IDENTITY,
        ),
    ] = None,
    cert_ttl: Annotated[
        str | None,
        typer.Option(
            help="Lifetime to ask for the workload certificate (2m, 1h; the CA caps it, "
            "and may not go below 1m). Renewed at half of it. Default: the CA's (24h).",
            rich_help_panel=_IDENTITY,
        ),
    ] = None,
    cert_dir: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Also keep cert.pem, key.pem (0600) and root.pem here, rewritten atomically "
            "at every renewal (for a process that reads certificates from files).",
            rich_help_panel=_IDENTITY,
        ),
    ] = None,
    trust_domain: Annotated[
        str,
        typer.Option(help="The mesh's trust domain (SPIFFE).", rich_help_panel=_IDENTITY),
    ] = "cluster.local",
    xds_address: Annotated[
        str | None,
        typer.Option(
            help="The control plane's TLS port (CA, registry and xDS), HOST:PORT, or several "
            "comma-separated (one per plane). Default: the one each --control-plane names "
            "(asked with the API token), else its host at port 15012.",
            rich_help_panel=_MESH,
        ),
    ] = None,
    address: Annotated[
        str,
        typer.Option(help="Address other sidecars reach this instance at.", rich_help_panel=_MESH),
    ] = "127.0.0.1",
    outbound_port: Annotated[int, typer.Option(min=1, max=65535, rich_help_panel=_MESH)] = 15001,
    inbound_port: Annotated[int, typer.Option(min=1, max=65535, rich_help_panel=_MESH)] = 15006,
    admin_port: Annotated[int, typer.Option(min=0, max=65535, rich_help_panel=_MESH)] = 15000,
    lease: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=3600,
            help="Registration lease, seconds; renewed at a third of it.",
            rich_help_panel=_MESH,
        ),
    ] = 10.0,
    capture: Annotated[
        bool,
        typer.Option(
            "--capture",
            help="Transparent capture (root, Linux): iptables REDIRECT in this network namespace "
            "sends outbound TCP to --outbound-port and TCP to --app-port to --inbound-port; "
            "the app runs without HTTP_PROXY. Rules are removed when meshctl exits.",
            rich_help_panel=_MESH,
        ),
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Engine worker threads.")] = 1,
    istio_metrics_expiry: Annotated[
        str,
        typer.Option(
            help="Istio metric series (istio_requests_total, ...) not updated for this long are "
            "dropped (90s, 10m, 1h, or seconds).",
            rich_help_panel=_MESH,
        ),
    ] = "10m",
    istio_metrics_max_series: Annotated[
        int,
        typer.Option(
            min=1,
            help="At most this many Istio metric series of each kind (HTTP, TCP); samples of new "
            "ones beyond it are counted in meshctl_istio_series_overflow_total.",
            rich_help_panel=_MESH,
        ),
    ] = 10_000,
    drain_timeout: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds requests in flight get to finish at shutdown."),
    ] = 5.0,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="COMMAND", help="The application the sidecar guards, and its arguments."
        ),
    ] = None,
) -> None:
    """Run a sidecar from a bootstrap file (or in the mesh of a control plane, with --service)
    until SIGTERM/SIGINT, or beside COMMAND until it exits.

    With --service, COMMAND runs with HTTP_PROXY=http://127.0.0.1:OUTBOUND, so it reaches mesh
    services by name (curl http://reviews:9080/).

    COMMAND starts once the sidecar's listeners are bound. SIGTERM is passed on to it.
    When it exits, meshctl drains the sidecar and exits with the command's status.
    """
    if bootstrap is not None and service is not None:
        _refuse(
            "--bootstrap and --service exclude each other: a sidecar is standalone or in a mesh"
        )
    if bootstrap is None and service is None:
        _refuse("give --bootstrap FILE (a standalone sidecar) or --service NAME (join a mesh)")
    if capture and service is None:
        _refuse("--capture needs --service: the control plane gives a capturing sidecar its listeners")
    if service is None:
        identity_flags = {
            "--service-account": service_account, "--ca-root": ca_root, "--cert-ttl": cert_ttl,
            "--cert-dir": cert_dir, "--namespace": namespace,
        }  # fmt: skip
        given = [flag for flag, value in identity_flags.items() if value is not None]
        if given:
            _refuse(f"{given[0]} needs --service: a standalone sidecar's certificates are in its bootstrap")
    if service is not None:
        from meshctl.cli._durations import parse_duration
        from meshctl.cli._mesh_run import run_in_mesh  # trio and the ADS client: this path only

        expiry = parse_duration(istio_metrics_expiry, "--istio-metrics-expiry")

        run_in_mesh(
            service=service, version=version, namespace=namespace, app_port=app_port,
            service_port=service_port, app_protocol=app_protocol, control_plane=control_plane, token=token,
            xds_address=xds_address, address=address, outbound_port=outbound_port,
            inbound_port=inbound_port, admin_port=admin_port, lease=lease, workers=workers,
            drain_timeout=drain_timeout, command=command, capture=capture,
            service_account=service_account, ca_root=ca_root, cert_ttl=cert_ttl, cert_dir=cert_dir,
            trust_domain=trust_domain, istio_metrics_expiry=expiry,
            istio_metrics_max_series=istio_metrics_max_series,
        )  # fmt: skip
        return
    assert bootstrap is not None
    try:
        config = load_bootstrap_file(bootstrap)
    except BootstrapError as error:
        _refuse(str(error))
    # The rest (engine start, its config errors, supervision) happens in a fresh process image
    # that holds none of the libraries loaded so far; see meshctl.agent.sidecar.
    exec_sidecar(config, str(bootstrap), workers, drain_timeout, command)


def _refuse(message: str) -> NoReturn:
    typer.echo(f"meshctl run: {message}", err=True)
    raise typer.Exit(INVALID_CONFIG)
