"""A hand-driven ADS client for protocol tests: send exactly the DiscoveryRequests a test wants."""

from __future__ import annotations

import trio
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from meshctl.control.ads import ADS_METHOD
from meshctl.grpc.client import ClientStream


class AdsProbe:
    def __init__(self, stream: ClientStream, node_id: str) -> None:
        self.stream = stream
        self.node_id = node_id

    async def request(
        self, type_url: str, names: list[str] | None = None, *, version: str = "", nonce: str = "", error: str | None = None
    ) -> None:
        request = DiscoveryRequest(
            version_info=version, resource_names=names or [], type_url=type_url, response_nonce=nonce
        )
        request.node.id = self.node_id
        if error is not None:
            request.error_detail.code = 3
            request.error_detail.message = error
        await self.stream.send_message(request.SerializeToString())

    async def ack(self, response: DiscoveryResponse, names: list[str] | None = None) -> None:
        await self.request(response.type_url, names, version=response.version_info, nonce=response.nonce)

    async def receive(self, timeout: float = 5.0) -> DiscoveryResponse:
        with trio.fail_after(timeout):
            raw = await self.stream.receive_message()
        assert raw is not None, "the server ended the ADS stream"
        return DiscoveryResponse.FromString(raw)

    async def expect_silence(self, seconds: float = 0.3) -> None:
        with trio.move_on_after(seconds):
            raw = await self.stream.receive_message()
            raise AssertionError(f"expected no response, got {DiscoveryResponse.FromString(raw)}")


__all__ = ["ADS_METHOD", "AdsProbe"]
