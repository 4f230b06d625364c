"""The sidecar agent's identity end to end: a real `meshctl serve` (its CA on the TLS xDS port) and
`meshctl run --token JOIN_TOKEN ... -- app`; `meshctl identity agent` keeping files for Envoy.

What a user sees: the sidecar's certificate names the token's SPIFFE ID, a 2-minute certificate
is renewed about a minute later (new serial, new key, files rewritten, key.pem 0600), the
control plane records the instance's verified identity, and a flag contradicting the token
stops the start with exit 2 and a clear message."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture
def plane(tmp_path: Path):
    started = start_control_plane(tmp_path / "data")
    yield started
    started.stop()


class Sidecar:
    """`meshctl run --service ...` with a join token, its log in a file; stopped by its PID."""

    def __init__(self, plane: ControlPlane, directory: Path, service: str, token: str, *args: str,
                 command: list[str] = SLEEPER) -> None:  # fmt: skip
        self.log_path = directory / f"{service}.log"
        env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "meshctl", "run", "--service", service, "--token", token,
                 "--xds-address", plane.xds_address, "--outbound-port", str(free_port()),
                 "--admin-port", str(free_port()), "--lease", "3", *args, "--", *command],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.log()}")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def uri_sans(certificate: x509.Certificate) -> list[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def test_a_join_token_gives_the_sidecar_its_identity_renewed_at_half_life(plane, tmp_path: Path):
    token = plane.join_token("reads", "shop")
    certs = tmp_path / "certs"
    sidecar = Sidecar(plane, tmp_path, "reviews", token, "--cert-ttl", "2m", "--cert-dir", str(certs))
    try:
        issued = sidecar.wait_for(
            r"certificate issued for (\S+): serial ([0-9a-f]+), valid until .*renewal in (\d+)s", 30
        )
        # No --service-account or --namespace: both are the token's.
        assert issued.group(1) == "spiffe://cluster.local/ns/shop/sa/reads"
        assert 55 <= int(issued.group(3)) <= 61
        first_serial = issued.group(2)
        sidecar.wait_for(r"sidecar reviews\.shop-\w+ ready", 30)
        first = leaf(certs / "cert.pem")
        assert uri_sans(first) == ["spiffe://cluster.local/ns/shop/sa/reads"]
        assert format(first.serial_number, "x") == first_serial
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        assert lifetime.total_seconds() <= 120 + 5 * 60  # 2 minutes (the CA backdates 5)
        assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
        assert b"BEGIN CERTIFICATE" in (certs / "root.pem").read_bytes()
        first_key = (certs / "key.pem").read_bytes()
        # The control plane knows the certificate and the instance's verified identity.
        issued_records = plane.api("GET", "/v1/identity/certificates")["items"]
        assert first_serial in {record["serial"] for record in issued_records}
        registered = plane.api("GET", "/v1/sidecars")["items"]
        assert [(s["service"], s["namespace"], s.get("identity")) for s in registered] == [
            ("reviews", "shop", "spiffe://cluster.local/ns/shop/sa/reads")
        ]
        # The token has done its work: renewal needs only the current certificate (mTLS).
        plane.api("DELETE", f"/v1/identity/tokens/{token.split('.')[1]}")
        # Renewal at half-life: about a minute after issue.
        started = time.monotonic()
        renewed = sidecar.wait_for(r"certificate renewed for \S+: serial ([0-9a-f]+)", 90)
        took = time.monotonic() - started
        assert renewed.group(1) != first_serial
        assert 40 <= took <= 75, took
        deadline = time.monotonic() + 5
        while leaf(certs / "cert.pem").serial_number == first.serial_number and time.monotonic() < deadline:
            time.sleep(0.1)
        second = leaf(certs / "cert.pem")
        assert format(second.serial_number, "x") == renewed.group(1)
        assert uri_sans(second) == uri_sans(first)
        assert (certs / "key.pem").read_bytes() != first_key  # a new key for each certificate
        assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
        public = serialization.load_pem_private_key((certs / "key.pem").read_bytes(), None).public_key()
        assert public.public_numbers() == second.public_key().public_numbers()
        # Renewals name the instance, for `meshctl identity list`.
        records = {r["serial"]: r for r in plane.api("GET", "/v1/identity/certificates")["items"]}
        assert (records[renewed.group(1)]["node"] or "").startswith("reviews.shop-")
        # Still registered (leases renewed over mTLS with the new certificate), no key in the log.
        assert plane.api("GET", "/v1/sidecars")["items"]
        assert "PRIVATE KEY" not in sidecar.log()
        assert sidecar.popen.poll() is None, sidecar.log()
    finally:
        sidecar.stop()


def test_a_flag_that_contradicts_the_join_token_exits_2(plane, tmp_path: Path):
    token = plane.join_token("a")
    sidecar = Sidecar(plane, tmp_path, "web", token, "--service-account", "b")
    status = sidecar.popen.wait(timeout=30)
    assert status == 2, sidecar.log()
    assert "the join token is for spiffe://cluster.local/ns/default/sa/a" in sidecar.log()
    assert "--service-account b contradicts it" in sidecar.log()
    assert plane.api("GET", "/v1/sidecars")["items"] == []


def test_a_revoked_token_is_refused_with_its_reason(plane, tmp_path: Path):
    token = plane.join_token("web")
    plane.api("DELETE", f"/v1/identity/tokens/{token.split('.')[1]}")
    sidecar = Sidecar(plane, tmp_path, "web", token)
    assert sidecar.popen.wait(timeout=30) == 1, sidecar.log()
    assert "revoked" in sidecar.log()


def test_identity_agent_keeps_the_files_for_a_process_beside_it(plane, tmp_path: Path):
    token = plane.join_token("envoy-side")
    certs = tmp_path / "certs"
    env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
    log_path = tmp_path / "identity-agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "identity", "agent", "--token", token,
             "--cert-dir", str(certs), "--xds-address", plane.xds_address],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (certs / "root.pem").exists() and time.monotonic() < deadline:
            assert agent.poll() is None, log_path.read_text()
            time.sleep(0.1)
        assert uri_sans(leaf(certs / "cert.pem")) == ["spiffe://cluster.local/ns/default/sa/envoy-side"]
        assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0, log_path.read_text()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--service", "web", "--cert-ttl", "2x"], "--cert-ttl"),
        (["--service", "web", "--cert-ttl", "30s"], "--cert-ttl"),
        (["--service", "web", "--service-account", "Not_A_Name"], "--service-account"),
        (["--service", "web", "--xds-address", "nowhere"], "--xds-address"),
        (["--service", "web", "--xds-address", "127.0.0.1:1", "--ca-root", "/nonexistent/root.pem"], "--ca-root"),
        (["--bootstrap", "/dev/null", "--cert-dir", "/tmp/certs"], "--cert-dir"),
    ],
)
def test_bad_identity_flags_exit_2_naming_the_flag(tmp_path: Path, args: list[str], flag: str):
    finished = subprocess.run(
        [sys.executable, "-m", "meshctl", "run", *args, "--token", "meshctl-join.0123456789abcdef." + "s" * 43,
         "--admin-port", "0", "--", "true"],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
    )  # fmt: skip
    assert finished.returncode == 2, finished.stderr
    assert flag in finished.stderr
