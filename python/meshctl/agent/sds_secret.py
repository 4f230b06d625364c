"""The workload's certificate as the SDS Secret `default` the engine's TLS contexts refer to."""

from __future__ import annotations

from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret

from meshctl.agent.xds_references import SECRET, WORKLOAD_SECRET

SECRET_TYPE = SECRET


def workload_secret(chain_pem: bytes, key_pem: bytes) -> bytes:
    """Serialized envoy.extensions.transport_sockets.tls.v3.Secret named `default`, the chain and
    key inline (the engine keeps them in memory only; its config dump leaves the key out)."""
    secret = Secret(name=WORKLOAD_SECRET)
    secret.tls_certificate.certificate_chain.inline_bytes = chain_pem
    secret.tls_certificate.private_key.inline_bytes = key_pem
    return secret.SerializeToString()
