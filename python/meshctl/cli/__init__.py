"""The meshctl command line: one typer app, with one module per command group."""

from typing import Annotated

import typer

import meshctl
from meshctl.cli import (
    apply,
    dashboard,
    delete,
    demo,
    get,
    identity,
    prometheus,
    ratelimit,
    route,
    run,
    serve,
    top,
)

app = typer.Typer(
    help="meshctl: a service mesh. A fast sidecar proxy and the control plane that steers it.",
    no_args_is_help=True,
    add_completion=False,
    # Plain tracebacks: rich's boxed ones print every local, config bytes included.
    pretty_exceptions_enable=False,
)
run.register(app)
# Control-plane commands: their modules import only typer; the work is imported when they run.
for _group in (serve, apply, get, delete, route, ratelimit, top, dashboard, demo, identity, prometheus):
    _group.register(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"meshctl {meshctl.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    # A callback keeps `run` a subcommand even while it is the only one.
    pass


def main() -> None:
    """The console script `meshctl`."""
    app()
