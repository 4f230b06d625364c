"""`meshctl serve`: the control plane: resource store, REST API (and, beside it, the xDS server)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from meshctl.control.paths import DEFAULT_API_PORT


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    store: Annotated[
        str | None,
        typer.Option(
            envvar="MESHCTL_STORE",
            show_envvar=True,
            help="Where resources live: sqlite:///PATH, or etcd://HOST:PORT,HOST:PORT\\[/PREFIX] "
            "shared by several control planes for HA. Default: store.db in the data dir "
            "($XDG_DATA_HOME/meshctl, else ~/.local/share/meshctl).",
        ),
    ] = None,
    api_host: Annotated[
        str,
        typer.Option(
            help="Address the REST API listens on. Loopback by default: the token travels in clear until TLS arrives."
        ),
    ] = "127.0.0.1",
    api_port: Annotated[
        int, typer.Option(min=0, max=65535, help="REST API port (0 picks a free one).")
    ] = DEFAULT_API_PORT,
    xds_host: Annotated[
        str, typer.Option(help="Address the xDS (ADS) server listens on; sidecars connect here.")
    ] = "127.0.0.1",
    xds_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="xDS (ADS) port (0 picks a free one). Plain h2c until TLS arrives.",
        ),
    ] = 15012,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="API token file, created (0600) at first start. Default: api-token in the data dir."
        ),
    ] = None,
) -> None:
    """Run the control plane until SIGTERM or Ctrl-C.

    `meshctl apply/get/delete` on this machine find it and its token without options.
    """
    # Imported here: `meshctl run` and the operator commands must not pay for trio or the store.
    import trio

    from meshctl.control.auth import TokenError
    from meshctl.control.paths import default_store_url, default_token_path
    from meshctl.control.plane import PlaneOptions
    from meshctl.control.store import StoreError

    logging.basicConfig(level=logging.INFO, format="meshctl serve: %(message)s")
    options = PlaneOptions(
        store_url=store or default_store_url(),
        api_host=api_host,
        api_port=api_port,
        token_path=token_file or default_token_path(),
    )
    try:
        trio.run(_main, options, (xds_host, xds_port))
    except (StoreError, TokenError, ValueError, OSError, BaseExceptionGroup) as error:
        # trio's nurseries wrap startup failures in exception groups; show the failure itself.
        leaves = _leaves(error)
        if not all(
            isinstance(leaf, (StoreError, TokenError, ValueError, OSError)) for leaf in leaves
        ):
            raise
        for leaf in leaves:
            if isinstance(leaf, OSError) and leaf.filename is None:
                message = f"cannot listen on {api_host}:{api_port} (API) or {xds_host}:{xds_port} (xDS): {leaf.strerror or leaf}"
            else:
                message = str(leaf)
            typer.echo(f"meshctl serve: {message}", err=True)
        raise typer.Exit(1) from None


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def _main(options: object, xds_address: tuple[str, int]) -> None:
    import signal

    import trio

    from meshctl.control.plane import run_control_plane
    from meshctl.control.registry import Registry
    from meshctl.control.xds_service import xds_service

    def ready(lines: list[str]) -> None:
        typer.echo(f"meshctl serve: ready: {'; '.join(lines)}", err=True)

    async with trio.open_nursery() as nursery:
        registry = Registry()
        services = (xds_service(registry, xds_address),)
        nursery.start_soon(run_control_plane, options, services, ready, registry)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                typer.echo(f"meshctl serve: {signal.Signals(received).name}, stopping", err=True)
                nursery.cancel_scope.cancel()
                break
