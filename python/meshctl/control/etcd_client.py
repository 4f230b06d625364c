"""etcd v3 through its JSON gateway: ranges, transactions, leases and watches, failing over between members."""

from __future__ import annotations

import base64
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from meshctl.control.etcd_http import HttpConnection, TransportError, json_lines
from meshctl.control.store import StoreError

log = logging.getLogger("meshctl.control.etcd")

# Ask every member to refuse (not hang) while it has no leader: a member cut off from the
# quorum then fails fast and we move on, and its watch streams are closed instead of going
# silent. grpc-gateway turns Grpc-Metadata-* headers into gRPC metadata.
_REQUIRE_LEADER = [("Grpc-Metadata-hasleader", "true")]
_UNAVAILABLE = 14  # gRPC code: no leader, leader changed, request timed out: retry elsewhere
_IDLE_PER_ENDPOINT = 4


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(text: str) -> list[Endpoint]:
    """'HOST:PORT,HOST:PORT' (IPv6 as [ADDR]:PORT; port 2379 when left out)."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {item!r} is not HOST:PORT") from None
        if not host or not 0 < port < 65536:
            raise ValueError(f"etcd endpoint {item!r} is not HOST:PORT")
        endpoints.append(Endpoint(host, port))
    if not endpoints:
        raise ValueError("no etcd endpoints given; use etcd://HOST:PORT,HOST:PORT,...")
    return endpoints


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue


class EtcdError(StoreError):
    """etcd refused a request; `code` is the gRPC status code it answered with."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No member answered in time; the message names every endpoint and what went wrong."""


class Compacted(EtcdError):
    """The revision a watch wanted to resume from is older than what etcd still keeps."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {compact_revision}")
        self.compact_revision = compact_revision


class _Retry(Exception):
    """One member failed in a way another member may not: try the next one."""


# --- request building: etcd's JSON gateway wants bytes as base64 and int64 as strings ----------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) cover every key starting with prefix."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\x00"


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def delete_op(key: bytes, range_end: bytes = b"") -> dict[str, Any]:
    request = {"key": b64(key)}
    if range_end:
        request["range_end"] = b64(range_end)
    return {"request_delete_range": request}


def range_op(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def mod_revision_is(key: bytes, revision: int) -> dict[str, Any]:
    """A txn compare; an absent key has mod_revision 0, so 0 means 'still absent'."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def key_values(range_response: dict[str, Any]) -> list[KeyValue]:
    return [_key_value(kv) for kv in range_response.get("kvs", ())]


def _key_value(kv: dict[str, Any]) -> KeyValue:
    return KeyValue(
        base64.b64decode(kv.get("key", "")),
        base64.b64decode(kv.get("value", "")),
        int(kv.get("create_revision", 0)),
        int(kv.get("mod_revision", 0)),
        int(kv.get("lease", 0)),
    )


def header_revision(response: dict[str, Any]) -> int:
    return int(response.get("header", {}).get("revision", 0))


# --- the client ----------------------------------------------------------------------------------


