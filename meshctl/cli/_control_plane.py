"""Options and error handling shared by the commands that talk to the control plane's API."""

from __future__ import annotations

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
        help="The control plane's API, HOST:PORT. Default: 127.0.0.1:15080.",
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
NamespaceOption = Annotated[
    str, typer.Option("--namespace", "-n", help="The resources' namespace.")
]


def connect(control_plane: str | None, token: str | None, command: str) -> Client:
    # Imported here so `meshctl --help` and `meshctl run` never load the control-plane code.
    from meshctl.control.client import Client, ClientError, resolve_address, resolve_token

    try:
        return Client(resolve_address(control_plane), resolve_token(token))
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
