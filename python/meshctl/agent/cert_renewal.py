"""The workload's certificate over its life: the first one (with the token), renewal at half-life
(over mTLS with the current one), retries with backoff and jitter, and who hears of each new one.

Every certificate gets a fresh key, made here and kept in memory; only the subscribers (the
engine's SDS secret, the cert dir) ever see it. Logs name the serial and the expiry, never keys.
"""

from __future__ import annotations

import datetime
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from meshctl.agent.backoff import Backoff
from meshctl.agent.workload_csr import (
    IssuedCertificate,
    IssuedCertificateError,
    certificate_request,
    new_private_key,
    private_key_pem,
    read_issued_chain,
)
from meshctl.agent.workload_identity import IdentityAsk
from meshctl.grpc import GrpcError, StatusCode
from meshctl.identity.join_token_grant import JoinTokenGrant, JoinTokenGrantError
from meshctl.identity.spiffe import SpiffeId

log = logging.getLogger("meshctl.agent")

# Answers, not outages: retrying cannot change them. UNIMPLEMENTED: a plane without the method.
_REFUSALS = (StatusCode.PERMISSION_DENIED, StatusCode.UNAUTHENTICATED, StatusCode.INVALID_ARGUMENT,
             StatusCode.UNIMPLEMENTED)  # fmt: skip
RETRY_BASE = 1.0  # seconds, the first retry after a failed renewal
RETRY_MAX = 30.0


class CertificateRefused(Exception):
    """The control plane refused the token or the first certificate (bad, expired or revoked
    token; wrong identity)."""


class CertificateIssuer(Protocol):
    async def issue(self, csr_pem: str, ttl_seconds: int, *, token: str | None) -> list[str]:
        """The chain (leaf first) for `csr_pem`; authorised by `token`, or (None) by the
        current client certificate. GrpcError when the CA refuses or cannot be reached."""
        ...

    async def describe_join_token(self, token: str) -> JoinTokenGrant:
        """The identity the join token grants. GrpcError when the control plane refuses the
        token or cannot be reached; JoinTokenGrantError for an answer that does not say."""
        ...


@dataclass(frozen=True)
class Credentials:
    """A certificate and the key it was issued for."""

    key_pem: bytes
    certificate: IssuedCertificate
    received_at: datetime.datetime  # by this agent's clock

    @property
    def chain_pem(self) -> bytes:
        return self.certificate.leaf_and_intermediates_pem

    def __repr__(self) -> str:  # never the key
        return f"Credentials({self.certificate.spiffe_id}, serial {self.certificate.serial})"


