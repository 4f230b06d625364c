"""`meshctl prometheus-config`: a Prometheus scrape config for every registered sidecar's metrics
(labelled as Istio's Prometheus setup labels them), or the file_sd file of those targets."""

from __future__ import annotations

from pathlib import Path
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


def register(app: typer.Typer) -> None:
    app.command("prometheus-config")(prometheus_config)


def prometheus_config(
    file_sd: Annotated[
        Path | None,
        typer.Option(
            "--file-sd",
            dir_okay=False,
            help="Write today's targets to this Prometheus file_sd file (JSON, replaced in one rename) "
            "instead of printing a config. `meshctl serve --prometheus-file-sd PATH` keeps one current.",
        ),
    ] = None,
    use_file_sd: Annotated[
        str | None,
        typer.Option(
            "--use-file-sd",
            metavar="PATH",
            help="Print a config whose job reads its targets from this file_sd file (as Prometheus "
            "sees the path), the one `meshctl serve --prometheus-file-sd` keeps, instead of listing "
            "today's. Needs no control plane.",
        ),
    ] = None,
    scrape_interval: Annotated[
        str, typer.Option(help="How often Prometheus scrapes (e.g. 15s, 1s, 500ms).")
    ] = "15s",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Print a Prometheus config scraping every registered sidecar's /stats/prometheus.

    Each target is labelled app, version, namespace and pod (the instance's node id), plus the
    instance's own labels, as Istio's Prometheus setup labels a pod's Envoy. The sidecars' metrics
    endpoint listens on loopback: run Prometheus on their host.
    """
    from meshctl.cli._durations import parse_duration
    from meshctl.control.prometheus_targets import file_sd_groups, scrape_config

    if file_sd is not None and use_file_sd is not None:
        raise typer.BadParameter(
            "--file-sd writes targets, --use-file-sd prints a config: give one",
            param_hint="--file-sd",
        )
    interval = _prometheus_duration(parse_duration(scrape_interval, "--scrape-interval"))
    if use_file_sd is not None:
        if not use_file_sd.strip():
            raise typer.BadParameter("an empty path", param_hint="--use-file-sd")
        typer.echo(scrape_config(file_sd_path=use_file_sd, scrape_interval=interval), nl=False)
        return

    from meshctl.control.client import ClientError

    client = connect(control_plane, token, "prometheus-config", client_cert, client_key, ca_root)
    try:
        groups = file_sd_groups(client.sidecars()["items"])
    except ClientError as error:
        fail("prometheus-config", error)
    if file_sd is None:
        typer.echo(scrape_config(groups=groups, scrape_interval=interval), nl=False)
        return

    from meshctl.control.prometheus_file_sd import file_sd_text, write_atomically

    try:
        write_atomically(file_sd, file_sd_text(groups))
    except OSError as error:
        typer.echo(
            f"meshctl prometheus-config: --file-sd {file_sd}: {error.strerror or error}", err=True
        )
        raise typer.Exit(1) from None
    typer.echo(f"meshctl prometheus-config: {len(groups)} targets written to {file_sd}", err=True)


def _prometheus_duration(seconds: float) -> str:
    """Seconds as Prometheus writes a duration: whole seconds, else milliseconds (its finest unit here)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    milliseconds = round(seconds * 1000)
    if milliseconds < 1:
        raise typer.BadParameter(
            f"{seconds:g}s is shorter than a millisecond", param_hint="--scrape-interval"
        )
    return f"{milliseconds}ms"
