"""`meshctl identity operator-cert`: an operator's client certificate for meshctl's own calls to the
control plane (https:// with --client-cert instead of the API token)."""

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

COMMAND = "identity operator-cert"


def register(group: typer.Typer) -> None:
    """Add `operator-cert` to the `meshctl identity` group."""
    group.command("operator-cert")(operator_cert)


def operator_cert(
    name: Annotated[
        str,
        typer.Option(
            help="The operator's name: the certificate's identity is service account NAME in the "
            "namespace meshctl-system, spiffe://TRUST_DOMAIN/ns/meshctl-system/sa/NAME."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            file_okay=False,
            help="Directory to write cert.pem (leaf and intermediates), key.pem (mode 0600) and "
            "root.pem (the trust bundle) into; created if missing.",
        ),
    ],
    ttl: Annotated[
        str,
        typer.Option(help="Lifetime to ask for (e.g. 1h, 24h; capped by serve --max-cert-ttl)."),
    ] = "24h",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Get an operator certificate, spiffe://TRUST_DOMAIN/ns/meshctl-system/sa/NAME, signed by the
    mesh's CA as a workload's is. The key is made here and never sent (only a CSR is). Then any
    command reaches the control plane with it instead of the API token:
    --control-plane https://HOST:PORT --client-cert DIR/cert.pem --client-key DIR/key.pem
    --ca-root DIR/root.pem (or $MESHCTL_CLIENT_CERT, $MESHCTL_CLIENT_KEY, $MESHCTL_CA_ROOT).
    Revoke it like any certificate: `meshctl identity revoke SERIAL`."""
    from meshctl.agent.cert_files import CERT_FILE, KEY_FILE, ROOT_FILE, write_cert_dir
    from meshctl.agent.workload_csr import (
        IssuedCertificateError,
        certificate_request,
        new_private_key,
        private_key_pem,
        read_issued_chain,
    )
    from meshctl.cli._durations import parse_duration
    from meshctl.control.api_tls import operator_identity
    from meshctl.control.client import ClientError
    from meshctl.identity.spiffe import SpiffeIdError, check_service_account

    try:
        check_service_account(name)
    except SpiffeIdError as error:
        raise typer.BadParameter(str(error), param_hint="--name") from None
    seconds = parse_duration(ttl, "--ttl")
    client = connect(control_plane, token, COMMAND, client_cert, client_key, ca_root)
    try:
        trust_domain = client.roots()["trustDomain"]
        spiffe_id = str(operator_identity(trust_domain, name))
        key = new_private_key()
        answer = client.operator_certificate(name, certificate_request(key, spiffe_id), seconds)
    except ClientError as error:
        fail(COMMAND, error)
    try:
        issued = read_issued_chain(answer["certChain"], key, spiffe_id)
    except IssuedCertificateError as error:
        typer.echo(f"meshctl {COMMAND}: {error}", err=True)
        raise typer.Exit(1) from None
    try:
        write_cert_dir(
            out, issued.leaf_and_intermediates_pem, private_key_pem(key), answer["roots"].encode()
        )
    except OSError as error:
        typer.echo(
            f"meshctl {COMMAND}: cannot write into {out}: {error.strerror or error}", err=True
        )
        raise typer.Exit(1) from None
    capped = (
        " (capped by the control plane's --max-cert-ttl)" if issued.lifetime < seconds - 120 else ""
    )
    typer.echo(f"operator certificate {issued.serial} for {spiffe_id}, valid until "
               f"{issued.not_after:%Y-%m-%dT%H:%M:%SZ}{capped}")  # fmt: skip
    typer.echo(f"  {out / CERT_FILE}\n  {out / KEY_FILE} (mode 0600)\n  {out / ROOT_FILE}")
    typer.echo(f"use it: --control-plane https://HOST:PORT --client-cert {out / CERT_FILE} "
               f"--client-key {out / KEY_FILE} --ca-root {out / ROOT_FILE}")  # fmt: skip
