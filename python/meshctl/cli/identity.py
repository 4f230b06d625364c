"""`meshctl identity ...`: join tokens, issued workload certificates, revocation and the CA's roots,
through the control plane's REST API (API token), like `meshctl apply`.

Exit codes as the other commands: 0 done; 2 invalid input; 3 refused by the current state (a
rotation already under way); 4 not found; 1 anything else.
"""

from __future__ import annotations

import datetime
from typing import Annotated

import typer

from meshctl.cli import identity_agent, identity_operator
from meshctl.cli._control_plane import (
    CaRootOption,
    ClientCertOption,
    ClientKeyOption,
    ControlPlaneOption,
    TokenOption,
    connect,
    fail,
)

app = typer.Typer(
    help="Workload identities: join tokens, certificates, revocation, the CA's roots.",
    no_args_is_help=True,
)
token_app = typer.Typer(
    help="Join tokens: how a new sidecar proves its service account once.", no_args_is_help=True
)
root_app = typer.Typer(help="The CA's roots: show them, rotate them.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(root_app, name="root")
identity_agent.register(app)
identity_operator.register(app)

ServiceAccountOption = Annotated[
    str, typer.Option("--service-account", help="The workload's service account.")
]
NamespaceOption = Annotated[
    str, typer.Option("--namespace", "-n", help="The workload's namespace.")
]


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="identity")


# --- join tokens ----------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    service_account: ServiceAccountOption,
    namespace: NamespaceOption = "default",
    ttl: Annotated[
        str, typer.Option(help="How long the token can be used (e.g. 10m, 1h, 24h).")
    ] = "1h",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Make a join token for SERVICE_ACCOUNT in NAMESPACE; prints only the token (give it to
    `meshctl run --token`). It obtains certificates for that service account only."""
    from meshctl.cli._durations import parse_duration
    from meshctl.control.client import ClientError

    seconds = parse_duration(ttl, "--ttl")
    client = connect(
        control_plane, token, "identity token create", client_cert, client_key, ca_root
    )
    try:
        answer = client.create_join_token(service_account, namespace, seconds)
    except ClientError as error:
        fail("identity token create", error)
    typer.echo(answer["token"])


@token_app.command("list")
def token_list(
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Every join token: id, service account, namespace, expiry and state (never the secret)."""
    from meshctl.control.client import ClientError

    client = connect(control_plane, token, "identity token list", client_cert, client_key, ca_root)
    try:
        items = client.join_tokens()["items"]
    except ClientError as error:
        fail("identity token list", error)
    now = datetime.datetime.now(datetime.UTC).timestamp()
    rows = [
        (item["id"], item["namespace"], item["serviceAccount"], _time(item["expiresAt"]),
         "revoked" if item["revoked"] else "expired" if item["expiresAt"] <= now else "valid")
        for item in items
    ]  # fmt: skip
    _table(("ID", "NAMESPACE", "SERVICE-ACCOUNT", "EXPIRES", "STATE"), rows)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[
        str, typer.Argument(metavar="ID", help="The token's id (the part after meshctl-join.).")
    ],
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Revoke a join token: it obtains no certificate from now on (issued ones stay valid; revoke
    those with `meshctl identity revoke`)."""
    from meshctl.control.client import ClientError

    client = connect(
        control_plane, token, "identity token revoke", client_cert, client_key, ca_root
    )
    try:
        client.revoke_join_token(token_id)
    except ClientError as error:
        fail("identity token revoke", error)
    typer.echo(f"join token {token_id} revoked")


# --- issued certificates -------------------------------------------------------------------------


@app.command("list")
def identity_list(
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Issued workload certificates: SPIFFE ID, serial (hex), expiry, revoked, node."""
    from meshctl.control.client import ClientError

    client = connect(control_plane, token, "identity list", client_cert, client_key, ca_root)
    try:
        items = client.certificates()["items"]
    except ClientError as error:
        fail("identity list", error)
    rows = [
        (item["spiffeId"], item["serial"], _time(item["notAfter"]), "yes" if item["revoked"] else "no",
         item.get("node") or "-")
        for item in items
    ]  # fmt: skip
    _table(("SPIFFE-ID", "SERIAL", "NOT-AFTER", "REVOKED", "NODE"), rows)


