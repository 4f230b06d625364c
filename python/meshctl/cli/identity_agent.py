"""`meshctl identity agent`: keep a workload certificate fresh in files, without a sidecar engine
(a real Envoy beside it reads them)."""

from pathlib import Path
from typing import Annotated, NoReturn

import typer

# The same status click gives a usage error.
USAGE_ERROR = 2


def register(group: typer.Typer) -> None:
    """Add `agent` to the `meshctl identity` group."""
    group.command("agent")(agent)


def agent(
    cert_dir: Annotated[
        Path,
        typer.Option(
            file_okay=False,
            help="Where to keep cert.pem (leaf and intermediates), key.pem (0600) and root.pem "
            "(trusted roots), each rewritten atomically at every renewal.",
        ),
    ],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MESHCTL_TOKEN",
            help="A join token (its service account and namespace), or the API token with "
            "--service-account. Default: the API token `meshctl serve` wrote.",
        ),
    ] = None,
    service_account: Annotated[
        str | None,
        typer.Option(help="The service account. Default: the join token's."),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="The namespace. Default: the join token's, else default.")
    ] = None,
    cert_ttl: Annotated[
        str | None,
        typer.Option(help="Lifetime to ask for (2m, 1h; the CA caps it). Renewed at half of it."),
    ] = None,
    ca_root: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHCTL_CA_ROOT",
            dir_okay=False,
            help="The mesh's root bundle, to verify the control plane. "
            "Default: <data dir>/ca/root-bundle.pem.",
        ),
    ] = None,
    control_plane: Annotated[
        str | None,
        typer.Option(
            envvar="MESHCTL_CONTROL_PLANE",
            help="The control plane's API, HOST:PORT (several comma-separated). "
            "Default: 127.0.0.1:15080.",
        ),
    ] = None,
    xds_address: Annotated[
        str | None,
        typer.Option(
            help="The control plane's TLS port (CA), HOST:PORT, several comma-separated. "
            "Default: the one --control-plane names, else its host at port 15012.",
        ),
    ] = None,
    trust_domain: Annotated[str, typer.Option(help="The mesh's trust domain.")] = "cluster.local",
) -> None:
    """Keep a workload certificate fresh in files (cert.pem, key.pem, root.pem) for a process beside it.

    The key is made here; a CSR and the token obtain the certificate, which is renewed at
    half-life until SIGTERM/SIGINT."""
    from meshctl.agent.identity_agent import IdentityAgentOptions, main
    from meshctl.cli._mesh_run import certificate_ttl, check_identity_names, tls_addresses
    from meshctl.control.client import ClientError, resolve_token
    from meshctl.control.paths import default_ca_root_path
    from meshctl.identity.spiffe import SpiffeIdError, check_namespace

    ttl_seconds = certificate_ttl(cert_ttl, _refuse)
    check_identity_names(service_account, trust_domain, _refuse)
    if namespace is not None:
        try:
            check_namespace(namespace)
        except SpiffeIdError as error:
            _refuse(f"--namespace: {error}")
    try:
        presented = resolve_token(token)
        planes = tls_addresses(control_plane, xds_address, presented)
    except ClientError as error:
        _refuse(error.message)
    options = IdentityAgentOptions(
        token=presented, cert_dir=cert_dir, control_planes=planes,
        ca_root=ca_root or default_ca_root_path(), service_account=service_account,
        namespace=namespace, trust_domain=trust_domain, cert_ttl=ttl_seconds,
    )  # fmt: skip
    raise typer.Exit(main(options))


def _refuse(message: str) -> NoReturn:
    typer.echo(f"meshctl identity agent: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)
