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


def run(
    bootstrap: Annotated[
        Path,
        typer.Option(
            "--bootstrap", "-c", dir_okay=False, help="Envoy-style bootstrap file, YAML or JSON."
        ),
    ],
    workers: Annotated[int, typer.Option(min=1, help="Engine worker threads.")] = 1,
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
    """Run a sidecar from a bootstrap file until SIGTERM/SIGINT, or beside COMMAND until it exits.

    COMMAND starts once the sidecar's listeners are bound. SIGTERM is passed on to it.
    When it exits, meshctl drains the sidecar and exits with the command's status.
    """
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