@app.command("revoke")
def identity_revoke(
    serial: Annotated[
        str | None,
        typer.Argument(help="The certificate's serial, hex (from `meshctl identity list`)."),
    ] = None,
    service_account: Annotated[
        str | None,
        typer.Option(
            "--service-account", help="Revoke every unexpired certificate of this service account."
        ),
    ] = None,
    namespace: NamespaceOption = "default",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Revoke a certificate by SERIAL, or all of a service account's. Every sidecar refuses them
    within seconds (the CRLs travel with the ROOTCA secret over xDS); a revoked certificate
    cannot be renewed."""
    from meshctl.control.client import ClientError

    if (serial is None) == (service_account is None):
        raise typer.BadParameter(
            "give a SERIAL or --service-account, not both", param_hint="SERIAL"
        )
    client = connect(control_plane, token, "identity revoke", client_cert, client_key, ca_root)
    body = (
        {"serial": serial}
        if serial is not None
        else {"serviceAccount": service_account, "namespace": namespace}
    )
    try:
        revoked = client.revoke_certificates(body)["revoked"]
    except ClientError as error:
        fail("identity revoke", error)
    for item in revoked:
        typer.echo(f"certificate {item['serial']} ({item['spiffeId']}) revoked")


# --- roots ---------------------------------------------------------------------------------------


@root_app.command("show")
def root_show(
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Every root in the trust bundle: subject, SHA-256 fingerprint, expiry, then its PEM."""
    from meshctl.control.client import ClientError

    client = connect(control_plane, token, "identity root show", client_cert, client_key, ca_root)
    try:
        answer = client.roots()
    except ClientError as error:
        fail("identity root show", error)
    _print_roots(answer)


@root_app.command("rotate")
def root_rotate(
    finish: Annotated[
        bool, typer.Option("--finish", help="End the rotation: stop trusting the previous root.")
    ] = False,
    overlap: Annotated[
        str | None,
        typer.Option(
            help="How long both roots stay trusted before the old one is dropped (default 24h)."
        ),
    ] = None,
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Make a new root: new certificates are signed by it, and both roots are trusted until
    `--finish` (or until --overlap elapses). Sidecars renewing in the meantime move to the new one."""
    from meshctl.cli._durations import parse_duration
    from meshctl.control.client import ClientError

    if finish and overlap is not None:
        raise typer.BadParameter(
            "--overlap applies when starting a rotation, not with --finish", param_hint="--overlap"
        )
    seconds = parse_duration(overlap, "--overlap") if overlap is not None else None
    command = "identity root rotate"
    client = connect(control_plane, token, command, client_cert, client_key, ca_root)
    try:
        answer = client.finish_root_rotation() if finish else client.rotate_root(seconds)
    except ClientError as error:
        fail(command, error)
    if finish:
        typer.echo("root rotation finished: the previous root is no longer trusted")
    else:
        typer.echo(f"root rotation started: both roots are trusted until {_time(answer['overlapUntil'])} "
                   "or `meshctl identity root rotate --finish`")  # fmt: skip
    _print_roots(answer)


def _print_roots(answer: dict) -> None:
    for root in answer["roots"]:
        role = "signing" if root["signing"] else "previous (trusted until the rotation ends)"
        typer.echo(f"# {role}")
        typer.echo(f"# subject: {root['subject']}")
        typer.echo(f"# SHA-256 fingerprint: {root['fingerprintSha256']}")
        typer.echo(f"# expires: {_time(root['notAfter'])}")
        typer.echo(root["pem"], nl=False)


def _time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]
    for row in (headers, *rows):
        typer.echo(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )
