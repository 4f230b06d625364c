"""Server-speaks-first TCP upstream: sends `HELLO <name>` on connect, then answers each line with `ECHO <line>`."""

from __future__ import annotations

import argparse

import trio


async def handle(stream: trio.SocketStream, name: str) -> None:
    try:
        await stream.send_all(f"HELLO {name}\n".encode())
        pending = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                await stream.send_all(b"ECHO " + line + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def main(name: str, host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(lambda s: handle(s, name), listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        trio.run(main, args.name, args.host, args.port)
    except KeyboardInterrupt:
        pass
