"""TLS for the control plane's ports: the xDS + CA port (15012, ALPN h2) and the REST API's TLS side
(ALPN http/1.1): a server certificate from our own CA, and client certificates optional but
verified against the trust bundle when presented.

The SSL context is rebuilt (new connections get the new one) when the roots change and before
the server certificate reaches half its life; established connections keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Sequence

import trio

from meshctl.identity.ca import CertificateAuthority

log = logging.getLogger("meshctl.control.xds_tls")


def server_names(xds_host: str, extra: Sequence[str] = ()) -> list[str]:
    """The names the server certificate carries: localhost, 127.0.0.1, the listen address
    (unless a wildcard) and every --xds-name."""
    names = ["localhost", "127.0.0.1"]
    if xds_host not in ("", "0.0.0.0", "::"):
        names.append(xds_host)
    names.extend(name for name in extra if name)
    return list(dict.fromkeys(names))


class ServerTls:
    """The current server SSL context; `context()` is what serve_grpc asks at every connection."""

    def __init__(
        self,
        ca: CertificateAuthority,
        names: Sequence[str],
        *,
        alpn: Sequence[str] = ("h2",),
        purpose: str = "xDS",
    ) -> None:
        self.ca = ca
        self.names = list(names)
        self.alpn = list(alpn)
        self.purpose = purpose  # names the port in the log
        self._context: ssl.SSLContext | None = None
        self._renew_at = 0.0

    def context(self) -> ssl.SSLContext:
        if self._context is None or time.time() >= self._renew_at:
            self.rebuild()
        assert self._context is not None
        return self._context

    def rebuild(self) -> None:
        chain_pem, key_pem, not_after = self.ca.server_certificate(self.names)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(self.alpn)
        # Optional: a join-token holder has no certificate yet, an operator may use the API token.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=self.ca.bundle_pem())
        _load_chain_from_memory(context, chain_pem, key_pem)
        now = time.time()
        self._renew_at = now + (not_after - now) / 2
        self._context = context
        log.info(
            "%s TLS: server certificate for %s, renewed at half-life",
            self.purpose,
            ", ".join(self.names),
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew ahead of need, so no handshake waits on a signature."""
        self.context()
        task_status.started()
        while True:
            await trio.sleep(max(1.0, self._renew_at - time.time()))
            self.rebuild()


def _load_chain_from_memory(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    # ssl can load a key only from a path: an anonymous in-memory file keeps it off the disk.
    descriptor = os.memfd_create("meshctl-xds-server-cert", os.MFD_CLOEXEC)
    try:
        os.write(descriptor, chain_pem + key_pem)
        context.load_cert_chain(f"/proc/self/fd/{descriptor}")
    finally:
        os.close(descriptor)
