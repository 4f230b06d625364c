"""HTTP/1.1 upstream that answers every request with one fixed status (503 by default) and its name,
or with `--truncate` breaks each answer's body off (the head promises more, the connection closes).

For outlier detection tests: an endpoint that always fails in the same way. Each response carries
`x-upstream: <name>`, so a client behind a proxy can count what every endpoint received, and tell
them from the proxy's own replies (which have no such header).
"""

from __future__ import annotations

import argparse
from http import HTTPStatus

import h11
import trio


async def serve(stream: trio.SocketStream, name: str, status: int, truncate: bool) -> None:
    conn = h11.Connection(h11.SERVER)
    body = f"{name} answers {status}\n".encode()
    reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b"Status"
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if isinstance(event, h11.EndOfMessage):
                if truncate:
                    # The head promises more than is sent, then the connection closes: a response
                    # whose body the upstream breaks.
                    head = f"HTTP/1.1 {status} {reason.decode()}\r\ncontent-length: {len(body) + 100}\r\nx-upstream: {name}\r\n\r\n"
                    await stream.send_all(head.encode() + body)
                    return
                headers = [("content-type", "text/plain"), ("content-length", str(len(body))), ("x-upstream", name)]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await stream.aclose()


async def main(name: str, status: int, truncate: bool, host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(lambda s: serve(s, name, status, truncate), listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--status", type=int, default=503)
    parser.add_argument("--truncate", action="store_true", help="close the connection mid-body")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        trio.run(main, args.name, args.status, args.truncate, args.host, args.port)
    except KeyboardInterrupt:
        pass
