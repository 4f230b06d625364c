"""Which SPIFFE ID the agent asks the CA for, and how it reads the CA's refusal of its first guess.

A join token (`meshctl-join.<id>.<secret>`) fixes the service account and namespace, but does not
spell them out; the CA names the identity it grants when a CSR asks for another one. So the agent
asks for the identity its flags describe (SA: --service-account, else the service's name), and if
the CA names another one: it takes that when the flags left the choice open, or refuses to start
when a flag contradicts the token. With the API token (an operator) the CSR decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshctl.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError
from meshctl.identity.tokens import is_join_token

_SPIFFE_IN_TEXT = re.compile(r"spiffe://[!-~]+?(?=['\"]?(?:\s|,|;|\)|$))")


class IdentityConflict(Exception):
    """The flags ask for an identity the join token does not grant (a usage error: exit 2)."""


@dataclass(frozen=True)
class IdentityAsk:
    token: str
    service: str
    namespace: str | None = None  # None: not given (the token's, else "default")
    service_account: str | None = None  # None: not given (the token's, else the service's name)
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def with_join_token(self) -> bool:
        return is_join_token(self.token)

    def first_guess(self) -> SpiffeId:
        return SpiffeId(
            self.trust_domain,
            self.namespace or "default",
            self.service_account or self.service,
        )

    def after_refusal(self, asked: SpiffeId, message: str) -> SpiffeId | None:
        """What to ask for once the CA refused `asked` with `message`: the identity the join
        token grants, if the message names it and the flags allow it; None if nothing else is
        worth asking. IdentityConflict if a flag contradicts the token."""
        if not self.with_join_token:
            return None
        granted = granted_identity(message, asked)
        if granted is None:
            return None
        clashes = []
        if self.service_account is not None and granted.service_account != self.service_account:
            clashes.append(f"--service-account {self.service_account}")
        if self.namespace is not None and granted.namespace != self.namespace:
            clashes.append(f"--namespace {self.namespace}")
        if clashes:
            raise IdentityConflict(
                f"the join token is for {granted} (service account {granted.service_account!r}, "
                f"namespace {granted.namespace!r}); {' and '.join(clashes)} contradicts it: "
                "drop the flag or use a token made for that service account"
            )
        return granted


def granted_identity(message: str, asked: SpiffeId) -> SpiffeId | None:
    """The SPIFFE ID other than `asked` that a CA refusal names, if exactly one."""
    named = set()
    for text in _SPIFFE_IN_TEXT.findall(message):
        try:
            found = SpiffeId.parse(text)
        except SpiffeIdError:
            continue
        if found != asked:
            named.add(found)
    return named.pop() if len(named) == 1 else None
