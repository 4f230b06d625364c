"""The sidecar agent's identity, without a network: its CSR, the identity a join token grants it
(asked before the CSR), and the renewal schedule (half-life, backoff and jitter, past expiry) on trio's MockClock.

The CA is meshctl's own (meshctl.identity.ca) in this process; its clock follows the test's."""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from meshctl.agent.backoff import Backoff
from meshctl.agent.cert_renewal import CertificateRefused, WorkloadCertificate
from meshctl.agent.workload_csr import (
    IssuedCertificateError,
    certificate_request,
    new_private_key,
    private_key_pem,
    read_issued_chain,
)
from meshctl.agent.workload_identity import IdentityAsk, IdentityConflict
from meshctl.grpc import GrpcError, StatusCode
from meshctl.identity import ca as ca_module
from meshctl.identity.ca import CertificateAuthority, CsrError, check_csr, load_csr
from meshctl.identity.join_token_grant import JoinTokenGrant
from meshctl.identity.spiffe import SpiffeId

JOIN_TOKEN = "meshctl-join.0123456789abcdef." + "s" * 43
READS = SpiffeId("cluster.local", "default", "reads")


def test_the_csr_names_exactly_the_spiffe_id_and_nothing_else():
    key = new_private_key()
    pem = certificate_request(key, "spiffe://cluster.local/ns/shop/sa/reviews")
    csr = x509.load_pem_x509_csr(pem.encode())
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert csr.public_key().curve.name == "secp256r1"
    assert list(csr.subject) == []
    san = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical
    assert [name.value for name in san.value] == ["spiffe://cluster.local/ns/shop/sa/reviews"]
    assert len(csr.extensions) == 1
    # The CA's own check accepts it for that identity, and only that one.
    check_csr(load_csr(pem), SpiffeId("cluster.local", "shop", "reviews"))
    with pytest.raises(CsrError, match="mismatch"):
        check_csr(load_csr(pem), SpiffeId("cluster.local", "shop", "ratings"))
    assert b"PRIVATE KEY" in private_key_pem(key) and b"PRIVATE KEY" not in pem.encode()


def test_an_issued_chain_must_carry_our_key_and_identity(tmp_path: Path):
    ca = CertificateAuthority.open(tmp_path / "ca", "cluster.local")
    key, other = new_private_key(), new_private_key()
    issued = ca.sign_csr(load_csr(certificate_request(key, str(READS))), READS, 120)
    certificate = read_issued_chain(issued.chain_pem, key, str(READS))
    assert certificate.serial == issued.serial_hex and certificate.spiffe_id == str(READS)
    assert certificate.leaf_and_intermediates_pem.count(b"BEGIN CERTIFICATE") == 1
    assert certificate.root_pem.count(b"BEGIN CERTIFICATE") == 1
    with pytest.raises(IssuedCertificateError, match="not for the key"):
        read_issued_chain(issued.chain_pem, other, str(READS))
    with pytest.raises(IssuedCertificateError, match="expected"):
        read_issued_chain(issued.chain_pem, key, "spiffe://cluster.local/ns/default/sa/other")


class Clock:
    """Wall time that moves with trio's clock (MockClock in these tests), for the agent and CA."""

    def __init__(self) -> None:
        self.start = datetime.datetime.now(datetime.UTC).replace(microsecond=0)

    def __call__(self) -> datetime.datetime:
        try:
            return self.start + datetime.timedelta(seconds=trio.current_time())
        except RuntimeError:  # outside trio.run: the fixtures making the CA's root
            return self.start


