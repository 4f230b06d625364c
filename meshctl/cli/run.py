"""`meshctl run`: a standalone sidecar from a bootstrap file, optionally guarding an application."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from meshctl.agent import supervisor
from meshctl.agent.bootstrap import BootstrapError, load_bootstrap_file

if TYPE_CHECKING:
    from meshctl._core import Engine

# The same status click gives a usage error: the command line or its config is wrong.
INVALID_CONFIG = 2


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
    # Imported here, not at the top: commands that don't run the data plane (and --help) then
    # work without loading the engine.
    try:
        from meshctl import _core
    except ImportError as error:
        typer.echo(f"meshctl run: the engine is not built ({error}); run `pip install .`", err=True)
        raise typer.Exit(1) from None

    try:
        engine = _core.Engine(config, worker_threads=workers)
    except _core.ConfigError as error:
        _refuse(f"{bootstrap}: {error}")
    except OSError as error:
        _refuse(f"{bootstrap}: cannot bind: {error}")
    typer.echo(_ready_line(engine), err=True)
    raise typer.Exit(supervisor.serve(engine, command, drain_timeout))


def _refuse(message: str) -> NoReturn:
    typer.echo(f"meshctl run: {message}", err=True)
    raise typer.Exit(INVALID_CONFIG)


def _ready_line(engine: "Engine") -> str:
    where = [
        f"listener {name} on {_host_port(address)}"
        for name, address in sorted(engine.listener_addresses().items())
    ]
    admin = engine.admin_address()
    if admin is not None:
        where.append(f"admin on http://{_host_port(admin)}/")
    return "meshctl: sidecar ready: " + (", ".join(where) or "no listeners")


def _host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
