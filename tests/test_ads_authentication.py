"""ADS behind authenticated_ads: a caller proven by its client certificate gets the handler's own
gRPC status, as an API-token caller does (a sidecar leaving resets its stream: CANCELLED, not a
handler failure logged with a traceback and answered INTERNAL)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from meshctl.control import identity_grpc
from meshctl.grpc import GrpcError, StatusCode

pytestmark = pytest.mark.meshctl_only


class Authority:
    """Just what the revocation watch asks: nothing is ever revoked."""

    generation = 1

    def revoked_serial(self, serial: int) -> bool:
        return False

    async def wait_for_change(self, generation: int) -> int:
        await trio.sleep_forever()


async def test_a_certificate_callers_stream_error_keeps_its_status(monkeypatch):
    certificate = SimpleNamespace(serial_number=0x1234)
    monkeypatch.setattr(identity_grpc, "peer_identity", lambda stream, authority: ("spiffe://x", certificate))

    async def reset_by_peer(stream) -> None:
        raise GrpcError(StatusCode.CANCELLED, "the peer reset the stream")

    checked = identity_grpc.authenticated_ads(reset_by_peer, Authority(), "api-token")
    with pytest.raises(GrpcError) as raised:
        await checked(SimpleNamespace(peer="127.0.0.1:1", metadata=lambda name: None))
    assert raised.value.code == StatusCode.CANCELLED


async def test_a_certificate_callers_stream_that_ends_ends_the_call(monkeypatch):
    certificate = SimpleNamespace(serial_number=0x1234)
    monkeypatch.setattr(identity_grpc, "peer_identity", lambda stream, authority: ("spiffe://x", certificate))
    served = []

    async def ends(stream) -> None:
        served.append(stream)

    stream = SimpleNamespace(peer="127.0.0.1:1", metadata=lambda name: None)
    with trio.fail_after(5):  # the revocation watch is cancelled once the stream ends
        await identity_grpc.authenticated_ads(ends, Authority(), "api-token")(stream)
    assert served == [stream]


async def test_a_certificate_callers_stream_error_keeps_its_status_as_its_connection_goes(monkeypatch):
    certificate = SimpleNamespace(serial_number=0x1234)
    monkeypatch.setattr(identity_grpc, "peer_identity", lambda stream, authority: ("spiffe://x", certificate))

    with trio.CancelScope() as connection:

        async def reset_as_the_connection_closes(stream) -> None:
            connection.cancel()  # the server cancels the connection's calls as the peer goes
            raise GrpcError(StatusCode.CANCELLED, "the peer reset the stream")

        checked = identity_grpc.authenticated_ads(reset_as_the_connection_closes, Authority(), "api-token")
        with pytest.raises(GrpcError) as raised:
            await checked(SimpleNamespace(peer="127.0.0.1:1", metadata=lambda name: None))
    assert raised.value.code == StatusCode.CANCELLED