class InProcessCa:
    """CreateCertificate's rules over meshctl's CA: a join token grants `granted` (and
    JoinTokens/Describe says so); the API token ("api") whatever the CSR asks; no token, the
    identity of the last certificate (mTLS)."""

    def __init__(self, ca: CertificateAuthority, granted: SpiffeId) -> None:
        self.ca, self.granted = ca, granted
        self.down_until = -1.0  # trio time before which every call is UNAVAILABLE
        self.calls: list[tuple[float, str | None]] = []  # CreateCertificate
        self.described: list[float] = []  # JoinTokens/Describe
        self.mtls_refused = False

    async def describe_join_token(self, token: str) -> JoinTokenGrant:
        self.described.append(trio.current_time())
        await trio.sleep(0.01)
        if trio.current_time() < self.down_until:
            raise GrpcError(StatusCode.UNAVAILABLE, "cannot connect to 127.0.0.1:15012")
        assert token == JOIN_TOKEN
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        return JoinTokenGrant(self.granted, expires)

    async def issue(self, csr_pem: str, ttl_seconds: int, *, token: str | None) -> list[str]:
        self.calls.append((trio.current_time(), token))
        await trio.sleep(0.01)
        if trio.current_time() < self.down_until:
            raise GrpcError(StatusCode.UNAVAILABLE, "cannot connect to 127.0.0.1:15012")
        csr = load_csr(csr_pem)
        if token is None and self.mtls_refused:
            raise GrpcError(StatusCode.UNAUTHENTICATED, "the client certificate has expired")
        if token == "api":
            identity = SpiffeId.parse(csr.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)[0])  # fmt: skip
        else:
            identity = self.granted
        try:
            return self.ca.sign_csr(csr, identity, ttl_seconds or 24 * 3600).chain_pem
        except CsrError as error:
            raise GrpcError(StatusCode.PERMISSION_DENIED, str(error)) from None


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(ca_module, "_now", clock)  # the CA dates certificates by the same clock
    return clock


@pytest.fixture
def issuer(tmp_path: Path) -> InProcessCa:
    return InProcessCa(CertificateAuthority.open(tmp_path / "ca", "cluster.local"), READS)


def workload(issuer: InProcessCa, clock: Clock, ttl: int = 120, **ask: str) -> WorkloadCertificate:
    ask.setdefault("token", JOIN_TOKEN)
    lines: list[str] = []
    made = WorkloadCertificate(IdentityAsk(service="reads", **ask), issuer, ttl, wall_clock=clock,
                               report=lines.append)  # fmt: skip
    made.lines = lines  # type: ignore[attr-defined]
    return made


async def test_renewal_at_half_life_each_with_a_new_key(autojump_clock, clock, issuer):
    made = workload(issuer, clock)
    seen: list[tuple[float, str, bytes]] = []
    made.subscribe(lambda c: seen.append((trio.current_time(), c.certificate.serial, c.key_pem)))
    first = await made.obtain_first()
    assert first.certificate.spiffe_id == str(READS)
    with trio.move_on_after(250):
        await made.keep_renewed()
    times = [round(when) for when, _, _ in seen]
    # 120 s certificates: renewed at 60 s, then every 60 s (each new one's half-life).
    assert times == [0, 60, 120, 180, 240]
    assert len({serial for _, serial, _ in seen}) == 5 and len({key for *_, key in seen}) == 5
    # The first came with the token, renewals over mTLS with the current certificate.
    assert [token for _, token in issuer.calls] == [JOIN_TOKEN, None, None, None, None]
    assert made.renewals == 4
    # Logs name serials and expiry, never the key.
    assert any(seen[1][1] in line and "valid until" in line for line in made.lines)
    assert not any("PRIVATE KEY" in line for line in made.lines)
    assert "PRIVATE" not in repr(made.current)


