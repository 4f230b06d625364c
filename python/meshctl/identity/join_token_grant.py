"""What JoinTokens/Describe answers on the xDS port: the identity a join token grants, as a
google.protobuf.Struct (made by the control plane, read by the sidecar agent before its CSR).

    {"spiffeId": "spiffe://TD/ns/NS/sa/SA", "namespace": NS, "serviceAccount": SA,
     "expiresAt": "2026-11-26T17:00:00Z"}

expiresAt is RFC 3339 in UTC, as protobuf's JSON form of a Timestamp (a Struct number would be a
double). The token's id and secret are never part of it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from meshctl.identity.spiffe import SpiffeId, SpiffeIdError

DESCRIBE_JOIN_TOKEN_METHOD = "/meshctl.identity.v1.JoinTokens/Describe"


class JoinTokenGrantError(Exception):
    """An answer that does not say which identity the token grants; str() names the field."""


@dataclass(frozen=True)
class JoinTokenGrant:
    spiffe_id: SpiffeId
    expires_at: datetime.datetime  # UTC

    def to_struct(self) -> bytes:
        message = struct_pb2.Struct()
        message.update({
            "spiffeId": str(self.spiffe_id),
            "namespace": self.spiffe_id.namespace,
            "serviceAccount": self.spiffe_id.service_account,
            "expiresAt": self.expires_at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        })  # fmt: skip
        return message.SerializeToString()

    @classmethod
    def from_struct(cls, raw: bytes) -> JoinTokenGrant:
        try:
            fields = json_format.MessageToDict(struct_pb2.Struct.FromString(raw))
        except DecodeError as error:
            raise JoinTokenGrantError(f"not a google.protobuf.Struct: {error}") from None
        try:
            spiffe_id = SpiffeId.parse(_text(fields, "spiffeId"))
        except SpiffeIdError as error:
            raise JoinTokenGrantError(f"spiffeId: {error}") from None
        # The parts are sent twice (for readers that do not parse SPIFFE IDs); they must agree.
        for name, part in (("namespace", spiffe_id.namespace),
                           ("serviceAccount", spiffe_id.service_account)):  # fmt: skip
            if _text(fields, name) != part:
                raise JoinTokenGrantError(f"{name}: {fields[name]!r} is not the one in {spiffe_id}")
        try:
            expires_at = datetime.datetime.fromisoformat(_text(fields, "expiresAt"))
        except ValueError:
            raise JoinTokenGrantError(
                f"expiresAt: {fields['expiresAt']!r} is not an RFC 3339 time"
            ) from None
        if expires_at.tzinfo is None:
            raise JoinTokenGrantError(f"expiresAt: {fields['expiresAt']!r} names no time zone")
        return cls(spiffe_id, expires_at.astimezone(datetime.UTC))


def _text(fields: dict, name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise JoinTokenGrantError(f"{name}: required (a non-empty string)")
    return value
