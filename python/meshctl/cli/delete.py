"""`meshctl delete KIND NAME`: remove one mesh resource."""

from __future__ import annotations

from typing import Annotated

import typer

from meshctl.cli._control_plane import (
    CaRootOption,
    ClientCertOption,
    ClientKeyOption,
    ControlPlaneOption,
    NamespaceOption,
    TokenOption,
    connect,
    fail,
)


def register(app: typer.Typer) -> None:
    app.command("delete")(delete)


def delete(
    kind: Annotated[
        str,
        typer.Argument(
            help="VirtualService (vs), DestinationRule (dr), ServiceEntry (se), WorkloadEntry (we)."
        ),
    ],
    name: Annotated[str, typer.Argument(help="The resource's name.")],
    namespace: NamespaceOption = "default",
    resource_version: Annotated[
        int | None,
        typer.Option(
            "--resource-version",
            help="Refuse (exit 3) unless the resource is still at this version.",
        ),
    ] = None,
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Delete one resource. Refused (exit 2) while a VirtualService still routes to a subset it defines.

    Exit codes: 0 deleted; 2 refused; 3 changed since --resource-version; 4 not found; 1 other.
    """
    from meshctl.control.client import ClientError

    client = connect(control_plane, token, "delete", client_cert, client_key, ca_root)
    try:
        answer = client.delete(kind, namespace, name, resource_version)
    except ClientError as error:
        fail("delete", error)
    for result in answer["results"]:
        typer.echo(f"{result['kind']} {result['namespace']}/{result['name']} deleted")