Subscriber = Callable[[Credentials], Awaitable[None] | None]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class WorkloadCertificate:
    """Obtains the workload's certificate and keeps it renewed; tells subscribers of each one."""

    def __init__(
        self,
        ask: IdentityAsk,
        issuer: CertificateIssuer,
        ttl_seconds: int = 0,  # 0: the CA's default
        *,
        wall_clock: Callable[[], datetime.datetime] = _utc_now,
        report: Callable[[str], None] = log.warning,
    ) -> None:
        self.ask = ask
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self.current: Credentials | None = None
        self.identity: SpiffeId | None = None
        self._wall_clock = wall_clock
        self._report = report
        self._subscribers: list[Subscriber] = []
        self.renewals = 0

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call `subscriber` with every new certificate."""
        self._subscribers.append(subscriber)

    async def obtain_first(self) -> Credentials:
        """The first certificate, with the token, for the identity a join token grants (asked of
        the control plane first) or, with the API token, the flags'. While no plane answers it
        retries with backoff; a refusal raises CertificateRefused, a flag contradicting the join
        token IdentityConflict."""
        backoff = Backoff(0.2, 5.0)
        asked = await self._identity_to_ask(backoff)
        while True:
            try:
                credentials = await self._issue(asked, token=self.ask.token)
            except GrpcError as error:
                if error.code not in _REFUSALS:
                    log.warning("asking the CA for %s: %s (retrying)", asked, error.message)
                    await trio.sleep(backoff.next_delay())
                    continue
                raise CertificateRefused(
                    f"the CA refused a certificate for {asked}: {error.message}"
                ) from None
            except IssuedCertificateError as error:
                raise CertificateRefused(str(error)) from None
            self.identity = asked
            await self._install(credentials, "issued")
            return credentials

    async def _identity_to_ask(self, backoff: Backoff) -> SpiffeId:
        if not self.ask.with_join_token:
            return self.ask.flags_identity()
        while True:
            try:
                grant = await self.issuer.describe_join_token(self.ask.token)
            except GrpcError as error:
                if error.code not in _REFUSALS:
                    log.warning("asking which identity the join token grants: %s (retrying)",
                                error.message)  # fmt: skip
                    await trio.sleep(backoff.next_delay())
                    continue
                raise CertificateRefused(
                    f"the control plane refused the join token: {error.message}"
                ) from None
            except JoinTokenGrantError as error:
                raise CertificateRefused(
                    f"the control plane did not say which identity the join token grants: {error}"
                ) from None
            identity = self.ask.join_token_identity(grant.spiffe_id)
            self._report(f"the join token grants {identity} (token valid until "
                         f"{grant.expires_at:%Y-%m-%d %H:%M:%S}Z)")  # fmt: skip
            return identity

    def renewal_delay(self) -> float:
        """Seconds until half the current certificate's life has passed (0 if it has).

        Its life counts from when it arrived, not from notBefore: CAs backdate notBefore (ours by
        minutes, for clock skew), which would otherwise shorten a 2-minute certificate's first
        half to nothing."""
        assert self.current is not None
        received = self.current.received_at
        life = (self.current.certificate.not_after - received).total_seconds()
        halfway = received + datetime.timedelta(seconds=life / 2)
        return max(0.0, (halfway - self._wall_clock()).total_seconds())

    def seconds_left(self) -> float:
        assert self.current is not None
        return (self.current.certificate.not_after - self._wall_clock()).total_seconds()

    async def keep_renewed(self, backoff: Backoff | None = None) -> None:
        """Renew at half-life, forever. A failed renewal is retried with backoff and jitter
        (closer together as expiry nears, so a short outage never lets the certificate lapse);
        past expiry it keeps trying, with the token if it has one."""
        backoff = backoff or Backoff(RETRY_BASE, RETRY_MAX)
        assert self.current is not None and self.identity is not None
        delay = self.renewal_delay()
        failures = 0
        while True:
            await trio.sleep(delay)
            try:
                await self._renew(token_too=failures >= 2)
            except (GrpcError, IssuedCertificateError) as error:
                failures += 1
                left = self.seconds_left()
                delay = backoff.next_delay()
                if left > 0:
                    delay = min(delay, max(RETRY_BASE, left / 4))
                message = error.message if isinstance(error, GrpcError) else str(error)
                self._report(
                    f"renewing {self.identity} (serial {self.current.certificate.serial}, "
                    + (f"expires in {left:.0f}s" if left > 0 else f"EXPIRED {-left:.0f}s ago")
                    + f") failed: {message}; retrying in {delay:.1f}s"
                )
                continue
            backoff.reset()
            failures = 0
            delay = max(RETRY_BASE, self.renewal_delay())

    async def _renew(self, token_too: bool) -> None:
        assert self.identity is not None
        # The current certificate authorises its own renewal while it is valid. The token is the
        # fallback: for a certificate that expired while the CA was away or that the CA refused,
        # and after repeated failures (a server that rejects a client certificate in a TLS 1.3
        # handshake shows as a lost connection, not a refusal).
        try:
            if self.seconds_left() <= 0:
                raise GrpcError(StatusCode.UNAUTHENTICATED, "the current certificate has expired")
            credentials = await self._issue(self.identity, token=None)
        except GrpcError as error:
            if not self.ask.token or not (token_too or error.code in _REFUSALS):
                raise
            log.info("renewing over mTLS: %s; trying the token", error.message)
            credentials = await self._issue(self.identity, token=self.ask.token)
        self.renewals += 1
        await self._install(credentials, "renewed")

    async def _issue(self, spiffe_id: SpiffeId, *, token: str | None) -> Credentials:
        key = new_private_key()
        csr = certificate_request(key, str(spiffe_id))
        chain = await self.issuer.issue(csr, self.ttl_seconds, token=token)
        certificate = read_issued_chain(chain, key, str(spiffe_id))
        return Credentials(private_key_pem(key), certificate, self._wall_clock())

    async def _install(self, credentials: Credentials, how: str) -> None:
        self.current = credentials
        certificate = credentials.certificate
        self._report(
            f"certificate {how} for {certificate.spiffe_id}: serial {certificate.serial}, "
            f"valid until {certificate.not_after:%Y-%m-%d %H:%M:%S}Z; "
            f"renewal in {self.renewal_delay():.0f}s"
        )
        for subscriber in self._subscribers:
            try:
                outcome = subscriber(credentials)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as error:  # noqa: BLE001 (one consumer failing must not stop renewals)
                log.warning("handing over certificate %s: %s", certificate.serial, error)
