"""gRPC's length-prefixed message framing: encode one message, decode a byte stream into messages."""

import struct
from collections.abc import Iterator

from meshctl.grpc.status import GrpcError, StatusCode

_PREFIX = struct.Struct(">BI")  # compressed flag, big-endian payload length


def encode_message(payload: bytes) -> bytes:
    """Frame one uncompressed message."""
    return _PREFIX.pack(0, len(payload)) + payload


class MessageDecoder:
    """Turns the DATA bytes of one stream into whole messages, refusing any over `max_message_bytes`.

    The size is checked from the 5-byte prefix, before the payload is buffered, so a peer cannot
    make us hold more than one maximum-size message per stream.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._buffer = bytearray()

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buffer += data
        while len(self._buffer) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(self._buffer)
            if compressed:
                # We never send grpc-accept-encoding, so a compliant peer never compresses.
                raise GrpcError(StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
            if length > self._max:
                raise GrpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"message of {length} bytes exceeds the limit of {self._max} bytes",
                )
            end = _PREFIX.size + length
            if len(self._buffer) < end:
                return
            message = bytes(self._buffer[_PREFIX.size : end])
            del self._buffer[:end]
            yield message

    def at_message_boundary(self) -> bool:
        """True when no partial message is held (a stream may only end here)."""
        return not self._buffer
