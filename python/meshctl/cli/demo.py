"""`meshctl demo`: the whole mesh on one machine, with traffic and a live weight shift."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    duration: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            help="Seconds to run, then stop everything (default: until Ctrl-C).",
        ),
    ] = None,
    shift: Annotated[
        bool,
        typer.Option(
            "--shift/--no-shift",
            help="Shift reviews v1=100 → v1=50,v3=50 → v3=100; --no-shift keeps an even split.",
        ),
    ] = True,
    keep_logs: Annotated[
        bool, typer.Option(help="Keep the temp dir with every process's log.")
    ] = False,
) -> None:
    """Run a whole mesh on this machine, with traffic and a live weight shift.

    Starts a control plane (SQLite store in a temp dir) and a bookinfo-like set of services,
    each behind its own sidecar: productpage calls reviews v1/v2/v3 and details; reviews v2 and
    v3 call ratings. Sends traffic and shows the live split of reviews requests across versions
    while the weights shift. Ctrl-C stops everything it started.
    """
    import sys

    # Imported here: `meshctl run` and `--help` never load the demo.
    from meshctl.demo.runner import run_demo

    raise typer.Exit(run_demo(sys.stdout, duration, shift, keep_logs))
