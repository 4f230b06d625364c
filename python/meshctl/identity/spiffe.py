"""SPIFFE IDs in Istio's form, spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT: parse, format, validate."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"

# The SPIFFE spec allows lowercase letters, digits, '.', '-' and '_' in a trust domain.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
# Kubernetes names: a namespace is a DNS label, a service account a DNS subdomain.
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SERVICE_ACCOUNT = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class SpiffeIdError(ValueError):
    """A malformed SPIFFE ID or part of one; str() names the part and what is wrong with it."""


def check_trust_domain(value: str) -> str:
    if not isinstance(value, str) or not _TRUST_DOMAIN.match(value) or value.strip(".") != value:
        raise SpiffeIdError(
            f"trust domain {value!r}: lowercase letters, digits, '.', '-' and '_' only "
            "(1-255 characters, not starting or ending with '.')"
        )
    return value


def check_namespace(value: str) -> str:
    if not isinstance(value, str) or not _NAMESPACE.match(value):
        raise SpiffeIdError(f"namespace {value!r} is not a DNS label (lowercase, digits, '-')")
    return value


def check_service_account(value: str) -> str:
    if not isinstance(value, str) or not _SERVICE_ACCOUNT.match(value):
        raise SpiffeIdError(
            f"service account {value!r} is not a DNS subdomain (lowercase, digits, '-', '.')"
        )
    return value


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_namespace(self.namespace)
        check_service_account(self.service_account)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """SpiffeIdError unless `uri` is exactly spiffe://TD/ns/NS/sa/SA (no query, port, user)."""
        if not isinstance(uri, str) or not uri.startswith("spiffe://"):
            raise SpiffeIdError(f"{uri!r} is not a SPIFFE ID (it must start with spiffe://)")
        if any(ord(char) < 0x21 or ord(char) > 0x7E for char in uri):
            # NUL bytes, spaces and non-ASCII in a SAN are how verifiers get confused.
            raise SpiffeIdError(f"{uri!r}: control, space or non-ASCII characters are not allowed")
        trust_domain, _, path = uri.removeprefix("spiffe://").partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise SpiffeIdError(
                f"{uri!r} is not of the form spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT"
            )
        return cls(trust_domain, parts[1], parts[3])
