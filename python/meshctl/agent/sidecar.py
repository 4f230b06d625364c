"""The long-running sidecar process: starts the engine from bootstrap bytes, then supervises the app.

`meshctl run` checks its command line and serializes the bootstrap, then replaces itself with
this module (`exec`, so the PID stays the same). The process that stays resident for the
sidecar's whole life thus never holds the CLI's libraries: typer with pydantic, protobuf with the
Envoy API modules, and YAML together take ~20 MB, more than Python and the engine themselves.
"""

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from meshctl.agent import supervisor

if TYPE_CHECKING:
    from meshctl._core import Engine

# The same status click gives a usage error: the command line or its config is wrong.
INVALID_CONFIG = 2


def exec_sidecar(
    bootstrap: bytes,
    source: str,
    workers: int,
    drain_timeout: float,
    command: Sequence[str] | None,
) -> NoReturn:
    """Replace this process with the sidecar, serving `bootstrap` (read from the file `source`)."""
    # An unlinked file carries the bootstrap across exec: unlike a pipe, it holds any size
    # without a reader on the other end, and it is gone once the sidecar closes it. The `with`
    # only closes it if exec fails.
    with tempfile.TemporaryFile() as bootstrap_file:
        bootstrap_file.write(bootstrap)
        bootstrap_file.seek(0)  # flushes, and the sidecar reads from the start
        os.set_inheritable(bootstrap_file.fileno(), True)
        # exec discards whatever Python still buffers.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(
            sys.executable,
            [
                sys.executable,
                # The interpreter's options (-X importtime, -W error, -I ...) apply to the sidecar too.
                *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                "-m",
                __name__,
                str(bootstrap_file.fileno()),
                source,
                str(workers),
                repr(drain_timeout),
                *(command or []),
            ],
        )


def main(argv: Sequence[str]) -> int:
    """Run the sidecar from the arguments exec_sidecar passes; return meshctl's exit status."""
    bootstrap_fd, source, workers, drain_timeout, *command = argv
    # Closed at once, so the application started below does not inherit it.
    with open(int(bootstrap_fd), "rb") as bootstrap_file:
        bootstrap = bootstrap_file.read()
    # Imported here, not at the top, so that an unbuilt engine is reported, not a traceback.
    try:
        from meshctl import _core
    except ImportError as error:
        _report(f"the engine is not built ({error}); run `pip install .`")
        return 1
    try:
        engine = _core.Engine(bootstrap, worker_threads=int(workers))
    except _core.ConfigError as error:
        _report(f"{source}: {error}")
        return INVALID_CONFIG
    except OSError as error:
        _report(f"{source}: cannot bind: {error}")
        return INVALID_CONFIG
    print(_ready_line(engine), file=sys.stderr, flush=True)
    return supervisor.serve(engine, command or None, float(drain_timeout))


def _report(message: str) -> None:
    print(f"meshctl run: {message}", file=sys.stderr, flush=True)


def _ready_line(engine: "Engine") -> str:
    where = [
        f"listener {name} on {_host_port(address)}"
        for name, address in sorted(engine.listener_addresses().items())
    ]
    admin = engine.admin_address()
    if admin is not None:
        where.append(f"admin on http://{_host_port(admin)}/")
    return "meshctl: sidecar ready: " + (", ".join(where) or "no listeners")


def _host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
