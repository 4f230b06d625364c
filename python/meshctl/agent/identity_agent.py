"""`meshctl identity agent`: keeps a workload's certificate, key and trust bundle fresh in a
directory (cert.pem, key.pem 0600, root.pem) for a process that reads them from disk, such as a
real Envoy beside it; no engine, no registration."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from meshctl.agent.cert_files import write_cert_dir
from meshctl.agent.cert_renewal import CertificateRefused, Credentials, WorkloadCertificate
from meshctl.agent.control_calls import CertificateService
from meshctl.agent.control_channels import ControlPlanes, TrustAnchorError
from meshctl.agent.mesh_agent import trust_bundle
from meshctl.agent.workload_identity import IdentityAsk, IdentityConflict
from meshctl.identity.spiffe import DEFAULT_TRUST_DOMAIN


@dataclass(frozen=True)
class IdentityAgentOptions:
    token: str
    cert_dir: Path
    control_planes: tuple[tuple[str, int], ...]  # their TLS ports, in failover order
    ca_root: Path
    service_account: str | None = None  # with a join token: the token's (a flag may repeat it)
    namespace: str | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_ttl: int = 0


def _report(message: str) -> None:
    print(f"meshctl identity agent: {message}", file=sys.stderr, flush=True)


async def run_identity_agent(options: IdentityAgentOptions) -> int:
    try:
        planes = ControlPlanes(options.control_planes, options.ca_root)
    except TrustAnchorError as error:
        _report(str(error))
        return 2
    if options.service_account is None and not IdentityAsk(options.token, "x").with_join_token:
        _report("--service-account is needed with the API token (a join token names its own)")
        return 2
    ask = IdentityAsk(
        token=options.token, service=options.service_account or "default",
        namespace=options.namespace, service_account=options.service_account,
        trust_domain=options.trust_domain,
    )  # fmt: skip
    certificate = WorkloadCertificate(ask, CertificateService(planes), options.cert_ttl, report=_report)

    async def write(credentials: Credentials) -> None:
        planes.use_client_certificate(credentials.chain_pem, credentials.key_pem)
        roots = trust_bundle(planes.roots_pem(), credentials.certificate.root_pem)
        await trio.to_thread.run_sync(
            write_cert_dir, options.cert_dir, credentials.chain_pem, credentials.key_pem, roots
        )

    certificate.subscribe(write)
    try:
        await certificate.obtain_first()
    except IdentityConflict as error:
        _report(str(error))
        return 2
    except CertificateRefused as error:
        _report(str(error))
        return 1
    _report(f"keeping {options.cert_dir}/cert.pem, key.pem and root.pem fresh; SIGTERM ends it")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(certificate.keep_renewed)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    return 0


def main(options: IdentityAgentOptions) -> int:
    logging.basicConfig(level=logging.WARNING, format="meshctl identity agent: %(message)s")
    return trio.run(run_identity_agent, options)
