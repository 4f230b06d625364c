"""Two control planes on one etcd store share join tokens, issued certificates and revocations: a
token made on one works on the other, and a revocation made on one reaches the other's ROOTCA."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import trio
from helpers.control_plane import start_control_plane
from helpers.etcd_cluster import start_cluster
from test_identity_plane_e2e import (
    ALICE,
    Workload,
    _register_and_follow_rootca,
    create_certificate,
    join_token,
    refused,
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
        # One CA for both planes (as the HA docs say: copy it, or give both --ca-cert/--ca-key).
        shutil.copytree(planes[0].data_dir / "meshctl" / "ca", tmp_path / "b" / "meshctl" / "ca")
        planes.append(start_control_plane(tmp_path / "b", *store))
        a, b = planes
        alice = Workload(tmp_path, "alice")
        token = join_token(a, "alice")
        leaf = alice.keep(
            create_certificate(b, alice.csr(ALICE), bearer=token)
        )  # made on a, used on b
        assert re.search(
            rf"{re.escape(ALICE)}\s+{leaf.serial_number:x}\s", a.meshctl("identity", "list").stdout
        )

        def revoke_on_a() -> None:
            result = a.meshctl("identity", "revoke", format(leaf.serial_number, "x"))
            assert result.returncode == 0, result.stderr

        took, serials = trio.run(
            _register_and_follow_rootca, b, alice, "alice-ha", revoke_on_a, leaf.serial_number
        )
        assert took < 5 and leaf.serial_number in serials  # b's sidecars learn a's revocation
        error = refused(b, alice.csr(ALICE), workload=alice)
        assert error.code == StatusCode.PERMISSION_DENIED and "is revoked" in error.message
        token_id = token.split(".")[1]
        assert b.meshctl("identity", "token", "revoke", token_id).returncode == 0
        error = refused(a, alice.csr(ALICE), bearer=token)
        assert error.code == StatusCode.UNAUTHENTICATED and "revoked" in error.message
    finally:
        for plane in planes:
            plane.stop()
        cluster.stop()
