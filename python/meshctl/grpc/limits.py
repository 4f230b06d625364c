"""The bounds one gRPC connection keeps to: message size, flow-control windows, streams, headers."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Memory per connection stays under about `max_concurrent_streams` x (`stream_window` +
    `max_message_bytes`): the peer may only send what the windows allow, and a stream's window
    is handed back only as its messages are consumed."""

    max_message_bytes: int = 4 * 1024 * 1024
    stream_window: int = 1024 * 1024
    max_concurrent_streams: int = 16
    max_header_list_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "stream_window", "max_concurrent_streams", "max_header_list_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, not {getattr(self, name)}")
        if self.stream_window > 2**31 - 1:
            raise ValueError("Limits.stream_window must be below 2**31 (the HTTP/2 maximum)")

    @property
    def connection_window(self) -> int:
        # Every stream can fill its own window without starving the others on the connection.
        return min(self.stream_window * self.max_concurrent_streams, 2**31 - 1)


DEFAULT_LIMITS = Limits()