class EtcdClient:
    """Sends each request to the member that last answered, and on failure to the others.

    Requests are linearizable (etcd's default), so whichever member answers, it answers with
    the cluster's current state.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        attempt_timeout: float = 3.0,
        deadline: float = 15.0,
        probe_interval: float = 2.0,
    ) -> None:
        self.endpoints = list(endpoints)
        self.attempt_timeout = attempt_timeout  # one member, one request
        self.deadline = deadline  # all members, with backoff between rounds
        self.probe_interval = probe_interval  # how often a watch checks its member still serves
        self._order = deque(self.endpoints)
        self._idle: dict[Endpoint, list[HttpConnection]] = {e: [] for e in self.endpoints}

    @property
    def current(self) -> Endpoint:
        return self._order[0]

    def _demote(self, endpoint: Endpoint) -> None:
        if self._order[0] == endpoint:
            self._order.rotate(-1)

    async def call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST to /v3/<path> on the first member that answers; EtcdUnavailable after the deadline."""
        failures: dict[Endpoint, str] = {}
        deadline = trio.current_time() + self.deadline
        backoff = 0.05
        while True:
            for endpoint in list(self._order):
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    break
                try:
                    with trio.fail_after(min(self.attempt_timeout, remaining)):
                        return await self._call_once(endpoint, path, payload)
                except trio.TooSlowError:
                    failures[endpoint] = (
                        f"no answer within {min(self.attempt_timeout, remaining):.1f}s"
                    )
                except (TransportError, _Retry) as error:
                    failures[endpoint] = str(error)
                self._demote(endpoint)
            if trio.current_time() >= deadline:
                raise EtcdUnavailable(
                    f"etcd is unavailable ({path}): "
                    + "; ".join(
                        f"{endpoint}: {failures.get(endpoint, 'not tried')}"
                        for endpoint in self.endpoints
                    ),
                    _UNAVAILABLE,
                )
            await trio.sleep(
                backoff * random.uniform(0.5, 1.5)
            )  # jitter: planes don't retry in step
            backoff = min(backoff * 2, 1.0)

    async def _call_once(self, endpoint: Endpoint, path: str, payload: dict[str, Any]) -> Any:
        idle = self._idle[endpoint]
        connection = idle.pop() if idle else await HttpConnection.open(endpoint.host, endpoint.port)
        try:
            status, body = await connection.post_json(f"/v3/{path}", payload, _REQUIRE_LEADER)
        except BaseException:
            await connection.aclose()  # mid-request: its state is unknown
            raise
        if connection.reusable and len(idle) < _IDLE_PER_ENDPOINT:
            idle.append(connection)
        else:
            await connection.aclose()
        if status == 200:
            return body
        error = _gateway_error(status, body)
        if status in (502, 503, 504) or error.code == _UNAVAILABLE:
            raise _Retry(str(error))
        raise error

    async def range(
        self, key: bytes, range_end: bytes = b"", *, keys_only: bool = False, limit: int = 0
    ) -> tuple[int, list[KeyValue]]:
        """(revision the answer is consistent at, the keys in [key, range_end))."""
        request: dict[str, Any] = {"key": b64(key)}
        if range_end:
            request["range_end"] = b64(range_end)
        if keys_only:
            request["keys_only"] = True
        if limit:
            request["limit"] = str(limit)
        response = await self.call("kv/range", request)
        return header_revision(response), key_values(response)

    async def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> tuple[bool, int, list[dict[str, Any]]]:
        """(whether every compare held, the revision after the txn, one response per op run)."""
        response = await self.call(
            "kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}
        )
        return (
            bool(response.get("succeeded", False)),
            header_revision(response),
            response.get("responses", []),
        )

    async def lease_grant(self, ttl: int) -> int:
        response = await self.call("lease/grant", {"TTL": str(ttl)})
        return int(response["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """The lease's remaining TTL in seconds; 0 when it has already expired."""
        response = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(response.get("result", {}).get("TTL", 0))

    async def watch(
        self,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        on_events: Callable[[int, list[WatchEvent]], Awaitable[None]],
    ) -> None:
        """Deliver every change in [key, range_end) from start_revision on, until cancelled.

        When a member fails, the watch moves to the next member and resumes after the last
        revision delivered, so nothing is lost or repeated. Raises Compacted when etcd no longer
        has the history to resume from (the caller reloads and watches again).
        """
        next_revision = start_revision
        backoff = 0.05

        async def deliver(revision: int, events: list[WatchEvent]) -> None:
            nonlocal next_revision, backoff
            backoff = 0.05
            if events:
                # One txn's events always arrive in one response, so resuming after the last
                # delivered revision neither skips nor repeats any.
                next_revision = events[-1].kv.mod_revision + 1
            await on_events(revision, events)

        while True:
            endpoint = self.current
            try:
                await self._watch_on(endpoint, key, range_end, next_revision, deliver)
            except (TransportError, _Retry, OSError, trio.TooSlowError) as error:
                log.warning(
                    "etcd watch on %s broke (%s); resuming from revision %d on %s",
                    endpoint, error or type(error).__name__, next_revision,
                    self._order[1] if len(self._order) > 1 else endpoint,
                )  # fmt: skip
            self._demote(endpoint)
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 2.0)

    async def _watch_on(
        self,
        endpoint: Endpoint,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        deliver: Callable[[int, list[WatchEvent]], Awaitable[None]],
    ) -> None:
        create = {"key": b64(key), "range_end": b64(range_end),
                  "start_revision": str(start_revision)}  # fmt: skip
        with trio.fail_after(self.attempt_timeout):
            connection = await HttpConnection.open(endpoint.host, endpoint.port)
        failure: Exception = TransportError(f"member {endpoint} stopped answering")
        try:
            async with trio.open_nursery() as nursery:
                # A member can vanish without closing the connection (a partition, a frozen
                # process): the stream then just goes quiet, so ask that member directly.
                nursery.start_soon(self._probe, endpoint, nursery.cancel_scope)
                try:
                    with trio.fail_after(self.attempt_timeout):
                        status = await connection.start_post(
                            "/v3/watch", {"create_request": create}, _REQUIRE_LEADER
                        )
                    if status != 200:
                        raise _Retry(f"watch refused with HTTP {status}")
                    async for message in json_lines(connection.body_chunks()):
                        await self._watch_message(message, deliver)
                except (TransportError, _Retry, Compacted, trio.TooSlowError) as error:
                    # Raised plainly, not inside the nursery's exception group.
                    failure = error
                nursery.cancel_scope.cancel()
        finally:
            await connection.aclose()
        raise failure

    async def _watch_message(
        self, message: dict[str, Any], deliver: Callable[[int, list[WatchEvent]], Awaitable[None]]
    ) -> None:
        if "error" in message:
            raise _Retry(f"watch failed: {message['error']}")
        result = message.get("result", {})
        compact_revision = int(result.get("compact_revision", 0))
        if compact_revision:
            raise Compacted(compact_revision)
        if result.get("canceled"):
            raise _Retry(f"watch canceled: {result.get('cancel_reason') or 'no reason given'}")
        events = [
            # PUT is enum value 0, which the JSON gateway leaves out.
            WatchEvent(
                "delete" if event.get("type") == "DELETE" else "put", _key_value(event["kv"])
            )
            for event in result.get("events", ())
        ]
        await deliver(header_revision(result), events)

    async def _probe(self, endpoint: Endpoint, scope: trio.CancelScope) -> None:
        failures = 0
        while failures < 2:  # one slow answer is not a dead member
            await trio.sleep(self.probe_interval)
            try:
                with trio.fail_after(self.attempt_timeout):
                    await self._call_once(endpoint, "kv/range", {"key": b64(b"\0"), "limit": "1",
                                                                "keys_only": True})  # fmt: skip
                failures = 0
            except (TransportError, _Retry, trio.TooSlowError, EtcdError) as error:
                failures += 1
                log.info("etcd member %s did not answer a probe: %s", endpoint, error)
        scope.cancel()  # _watch_on then raises "stopped answering" and the watch moves on

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                await idle.pop().aclose()


def _gateway_error(status: int, body: Any) -> EtcdError:
    if isinstance(body, dict):
        message = body.get("error") or body.get("message")
        code = body.get("code")
        if isinstance(message, dict):  # streamed errors nest one level deeper
            code, message = message.get("grpc_code"), message.get("message")
        if message:
            return EtcdError(str(message), code if isinstance(code, int) else None)
    return EtcdError(f"etcd answered HTTP {status}: {str(body)[:200]}")
