"""Which SPIFFE ID the agent asks the CA for: a join token's own, or (the API token) its flags'.

A join token (`meshctl-join.<id>.<secret>`) fixes the service account and namespace; the control
plane says which (JoinTokens/Describe) before the agent makes its CSR. Flags may repeat them but
not contradict them: a contradiction stops the start (exit 2). With the API token (an operator)
the flags decide: --service-account, else the service's name; --namespace, else "default".
"""

from __future__ import annotations

from dataclasses import dataclass

from meshctl.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from meshctl.identity.tokens import is_join_token


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

    def flags_identity(self) -> SpiffeId:
        """The identity the flags describe: what an operator (the API token) asks for."""
        return SpiffeId(
            self.trust_domain,
            self.namespace or "default",
            self.service_account or self.service,
        )

    def join_token_identity(self, granted: SpiffeId) -> SpiffeId:
        """`granted`, the identity the join token grants, once the flags agree with it;
        IdentityConflict naming each flag that contradicts it."""
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
