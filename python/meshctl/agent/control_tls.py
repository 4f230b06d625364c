"""TLS contexts for the agent's calls to the control plane (port 15012): trust the mesh's roots,
and present the workload's certificate once it has one."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

ALPN = ["h2"]  # the control plane serves gRPC over h2 only


def server_trust_context(roots_pem: bytes) -> ssl.SSLContext:
    """Verifies the control plane's certificate (chain to `roots_pem`, host name) and offers h2."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_verify_locations(cadata=roots_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    return context


def client_certificate_context(roots_pem: bytes, chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """As server_trust_context, and presents the workload's chain: mTLS, no token needed."""
    context = server_trust_context(roots_pem)
    # The ssl module loads a certificate and key from files only. An anonymous in-memory file
    # (memfd) stands in for one, so the key is never written to a file system.
    with _memory_file(chain_pem + b"\n" + key_pem) as path:
        context.load_cert_chain(path)
    return context


@contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    descriptor = os.memfd_create("meshctl-workload-credentials", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)