async def test_a_failed_renewal_backs_off_with_jitter_and_renews_before_expiry(
    autojump_clock, clock, issuer
):
    made = workload(issuer, clock)
    await made.obtain_first()
    issuer.down_until = 95.0  # away from before the first renewal (60 s) until 95 s
    renewed = trio.Event()
    made.subscribe(lambda _: renewed.set())
    fractions = iter([0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(made.keep_renewed, Backoff(1.0, 30.0, lambda: next(fractions)))
        await renewed.wait()
        nursery.cancel_scope.cancel()
    # An attempt starts over mTLS (after two failures, the token follows at once).
    attempts = [round(when, 1) for when, token in issuer.calls[1:] if token is None]
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(attempts)]
    # Backoff doubles (1, 2, 4, 8 ...), each delay drawn from the upper half of its range...
    assert gaps[:3] == [0.5, 2.0, 3.0]
    # ... and never more than a quarter of what is left before expiry (120 s).
    for when, gap in zip(attempts, gaps):
        assert gap <= max(1.0, (120 - when) / 4) + 0.1  # the failed call itself takes 0.02 s
    assert 95 <= trio.current_time() < 120  # renewed before the certificate expired
    assert any("failed" in line and "expires in" in line for line in made.lines)


async def test_past_expiry_it_keeps_trying_and_falls_back_to_the_token(autojump_clock, clock, issuer):
    made = workload(issuer, clock)
    first = await made.obtain_first()
    issuer.down_until = 200.0  # longer than the certificate lives
    renewed = trio.Event()
    made.subscribe(lambda _: renewed.set())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(made.keep_renewed)
        await renewed.wait()
        nursery.cancel_scope.cancel()
    assert trio.current_time() >= 200
    assert made.current is not None and made.current.certificate.serial != first.certificate.serial
    assert issuer.calls[-1][1] == JOIN_TOKEN  # the expired certificate cannot authorise renewal
    assert any("EXPIRED" in line for line in made.lines)


async def test_refused_mtls_renewal_uses_the_token(autojump_clock, clock, issuer):
    made = workload(issuer, clock)
    await made.obtain_first()
    issuer.mtls_refused = True
    with trio.move_on_after(61):
        await made.keep_renewed()
    assert [token for _, token in issuer.calls] == [JOIN_TOKEN, None, JOIN_TOKEN]


async def test_without_flags_the_agent_takes_the_identity_the_join_token_grants(
    autojump_clock, clock, issuer
):
    made = workload(issuer, clock, namespace=None)  # type: ignore[arg-type]
    # The service is "reviews", the token is for "reads": Describe says so before the CSR.
    made.ask = IdentityAsk(token=JOIN_TOKEN, service="reviews")
    credentials = await made.obtain_first()
    assert credentials.certificate.spiffe_id == str(READS) and made.identity == READS
    # One lookup, then one CSR for exactly that identity: no refused guess.
    assert len(issuer.described) == 1 and [token for _, token in issuer.calls] == [JOIN_TOKEN]
    assert any(f"the join token grants {READS}" in line for line in made.lines)


async def test_the_identity_lookup_waits_for_a_control_plane(autojump_clock, clock, issuer):
    issuer.down_until = 3.0
    made = workload(issuer, clock)
    credentials = await made.obtain_first()
    assert credentials.certificate.spiffe_id == str(READS)
    assert len(issuer.described) > 1 and issuer.described[-1] >= 3.0
    assert len(issuer.calls) == 1  # no CSR before the control plane said which identity


async def test_a_flag_that_contradicts_the_join_token_is_refused(autojump_clock, clock, issuer):
    made = workload(issuer, clock)
    made.ask = IdentityAsk(token=JOIN_TOKEN, service="reads", service_account="writes")
    with pytest.raises(IdentityConflict) as refused:
        await made.obtain_first()
    assert "--service-account writes" in str(refused.value)
    assert "spiffe://cluster.local/ns/default/sa/reads" in str(refused.value)
    made.ask = IdentityAsk(token=JOIN_TOKEN, service="reads", namespace="shop")
    with pytest.raises(IdentityConflict, match="--namespace shop"):
        await made.obtain_first()
    assert issuer.calls == []  # refused before any CSR was sent


async def test_operator_mode_the_csr_decides(autojump_clock, clock, issuer):
    made = workload(issuer, clock)
    made.ask = IdentityAsk(token="api", service="reviews", namespace="shop")
    credentials = await made.obtain_first()
    assert credentials.certificate.spiffe_id == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert issuer.described == []  # the API token fixes no identity: nothing to look up


async def test_a_refused_join_token_stops_the_start(autojump_clock, clock, issuer):
    async def refuse(token: str) -> JoinTokenGrant:
        raise GrpcError(StatusCode.UNAUTHENTICATED, "join token 0123456789abcdef is revoked")

    made = workload(issuer, clock)
    issuer.describe_join_token = refuse  # type: ignore[method-assign]
    with pytest.raises(CertificateRefused, match="refused the join token: .* is revoked"):
        await made.obtain_first()
    assert issuer.calls == []


async def test_a_refused_certificate_stops_the_start(autojump_clock, clock, issuer):
    async def refuse(csr_pem: str, ttl_seconds: int, *, token: str | None) -> list[str]:
        raise GrpcError(StatusCode.PERMISSION_DENIED, "CSR SAN mismatch")

    made = workload(issuer, clock)
    issuer.issue = refuse  # type: ignore[method-assign]
    with pytest.raises(CertificateRefused, match=f"refused a certificate for {READS}: CSR SAN"):
        await made.obtain_first()
