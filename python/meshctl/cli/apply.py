"""`meshctl apply -f FILE|-`: create or update mesh resources, all of a file or none of it."""

from __future__ import annotations

import sys
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

# The API refuses bodies over this too; checking first gives the message without the upload.
MAX_INPUT = 4 * 1024 * 1024
INVALID_INPUT = 2


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)


def apply(
    filename: Annotated[
        str,
        typer.Option(
            "--filename", "-f", help="YAML file, one or more documents ('---'); '-' reads stdin."
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate against the control plane, store nothing.")
    ] = False,
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Create or update the resources in FILE: all of them, or none if any is invalid.

    Exit codes: 0 applied; 2 invalid (every problem is listed; nothing was changed);
    3 conflict (a resource changed since the metadata.resourceVersion you applied against);
    1 anything else (control plane unreachable, wrong token).
    """
    from meshctl.control.client import ClientError

    text = _read(filename)
    client = connect(control_plane, token, "apply", client_cert, client_key, ca_root)
    try:
        answer = client.apply(text, dry_run=dry_run)
    except ClientError as error:
        fail("apply", error, context=filename if filename != "-" else "stdin")
    suffix = " (dry run)" if dry_run else ""
    for result in answer["results"]:
        where = f"{result['kind']} {result['namespace']}/{result['name']}"
        version = f" (version {result['version']})" if result["version"] else ""
        typer.echo(f"{where} {result['action']}{version}{suffix}")
        for path in result.get("notEnforced", []):
            typer.echo(f"meshctl apply: note: {where}: {path}: stored, not yet enforced", err=True)


def _read(filename: str) -> bytes:
    try:
        if filename == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with open(filename, "rb") as file:
                data = file.read(MAX_INPUT + 1)
    except OSError as error:
        typer.echo(f"meshctl apply: cannot read {filename}: {error.strerror or error}", err=True)
        raise typer.Exit(INVALID_INPUT) from None
    if len(data) > MAX_INPUT:
        typer.echo(
            f"meshctl apply: {filename} is over {MAX_INPUT // (1024 * 1024)} MiB; split it",
            err=True,
        )
        raise typer.Exit(INVALID_INPUT)
    return data
