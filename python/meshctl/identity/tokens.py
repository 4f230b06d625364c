"""Join tokens, `meshctl-join.<token_id>.<secret>`: a sidecar's first proof of who it is.

Only the SHA-256 of the secret is stored, beside the service account and namespace the token
stands for, its expiry and a revoked flag; the secret itself is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

PREFIX = "meshctl-join"
_TOKEN = re.compile(r"^meshctl-join\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
MIN_TTL = 1.0
MAX_TTL = 365 * 24 * 3600.0


class JoinTokenError(Exception):
    """A token that does not authorise: str() says why (malformed, unknown, expired, revoked)."""


@dataclass(frozen=True)
class JoinToken:
    """What the store keeps about a token (never its secret)."""

    token_id: str
    secret_sha256: str
    service_account: str
    namespace: str
    expires_at: float  # epoch seconds
    created_at: float
    revoked: bool = False

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JoinToken:
        return cls(**{name: record[name] for name in cls.__dataclass_fields__ if name in record})

    def public_json(self) -> dict[str, Any]:
        """What `meshctl identity token list` shows: everything but the hash."""
        return {
            "id": self.token_id, "serviceAccount": self.service_account, "namespace": self.namespace,
            "expiresAt": self.expires_at, "createdAt": self.created_at, "revoked": self.revoked,
        }  # fmt: skip


def new_token(
    service_account: str, namespace: str, ttl: float, now: float | None = None
) -> tuple[str, JoinToken]:
    """(the token text to hand out, the record to store)."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise JoinTokenError(f"ttl: {ttl:g}s is outside [{MIN_TTL:g}s, {MAX_TTL:g}s]")
    now = time.time() if now is None else now
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = JoinToken(token_id, _digest(secret), service_account, namespace, now + ttl, now)
    return f"{PREFIX}.{token_id}.{secret}", record


def parse_token(text: str) -> tuple[str, str]:
    """(token id, secret); JoinTokenError if `text` is not shaped like a join token."""
    found = _TOKEN.match(text.strip())
    if not found:
        raise JoinTokenError("malformed join token (expected meshctl-join.<id>.<secret>)")
    return found.group(1), found.group(2)


def is_join_token(text: str) -> bool:
    return text.strip().startswith(PREFIX + ".")


def check_token(
    record: JoinToken | None, token_id: str, secret: str, now: float | None = None
) -> JoinToken:
    """The record if the secret matches and the token is live; else JoinTokenError naming why."""
    if record is None:
        raise JoinTokenError(f"unknown join token {token_id}")
    # Constant time: the compare must not tell an attacker how much of a guess was right.
    if not hmac.compare_digest(_digest(secret), record.secret_sha256):
        raise JoinTokenError(f"join token {token_id}: wrong secret")
    if record.revoked:
        raise JoinTokenError(f"join token {token_id} is revoked")
    now = time.time() if now is None else now
    if now >= record.expires_at:
        raise JoinTokenError(
            f"join token {token_id} expired {now - record.expires_at:.0f}s ago; create a new one"
        )
    return record


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
