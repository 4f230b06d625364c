"""gRPC status codes, the error that carries one, and the grpc-message percent-encoding."""

import enum
from urllib.parse import quote, unquote


class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(Exception):
    """A call ended with a non-OK status; `code` and `message` are what the trailers said."""

    def __init__(self, code: StatusCode, message: str = "") -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message


def status_from_value(value: bytes | None) -> StatusCode:
    """Read a grpc-status header value; anything unreadable is UNKNOWN, as the spec says."""
    try:
        return StatusCode(int(value or b""))
    except ValueError:
        return StatusCode.UNKNOWN


def encode_message(message: str) -> bytes:
    # The gRPC spec percent-encodes grpc-message so any text survives an HTTP/2 header value.
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def decode_message(value: bytes | None) -> str:
    return unquote((value or b"").decode("ascii", errors="replace"), errors="replace")


# What a non-200 HTTP status means for a gRPC call (gRPC's "HTTP to gRPC status code mapping").
HTTP_TO_GRPC = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}
