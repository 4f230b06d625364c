"""The API token: made at first start, kept 0600 in the data dir, checked on every request."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path


class TokenError(Exception):
    pass


def ensure_token(path: Path) -> str:
    """The token in `path`, creating it (mode 0600, atomically) if there is none yet."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    # Written whole under a temporary name, then linked into place: link() fails if the token
    # already exists (two servers starting at once keep one token), and a crash mid-write never
    # leaves an empty token file behind.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(token + "\n")
        os.link(temporary, path)
    except FileExistsError:
        return read_token(path, check_mode=True)
    finally:
        temporary.unlink(missing_ok=True)
    return token


def read_token(path: Path, check_mode: bool = False) -> str:
    path = path.expanduser()
    try:
        if check_mode:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                # Like ssh with a private key: a readable token is a leaked token.
                raise TokenError(
                    f"token file {path} is accessible by others (mode {mode:04o}); run chmod 600 {path}"
                )
        token = path.read_text().strip()
    except FileNotFoundError:
        raise TokenError(
            f"no API token at {path}; start `meshctl serve` once, or pass --token / MESHCTL_TOKEN"
        ) from None
    except OSError as error:
        raise TokenError(f"cannot read the API token at {path}: {error}") from None
    if not token:
        raise TokenError(f"token file {path} is empty")
    return token


def authorized(header: bytes | None, token: str) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (compared in constant time)."""
    if header is None:
        return False
    scheme, _, presented = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())
