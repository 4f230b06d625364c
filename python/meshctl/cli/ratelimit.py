"""`meshctl ratelimit show [NAME]`: every RateLimit rule's limit and what it did in the last minute
(allowed, limited, current rate), local and global rules alike, from the API's resource statuses;
`--watch` refreshes it until Ctrl-C."""

from __future__ import annotations

import time
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

app = typer.Typer(help="Rate limits: what each rule allows and what it did.", no_args_is_help=True)

COLUMNS = ("RATELIMIT", "RULE", "SCOPE", "MATCH", "LIMIT", "ALLOWED/1m", "LIMITED/1m", "RATE/s")


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="ratelimit")


@app.command("show")
def show(
    name: Annotated[str | None, typer.Argument(help="One RateLimit; every one in the namespace when omitted.")] = None,
    namespace: NamespaceOption = "default",
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Every namespace.")] = False,
    watch: Annotated[
        float | None,
        typer.Option("--watch", "-w", min=0.5, help="Show it again every SECONDS until Ctrl-C.", metavar="SECONDS"),
    ] = None,
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Per rule: scope, match, limit, requests allowed and limited in the last minute, and the
    current rate (requests/s offered to the rule).

    Local rules' figures come from the counts sidecars report with each lease renewal (a third of
    the lease late at most), summed over the mesh; their rate is over the sidecars' last renewals.
    Global rules' come from the control plane's rate limit service; their rate is the last
    minute's average. Shadow rules show what they would have limited.
    """
    from meshctl.control.client import ClientError

    client = connect(control_plane, token, "ratelimit show", client_cert, client_key, ca_root)

    def table() -> str:
        try:
            if name is not None:
                items = [client.get("RateLimit", namespace, name)]
            else:
                items = client.list("RateLimit", None if all_namespaces else namespace)["items"]
        except ClientError as error:
            fail("ratelimit show", error)
        if not items:
            where = "any namespace" if all_namespaces else f"namespace {namespace}"
            return f"no RateLimit in {where}"
        return render(rule_rows(items))

    if watch is None:
        typer.echo(table())
        return
    clear = "\x1b[H\x1b[2J" if typer.get_text_stream("stdout").isatty() else ""
    try:
        while True:
            text = table()
            typer.echo(f"{clear}{time.strftime('%H:%M:%S')}  every {watch:g}s, Ctrl-C to stop\n{text}\n")
            time.sleep(watch)
    except KeyboardInterrupt:
        pass


def rule_rows(items: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per rule of each RateLimit, its figures from status.localRules / globalRules."""
    rows = []
    for item in items:
        metadata, status = item["metadata"], item.get("status", {})
        resource = f"{metadata['namespace']}/{metadata['name']}"
        local = {entry["rule"]: entry for entry in status.get("localRules", [])}
        global_ = {entry["rule"]: entry for entry in status.get("globalRules", [])}
        for index, rule in enumerate(item.get("spec", {}).get("rules", [])):
            scope = rule.get("scope", "local")
            figures = (global_ if scope == "global" else local).get(index)
            if figures is None:
                allowed = limited = rate = "-"
            else:
                allowed, limited = str(figures["allowedLastMinute"]), str(figures["limitedLastMinute"])
                if scope == "global":  # the service keeps per-minute totals: their average
                    rate = f"{(figures['allowedLastMinute'] + figures['limitedLastMinute']) / 60:.2f}"
                else:
                    rate = f"{figures['requestsPerSecond']:.2f}"
            rows.append((resource, str(index), scope + (" shadow" if rule.get("shadow") else ""),
                         match_text(rule.get("match")), limit_text(rule), allowed, limited, rate))  # fmt: skip
    return rows


def render(rows: list[tuple[str, ...]]) -> str:
    table = [COLUMNS, *rows]
    widths = [max(len(row[column]) for row in table) for column in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in table)  # fmt: skip


def limit_text(rule: dict[str, Any]) -> str:
    limit, concurrency = rule.get("limit"), rule.get("concurrency")
    if limit:
        burst = f" +{limit['burst']} burst" if limit.get("burst") else ""
        return f"{limit['requests']}/{limit['unit']}{burst}"
    if concurrency and concurrency.get("adaptive"):  # its upper bound is optional
        bound = concurrency.get("maxConcurrent")
        return f"adaptive, at most {bound} at once" if bound else "adaptive"
    if concurrency:
        return f"{concurrency['maxConcurrent']} at once"
    return "-"


def match_text(match: dict[str, Any] | None, width: int = 40) -> str:
    """The rule's match in a few words: method, path, headers, callers; `*` for every request."""
    if not match:
        return "*"
    parts = []
    if match.get("method"):
        parts.append(match["method"])
    path = match.get("path") or {}
    for kind, shown in (("exact", "{}"), ("prefix", "{}*"), ("regex", "~{}")):
        if path.get(kind) is not None:
            parts.append(shown.format(path[kind]))
    for header, value in sorted((match.get("headers") or {}).items()):
        kind, text = next(iter(value.items()), ("", ""))
        parts.append(f"{header}{'=' if kind == 'exact' else '~' if kind == 'regex' else '^='}{text}")
    if match.get("sourcePrincipals"):
        parts.append("from " + ",".join(match["sourcePrincipals"]))
    if match.get("sourceNamespaces"):
        parts.append("from ns " + ",".join(match["sourceNamespaces"]))
    text = " ".join(parts) or "*"
    return text if len(text) <= width else text[: width - 1] + "…"
