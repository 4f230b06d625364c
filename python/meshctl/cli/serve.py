"""`meshctl serve`: the control plane: resource store, REST API, and beside it the xDS server and the
certificate authority on one TLS port."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

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
            help="Address the REST API listens on. Loopback by default: over plain http:// the token travels in "
            "clear. The same port speaks TLS (https://, certificate from the CA, names as the xDS port's plus "
            "this address), where an operator certificate (namespace meshctl-system: "
            "spiffe://TRUST_DOMAIN/ns/meshctl-system/sa/NAME, from `meshctl identity operator-cert`) "
            "replaces the token."
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
            help="xDS (ADS) and CA port, TLS (0 picks a free one).",
        ),
    ] = 15012,
    xds_plaintext: Annotated[
        bool,
        typer.Option(
            "--xds-plaintext",
            help="Serve the xDS port as plaintext h2c, for debugging: no TLS, so no client certificates "
            "(join tokens and the API token still work for the CA).",
        ),
    ] = False,
    xds_name: Annotated[
        list[str] | None,
        typer.Option(
            "--xds-name",
            help="Another DNS name or IP address sidecars reach the xDS port by (its certificate names "
            "localhost, 127.0.0.1 and --xds-host already). Repeatable.",
        ),
    ] = None,
    trust_domain: Annotated[
        str, typer.Option(help="The SPIFFE trust domain of every workload identity.")
    ] = "cluster.local",
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            help="An operator-supplied CA certificate (root or intermediate) to sign with, instead of "
            "the root generated in <data dir>/ca/. Needs --ca-key."
        ),
    ] = None,
    ca_key: Annotated[
        Path | None, typer.Option(help="The private key of --ca-cert (PEM, unencrypted, mode 0600).")
    ] = None,
    ca_chain: Annotated[
        Path | None,
        typer.Option(
            help="With an intermediate --ca-cert: its issuers up to and including the root (PEM, root last)."
        ),
    ] = None,
    cert_ttl: Annotated[
        str, typer.Option(help="Workload certificate lifetime when the CSR asks for none (e.g. 24h, 30m).")
    ] = "24h",
    max_cert_ttl: Annotated[
        str, typer.Option(help="The longest workload certificate lifetime granted (at least 60s).")
    ] = "24h",
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="API token file, created (0600) at first start. Default: api-token in the data dir."
        ),
    ] = None,
    ratelimit_store: Annotated[
        str,
        typer.Option(
            envvar="MESHCTL_RATELIMIT_STORE",
            show_envvar=True,
            help="Where global rate limit counters live: memory (this plane alone), or "
            "redis://HOST:PORT\\[/DB] (rediss:// for TLS), shared by every plane of an HA setup.",
        ),
    ] = "memory",
    prometheus_file_sd: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="Keep this Prometheus file_sd file (JSON) listing every registered sidecar's metrics "
            "endpoint, with Istio's labels (app, version, namespace, pod), current as instances "
            "register, expire and leave. Point a file_sd_configs job at it: `meshctl prometheus-config "
            "--use-file-sd PATH` prints one.",
        ),
    ] = None,
    tracing_provider: Annotated[
        list[str] | None,
        typer.Option(
            help="A tracing provider Telemetry resources may name, as NAME=SERVICE:PORT: an OTLP/gRPC "
            "collector (Istio's MeshConfig extensionProviders[].opentelemetry), e.g. "
            "jaeger=jaeger-collector.observability:4317. Repeatable; the first is the default for "
            "Telemetry tracing that names no provider.",
        ),
    ] = None,
) -> None:
    """Run the control plane until SIGTERM or Ctrl-C.

    `meshctl apply/get/delete` on this machine find it and its token without options.
    """
    # Imported here: `meshctl run` and the operator commands must not pay for trio or the store.
    import trio

    from meshctl.cli._durations import parse_duration
    from meshctl.control.auth import TokenError
    from meshctl.control.identity_authority import CertificateSettings, IdentityAuthority
    from meshctl.control.paths import data_dir, default_store_url, default_token_path
    from meshctl.control.plane import PlaneOptions
    from meshctl.control.store import StoreError
    from meshctl.identity.ca import MIN_CERT_TTL, CaError, CertificateAuthority
    from meshctl.identity.spiffe import SpiffeIdError, check_trust_domain

    default_ttl = parse_duration(cert_ttl, "--cert-ttl")
    max_ttl = parse_duration(max_cert_ttl, "--max-cert-ttl")
    for option, value in (("--cert-ttl", default_ttl), ("--max-cert-ttl", max_ttl)):
        if value < MIN_CERT_TTL:
            raise typer.BadParameter(f"{value:g}s is shorter than the minimum, {MIN_CERT_TTL:g}s", param_hint=option)
    if default_ttl > max_ttl:
        raise typer.BadParameter(f"{cert_ttl} is longer than --max-cert-ttl {max_cert_ttl}", param_hint="--cert-ttl")
    try:
        check_trust_domain(trust_domain)
    except SpiffeIdError as error:
        raise typer.BadParameter(str(error), param_hint="--trust-domain") from None
    if ratelimit_store != "memory":
        from meshctl.control.ratelimit_redis import check_url

        try:
            check_url(ratelimit_store)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--ratelimit-store") from None

    if prometheus_file_sd is not None:
        from meshctl.control.prometheus_file_sd import check_writable

        try:
            check_writable(prometheus_file_sd)
        except OSError as error:
            raise typer.BadParameter(
                f"{prometheus_file_sd}: cannot write it (in {prometheus_file_sd.parent}): "
                f"{error.strerror or error}",
                param_hint="--prometheus-file-sd",
            ) from None

    from meshctl.resources import extension_providers

    try:
        extension_providers.configure(extension_providers.parse_provider(text) for text in tracing_provider or [])
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--tracing-provider") from None

    logging.basicConfig(level=logging.INFO, format="meshctl serve: %(message)s")
    options = PlaneOptions(
        store_url=store or default_store_url(),
        api_host=api_host,
        api_port=api_port,
        token_path=token_file or default_token_path(),
    )
    try:
        ca = CertificateAuthority.open(
            data_dir() / "ca", trust_domain, ca_cert=ca_cert, ca_key=ca_key, ca_chain=ca_chain
        )
    except (CaError, OSError) as error:
        typer.echo(f"meshctl serve: {error}", err=True)
        raise typer.Exit(1) from None
    authority = IdentityAuthority(ca, CertificateSettings(default_ttl=default_ttl, max_ttl=max_ttl))
    xds = _XdsOptions((xds_host, xds_port), xds_plaintext, list(xds_name or []), api_host)
    try:
        trio.run(_main, options, xds, authority, ratelimit_store, prometheus_file_sd)
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


@dataclass(frozen=True)
class _XdsOptions:
    address: tuple[str, int]
    plaintext: bool
    names: list[str]
    api_host: str  # the API port's certificate names it too


async def _main(
    options: Any, xds: _XdsOptions, authority: Any, ratelimit_store: str, prometheus_file_sd: Path | None
) -> None:
    import signal

    import trio

    from meshctl.control.api_tls import ApiTls
    from meshctl.control.auth import ensure_token
    from meshctl.control.identity_api import IdentityApi
    from meshctl.control.identity_authority import identity_service
    from meshctl.control.plane import run_control_plane
    from meshctl.control.ratelimit_counters import GlobalCounters
    from meshctl.control.ratelimit_local_status import LocalRateLimitStatus
    from meshctl.control.ratelimit_service import RateLimitStatus
    from meshctl.control.registry import Registry
    from meshctl.control.xds_service import xds_service
    from meshctl.control.xds_tls import ServerTls, server_names

    def ready(lines: list[str]) -> None:
        typer.echo(f"meshctl serve: ready: {'; '.join(lines)}", err=True)

    async with trio.open_nursery() as nursery:
        registry = Registry()
        xds_names = server_names(xds.address[0], xds.names)
        tls = None if xds.plaintext else ServerTls(authority.ca, xds_names)
        # The API port's certificate: the xDS port's names, and the API's own address.
        api_tls = ApiTls(
            ServerTls(authority.ca, server_names(xds.api_host, xds_names), alpn=["http/1.1"], purpose="API"),
            authority,
        )
        # The global rate limit counters: counted by the xDS port's service, shown by the API.
        counters: Any
        if ratelimit_store == "memory":
            counters = GlobalCounters()
        else:
            from meshctl.control.ratelimit_redis import RedisCounters, shown_url

            counters = RedisCounters(ratelimit_store)
            await nursery.start(counters.follow_history)
            typer.echo(f"meshctl serve: global rate limits counted in Redis at {shown_url(ratelimit_store)}", err=True)
        services: tuple[Any, ...] = (
            identity_service(authority),  # first: the CA is bound to the store before xDS serves
            xds_service(registry, xds.address, authority=authority,
                        api_token=ensure_token(options.token_path), tls=tls, counters=counters),  # fmt: skip
        )
        if prometheus_file_sd is not None:
            from meshctl.control.prometheus_file_sd import file_sd_service

            # Last: the registry is restored (or shared) by then, so the first write lists every instance.
            services += (file_sd_service(registry, prometheus_file_sd),)
        nursery.start_soon(
            functools.partial(run_control_plane, api_extensions=[
                IdentityApi(authority), RateLimitStatus(counters),
                # The local rules' counts, as the sidecars report them with their renewals.
                LocalRateLimitStatus(registry.rate_limit_counts, registry.now),
            ], api_tls=api_tls),
            options, services, ready, registry,
        )  # fmt: skip
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                typer.echo(f"meshctl serve: {signal.Signals(received).name}, stopping", err=True)
                nursery.cancel_scope.cancel()
                break
