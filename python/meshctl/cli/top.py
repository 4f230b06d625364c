"""`meshctl top`: live requests per second, success rate and p50/p99 latency per service (and per
route), from the sidecars' own counters, redrawn in place every interval like `top`."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

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

if TYPE_CHECKING:
    from meshctl.cli._sidecar_scrape import SidecarReads
    from meshctl.cli._top_figures import Row, SidecarCounters, Window
    from meshctl.control.client import Client

    Reads = SidecarReads[SidecarCounters]

INVALID_INPUT = 2
# Cursor home, then clear the screen: each frame replaces the last, as `top` and `watch` do.
REDRAW = "\x1b[H\x1b[2J"


# Paragraphs as single lines: the help renderer keeps a docstring's line breaks.
HELP = (
    "Live traffic per service: requests per second, success rate, p50 and p99 latency.\n\n"
    "The view is the callers' (outbound, as Istio's reporter=source): every registered sidecar "
    "on this machine is read twice an interval apart, and its counters for each destination "
    "service are summed over the callers, the service's ports and its versions. A request counts "
    "once, with the answer its caller got after retries. Requests that reach a service without "
    "passing a sidecar are not seen.\n\n"
    "SUCCESS is the share not answered 5xx (4xx are successes, as in Linkerd and Istio; a 503 or "
    "504 the sidecar made itself, such as no healthy upstream or a timeout, is a failure). "
    "P50/P99 are interpolated in the latency histogram's growth as Prometheus' "
    "histogram_quantile does; a service's is the time of the try that answered (as Envoy's "
    "upstream_rq_time), for answers that came from the service. SIDECARS is how many callers "
    "sent it requests in the window.\n\n"
    "--routes adds a table per outbound route (named HOST:PORT/INDEX, or as its VirtualService "
    "names it): rps and latency of the whole request, retries and the sidecar's own replies "
    "included; the engine counts no response classes per route, so it shows no success rate.\n\n"
    "Refreshes in place until Ctrl-C; --once prints one table after one interval and exits. "
    "Sidecars that could not be read are named below the table; so is a control plane that "
    "went away, while top reads the sidecars it last listed. Exit codes: 2 bad input, 1 the "
    "control plane unreachable or refusing at the start."
)


def register(app: typer.Typer) -> None:
    app.command("top", help=HELP)(top)


def _refuse(message: str) -> NoReturn:
    typer.echo(f"meshctl top: {message}", err=True)
    raise typer.Exit(INVALID_INPUT)


def top(
    service: Annotated[
        str | None,
        typer.Argument(help="Only this service (as registered with --service); default: all."),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace", "-n", help="Only this namespace (SERVICE's; default for it: default)."
        ),
    ] = None,
    interval: Annotated[
        str, typer.Option(help="Seconds between reads and redraws: 2, 500ms, 5s.")
    ] = "2",
    once: Annotated[
        bool, typer.Option("--once", help="Print one table after one interval and exit.")
    ] = False,
    routes: Annotated[
        bool, typer.Option("--routes", help="Also a table per route (rps and latency).")
    ] = False,
    output: Annotated[
        str, typer.Option("--output", "-o", help="text, or json (one document per interval).")
    ] = "text",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Print live traffic per service (and route) from the sidecars' counters; see HELP."""
    from meshctl.cli._durations import parse_duration

    seconds = parse_duration(interval, "--interval")
    if output not in ("text", "json"):
        _refuse(f"--output {output!r}: choose text or json")
    if service is not None and namespace is None:
        namespace = "default"
    client = connect(control_plane, token, "top", client_cert, client_key, ca_root)
    try:
        _watch(client, seconds, once, output, service, namespace, routes)
    except KeyboardInterrupt:
        # Ctrl-C is how `top` ends: a clean exit, the last frame left on the screen.
        raise typer.Exit(0) from None


def _watch(client: Client, seconds: float, once: bool, output: str, service: str | None,
           namespace: str | None, with_routes: bool) -> None:  # fmt: skip
    """Read the sidecars every `seconds` and print each window's frame, until interrupted."""
    from meshctl.cli._sidecar_scrape import read_sidecars
    from meshctl.cli._top_figures import known_services, parse_counters, window_between
    from meshctl.control.client import ClientError

    try:
        sidecars = client.sidecars()["items"]
    except ClientError as error:
        fail("top", error)
    previous = read_sidecars(sidecars, parse_counters)
    known = {(s["namespace"], s["service"]) for s in sidecars}
    _check_filter(known | known_services(previous.by_node.values()), service, namespace)
    redraw = output == "text" and not once and sys.stdout.isatty()
    while True:
        time.sleep(seconds)
        registry_error = ""
        try:
            sidecars = client.sidecars()["items"]  # instances come and go between frames
        except ClientError as error:
            # The sidecars keep serving without the control plane: so does top, on the last list.
            registry_error = error.message
        current = read_sidecars(sidecars, parse_counters)
        window = window_between(previous.by_node, current.by_node, current.at - previous.at)
        document = _document(window, current, service, namespace, with_routes)
        if registry_error:
            document["registryError"] = registry_error
        frame = json.dumps(document) if output == "json" else "\n".join(_table(document))
        typer.echo((REDRAW if redraw else "") + frame)
        sys.stdout.flush()
        if once:
            return
        if output == "text" and not redraw:
            typer.echo("")  # frames one after another: a blank line between them
        previous = current


