"""Files of the CA's directory: written whole and atomically, private keys 0600 from the first byte."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class KeyFileError(Exception):
    pass


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temporary file created with `mode`, fsync it, then rename it into place:
    a crash never leaves a half-written key, and a key is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(descriptor, mode)  # O_CREAT's mode is filtered by the umask; the key's is not
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_private_key_file(path: Path) -> bytes:
    """A private key's bytes; KeyFileError if others can read it (as ssh refuses such a key)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"private key {path} is accessible by others (mode {mode:04o}); run chmod 600 {path}"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"private key {path} does not exist") from None
    except OSError as error:
        raise KeyFileError(f"cannot read private key {path}: {error}") from None
