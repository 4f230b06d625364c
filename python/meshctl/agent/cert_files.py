"""The workload's certificate, key and trust bundle as files (cert.pem, key.pem, root.pem), for a
process beside the sidecar that reads certificates from disk, such as a real Envoy."""

from __future__ import annotations

from pathlib import Path

from meshctl.identity.files import write_atomically

CERT_FILE = "cert.pem"  # leaf, then intermediates
KEY_FILE = "key.pem"  # PKCS#8, mode 0600
ROOT_FILE = "root.pem"  # every trusted root (both during a root rotation)


def write_cert_dir(directory: Path, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> None:
    """Replace the three files, each atomically (a reader sees the old or the new file, never a
    partial one). The key goes first and the certificate after it, so a reader that reloads
    when cert.pem changes (Envoy's watched files) finds the key that matches."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(directory / KEY_FILE, key_pem, 0o600)
    write_atomically(directory / CERT_FILE, chain_pem, 0o644)
    write_atomically(directory / ROOT_FILE, roots_pem, 0o644)