def _check_filter(known: set[tuple[str, str]], service: str | None, namespace: str | None) -> None:
    """Refuse a service or namespace neither registered nor a destination the sidecars know:
    a typo should not look like a service without traffic."""
    if service is not None and (namespace, service) not in known:
        names = ", ".join(f"{ns}/{name}" if ns else name for ns, name in sorted(known))
        _refuse(
            f"no service {service!r} in namespace {namespace!r}: it is neither registered "
            f"nor a destination the sidecars know (known: {names or 'none'})"
        )
    if namespace is not None and namespace not in {ns for ns, _ in known}:
        spaces = ", ".join(sorted({ns for ns, _ in known if ns}))
        _refuse(f"no service in namespace {namespace!r} (namespaces: {spaces or 'none'})")


def _selected(host: str, service: str | None, namespace: str | None) -> bool:
    from meshctl.cli._top_figures import service_of

    host_namespace, name = service_of(host)
    if namespace is not None and host_namespace != namespace:
        return False
    return service is None or name == service


def _route_selected(route: str, service: str | None, namespace: str | None) -> bool:
    from meshctl.cli._top_figures import OUTBOUND_ROUTE_PREFIX, route_host

    if route.startswith(OUTBOUND_ROUTE_PREFIX):
        return _selected(route_host(route), service, namespace)
    # A route named in its VirtualService does not say which host it serves.
    return service is None and namespace is None


def _route_label(route: str) -> str:
    from meshctl.cli._top_figures import CLUSTER_DOMAIN_SUFFIX, OUTBOUND_ROUTE_PREFIX

    return route.removeprefix(OUTBOUND_ROUTE_PREFIX).replace(CLUSTER_DOMAIN_SUFFIX, "")


def _figures(row: Row, seconds: float) -> dict[str, Any]:
    return {
        "requests": round(row.traffic.requests),
        "rps": round(row.rps(seconds), 3),
        "p50Ms": _rounded(row.latency_ms(0.5)),
        "p99Ms": _rounded(row.latency_ms(0.99)),
        "sidecars": row.sidecars,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _document(
    window: Window, reads: Reads, service: str | None, namespace: str | None, with_routes: bool
) -> dict[str, Any]:
    from meshctl.cli._top_figures import service_of

    services = []
    for host in sorted(window.services, key=service_of):
        if not _selected(host, service, namespace):
            continue
        row = window.services[host]
        host_namespace, name = service_of(host)
        success = row.success_rate()
        services.append({
            "namespace": host_namespace, "service": name, "host": host,
            **_figures(row, window.seconds),
            "errors5xx": round(row.traffic.errors),
            "successRate": None if success is None else round(success, 4),
        })  # fmt: skip
    document: dict[str, Any] = {
        "view": "outbound",
        "seconds": round(window.seconds, 3),
        "sidecarsRead": len(reads.by_node),
        "unreachable": reads.unreachable,
        "services": services,
    }
    if with_routes:
        document["routes"] = [
            {"route": route, **_figures(window.routes[route], window.seconds)}
            for route in sorted(window.routes)
            if _route_selected(route, service, namespace)
        ]
    return document


def _latency(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.1f}ms"


def _table(document: dict[str, Any]) -> list[str]:
    """The text frame of a document _document made."""
    read = document["sidecarsRead"]
    total = read + len(document["unreachable"])
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    heading = (
        f"meshctl top — {stamp} UTC — callers' view (outbound) over {document['seconds']:.1f}s, "
        f"{read} of {total} sidecar{'s' if total != 1 else ''} read"
    )
    columns = (
        f"{'NAMESPACE':<14}{'SERVICE':<28}{'RPS':>9}{'SUCCESS':>9}{'P50':>10}{'P99':>10}"
        f"{'SIDECARS':>10}"
    )
    lines = [heading, "", columns]
    for entry in document["services"]:
        success = entry["successRate"]
        lines.append(
            f"{entry['namespace'] or '-':<14}{entry['service']:<28}{entry['rps']:>9.1f}"
            f"{'-' if success is None else f'{success:.2%}':>9}{_latency(entry['p50Ms']):>10}"
            f"{_latency(entry['p99Ms']):>10}{entry['sidecars']:>10}"
        )
    if not document["services"]:
        lines.append("(no destination services known to the sidecars read)")
    if "routes" in document:
        lines += ["", f"{'ROUTE':<42}{'RPS':>9}{'P50':>10}{'P99':>10}{'SIDECARS':>10}"]
        for entry in document["routes"]:
            lines.append(
                f"{_route_label(entry['route']):<42}{entry['rps']:>9.1f}"
                f"{_latency(entry['p50Ms']):>10}{_latency(entry['p99Ms']):>10}"
                f"{entry['sidecars']:>10}"
            )
    footer = []
    if document.get("registryError"):
        footer.append(
            f"control plane: {document['registryError']}; the last list of sidecars is read"
        )
    if document["unreachable"]:
        unreachable = document["unreachable"]
        named = "; ".join(f"{node} ({why})" for node, why in sorted(unreachable.items()))
        count = len(unreachable)
        footer.append(f"not read: {count} sidecar{'s' if count != 1 else ''}: {named}")
    return lines + ([""] + footer if footer else [])
