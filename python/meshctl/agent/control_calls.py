"""The agent's services on the control plane's TLS port: Istio's CreateCertificate (the CA), the
identity a join token grants (JoinTokens/Describe), and meshctl's Registry (register, renew the
lease, leave)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from meshctl.agent.control_channels import ControlPlanes
from meshctl.control.istio_ca_messages import (
    CREATE_CERTIFICATE_METHOD,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from meshctl.grpc import GrpcError, StatusCode
from meshctl.identity.join_token_grant import DESCRIBE_JOIN_TOKEN_METHOD, JoinTokenGrant

REGISTER_METHOD = "/meshctl.registry.v1.Registry/Register"
DEREGISTER_METHOD = "/meshctl.registry.v1.Registry/Deregister"


class CertificateService:
    """CreateCertificate and JoinTokens/Describe on the planes, as the WorkloadCertificate's
    issuer."""

    def __init__(self, planes: ControlPlanes, node_id: str = "") -> None:
        self.planes = planes
        self.node_id = node_id  # recorded with the certificate (`meshctl identity list`)

    async def issue(self, csr_pem: str, ttl_seconds: int, *, token: str | None) -> list[str]:
        request = IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
        if self.node_id:
            request.metadata.update({"nodeId": self.node_id})
        # With a token, no client certificate: the token alone says who may be issued what.
        metadata = [("authorization", f"Bearer {token}")] if token else []
        raw = await self.planes.call(
            CREATE_CERTIFICATE_METHOD, request.SerializeToString(),
            metadata=metadata, with_client_certificate=token is None,
        )  # fmt: skip
        try:
            response = IstioCertificateResponse.FromString(raw)
        except Exception as error:  # noqa: BLE001 (protobuf's DecodeError has no common base)
            raise GrpcError(StatusCode.INTERNAL, f"not an IstioCertificateResponse: {error}") from None
        return list(response.cert_chain)

    async def describe_join_token(self, token: str) -> JoinTokenGrant:
        """The identity the join token grants (JoinTokenGrantError if the answer does not say)."""
        raw = await self.planes.call(
            DESCRIBE_JOIN_TOKEN_METHOD, struct_pb2.Struct().SerializeToString(),
            metadata=[("authorization", f"Bearer {token}")], with_client_certificate=False,
        )  # fmt: skip
        return JoinTokenGrant.from_struct(raw)


class RegistryService:
    """Register/Deregister on the planes, authorised by the workload's client certificate (or,
    for a sidecar without one, the API token)."""

    def __init__(self, planes: ControlPlanes, api_token: str | None = None) -> None:
        self.planes = planes
        self.api_token = api_token

    async def register(self, node_id: str, body: dict[str, Any], *, fail_over: bool = True) -> dict[str, Any]:
        return await self._call(REGISTER_METHOD, {**body, "nodeId": node_id}, fail_over)

    async def deregister(self, node_id: str) -> dict[str, Any]:
        return await self._call(DEREGISTER_METHOD, {"nodeId": node_id}, False)

    async def _call(self, method: str, body: dict[str, Any], fail_over: bool) -> dict[str, Any]:
        request = struct_pb2.Struct()
        request.update(body)
        metadata = [("authorization", f"Bearer {self.api_token}")] if self.api_token else []
        raw = await self.planes.call(
            method, request.SerializeToString(), metadata=metadata, fail_over=fail_over
        )
        try:
            return json_format.MessageToDict(struct_pb2.Struct.FromString(raw))
        except Exception as error:  # noqa: BLE001
            raise GrpcError(StatusCode.INTERNAL, f"not a google.protobuf.Struct: {error}") from None
