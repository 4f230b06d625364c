"""Options and error handling shared by the commands that talk to the control plane's API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from meshctl.control.client import Client, ClientError

ControlPlaneOption = Annotated[
    str | None,
    typer.Option(
        "--control-plane",
        envvar="MESHCTL_CONTROL_PLANE",
        show_envvar=True,
        help="The control plane's API, HOST:PORT (http) or https://HOST:PORT (TLS, verified with "
        "--ca-root; with --client-cert no token is sent). Default: 127.0.0.1:15080.",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="MESHCTL_TOKEN",
        show_envvar=True,
        help="API token. Default: the one `meshctl serve` wrote to the data dir.",
    ),
]
ClientCertOption = Annotated[
    Path | None,
    typer.Option(
        "--client-cert",
        envvar="MESHCTL_CLIENT_CERT",
        show_envvar=True,
        dir_okay=False,
        help="With an https:// control plane: authenticate with this client certificate (PEM, leaf "
        "first) instead of the API token. It must be an operator identity: service account NAME "
        "in the namespace meshctl-system, spiffe://TRUST_DOMAIN/ns/meshctl-system/sa/NAME, from "
        "`meshctl identity operator-cert`.",
    ),
]
ClientKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--client-key",
        envvar="MESHCTL_CLIENT_KEY",
        show_envvar=True,
        dir_okay=False,
        help="The private key of --client-cert (PEM, mode 0600).",
    ),
]
CaRootOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-root",
        envvar="MESHCTL_CA_ROOT",
        show_envvar=True,
        dir_okay=False,
        help="With an https:// control plane: the mesh's root bundle to verify it with. Default: "
        "<data dir>/ca/root-bundle.pem, which a local `meshctl serve` writes.",
    ),
]
NamespaceOption = Annotated[
    str, typer.Option("--namespace", "-n", help="The resources' namespace.")
]


def connect(
    control_plane: str | None,
    token: str | None,
    command: str,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    ca_root: Path | None = None,
) -> Client:
    """A client for the control plane: http with the API token by default; over https:// with
    the token, or with the client certificate and no token."""
    # Imported here so `meshctl --help` and `meshctl run` never load the control-plane code.
    from meshctl.control.client import (
        Client,
        ClientError,
        client_tls_context,
        resolve_endpoint,
        resolve_tls,
        resolve_token,
    )

    try:
        endpoint = resolve_endpoint(control_plane)
        tls = resolve_tls(endpoint, client_cert, client_key, ca_root)
        context = client_tls_context(tls) if tls is not None else None
        presented = (
            None if tls is not None and tls.client_cert is not None else resolve_token(token)
        )
        return Client((endpoint.host, endpoint.port), presented, context)
    except ClientError as error:
        fail(command, error)


def fail(command: str, error: ClientError, context: str = "") -> NoReturn:
    """Print the refusal and every detail, then exit with the code the API chose."""
    prefix = f"{context}: " if context else ""
    typer.echo(f"meshctl {command}: {prefix}{error.message}", err=True)
    for detail in error.details:
        field = f"{detail['field']}: " if detail.get("field") else ""
        typer.echo(f"  {detail['resource']}: {field}{detail['reason']}", err=True)
    raise typer.Exit(error.exit_code)
