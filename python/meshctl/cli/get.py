"""`meshctl get KIND [NAME]`: show mesh resources with their version and sidecar status."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer

from meshctl.cli._control_plane import (
    CaRootOption,
    ClientCertOption,
    ClientKeyOption,
    ControlPlaneOption,
    NamespaceOption,
    TokenOption,
    connect,
    fail,
)


class Output(str, Enum):
    table = "table"
    yaml = "yaml"
    json = "json"


def register(app: typer.Typer) -> None:
    app.command("get")(get)


def get(
    kind: Annotated[
        str,
        typer.Argument(
            help="VirtualService (vs), DestinationRule (dr), ServiceEntry (se), WorkloadEntry (we)."
        ),
    ],
    name: Annotated[
        str | None, typer.Argument(help="One resource; all of the kind when omitted.")
    ] = None,
    namespace: NamespaceOption = "default",
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="List every namespace.")
    ] = False,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table, yaml or json.")
    ] = Output.table,
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Show resources: version, and which sidecars accepted or rejected the config built from them.

    `-o yaml` prints documents you can edit and re-apply: their metadata.resourceVersion makes
    the apply refuse (exit 3) if someone changed the resource in the meantime.
    """
    from meshctl.control.client import ClientError

    client = connect(control_plane, token, "get", client_cert, client_key, ca_root)
    try:
        if name is not None:
            items = [client.get(kind, namespace, name)]
        else:
            items = client.list(kind, None if all_namespaces else namespace)["items"]
    except ClientError as error:
        fail("get", error)
    if output is Output.json:
        typer.echo(json.dumps(items[0] if name else {"items": items}, indent=2))
    elif output is Output.yaml:
        import yaml

        typer.echo(yaml.safe_dump_all(items, sort_keys=False, default_flow_style=False), nl=False)
    elif not items:
        where = "any namespace" if all_namespaces else f"namespace {namespace}"
        typer.echo(f"no {kind} in {where}", err=True)
    else:
        typer.echo(_table(items))


def _table(items: list[dict[str, Any]]) -> str:
    rows = [("KIND", "NAMESPACE", "NAME", "HOSTS", "VERSION", "STATUS")]
    for item in items:
        spec, meta = item["spec"], item["metadata"]
        hosts = spec.get("hosts") or (
            [spec["host"]] if "host" in spec else [spec.get("address", "")]
        )
        rows.append(
            (
                item["kind"],
                meta["namespace"],
                meta["name"],
                ",".join(hosts),
                meta["resourceVersion"],
                status_summary(item),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    )


def status_summary(item: dict[str, Any]) -> str:
    """'2 accepted, 1 rejected (sidecar-3: reason)', plus fields stored but not enforced yet."""
    status = item.get("status", {})
    version = int(item["metadata"]["resourceVersion"])
    sidecars = status.get("sidecars", {})
    accepted = [
        sid for sid, s in sidecars.items() if s["state"] == "accepted" and s["version"] == version
    ]
    rejected = {sid: s.get("reason", "") for sid, s in sidecars.items() if s["state"] == "rejected"}
    pending = len(sidecars) - len(accepted) - len(rejected)
    parts = []
    if accepted:
        parts.append(f"{len(accepted)} accepted")
    if rejected:
        first, reason = next(iter(rejected.items()))
        parts.append(f"{len(rejected)} rejected ({first}: {reason})")
    if pending:
        parts.append(f"{pending} on an older version")
    if not parts:
        parts.append("no sidecar has reported")
    not_enforced = status.get("notEnforced", [])
    if not_enforced:
        parts.append(f"not yet enforced: {', '.join(not_enforced)}")
    return "; ".join(parts)
