"""Two control planes on one etcd store share join tokens, issued certificates and revocations: a
token made on one works on the other, and a revocation made on one reaches the other's ROOTCA."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import trio
from helpers.control_plane import start_control_plane
from helpers.etcd_cluster import start_cluster
from test_identity_plane_e2e import (
    ALICE,
    BOB,
    Workload,
    _register_and_follow_rootca,
    bundle_path,
    create_certificate,
    join_token,
    refused,
    roots,
)

from meshctl.grpc import StatusCode

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd not installed (Debian etcd-server)"
)


def test_tokens_certificates_and_revocations_are_shared_by_planes_on_etcd(tmp_path: Path):
    cluster = start_cluster(tmp_path / "etcd", size=1)
    planes = []
    try:
        store = ("--store", cluster.url("identity"))
        planes.append(start_control_plane(tmp_path / "a", *store))
        planes.append(start_control_plane(tmp_path / "b", *store))
        a, b = planes
        # The second plane adopted the first one's generated root through the store.
        assert bundle_path(b).read_bytes() == bundle_path(a).read_bytes()
        assert "adopted the CA roots shared through the store" in b.log()
        alice = Workload(tmp_path, "alice")
        token = join_token(a, "alice")
        leaf = alice.keep(
            create_certificate(b, alice.csr(ALICE), bearer=token)
        )  # made on a, used on b
        assert re.search(
            rf"{re.escape(ALICE)}\s+{leaf.serial_number:x}\s", a.meshctl("identity", "list").stdout
        )

        observer = Workload(tmp_path, "bob-observer")
        observer.keep(create_certificate(b, observer.csr(BOB), bearer=join_token(a, "bob")))

        def revoke_on_a() -> None:
            result = a.meshctl("identity", "revoke", format(leaf.serial_number, "x"))
            assert result.returncode == 0, result.stderr

        took, serials = trio.run(
            _register_and_follow_rootca, b, observer, "bob-ha", revoke_on_a, leaf.serial_number
        )
        assert took < 5 and leaf.serial_number in serials  # b's sidecars learn a's revocation
        error = refused(b, alice.csr(ALICE), workload=alice)
        assert error.code == StatusCode.PERMISSION_DENIED and "is revoked" in error.message
        token_id = token.split(".")[1]
        assert b.meshctl("identity", "token", "revoke", token_id).returncode == 0
        error = refused(a, alice.csr(ALICE), bearer=token)
        assert error.code == StatusCode.UNAUTHENTICATED and "revoked" in error.message

        # A root rotation on one plane is the rotation of both: b trusts both roots within
        # seconds, signs with the new one, and drops the old one when a finishes it.
        rotated = a.meshctl("identity", "root", "rotate", "--overlap", "1h")
        assert rotated.returncode == 0, rotated.stderr
        wait_until(lambda: len(roots(b)) == 2, 5, "plane b trusts both roots")
        assert roots(b) == roots(a)
        bob = Workload(tmp_path, "bob")
        leaf = bob.keep(create_certificate(b, bob.csr(BOB), bearer=join_token(a, "bob")))
        leaf.verify_directly_issued_by(roots(a)[0])
        assert a.meshctl("identity", "root", "rotate", "--finish").returncode == 0
        wait_until(lambda: len(roots(b)) == 1, 5, "plane b drops the previous root")
        # b's xDS port now chains to the new root: a client trusting only it connects.
        create_certificate(b, bob.csr(BOB), workload=bob)
    finally:
        for plane in planes:
            plane.stop()
        cluster.stop()


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)
