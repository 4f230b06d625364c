"""The control plane's identity state: the CA, join tokens, issued certificates and revocations in the
store, and the trust material (bundle + CRLs) every sidecar gets as the ROOTCA secret.

Records live in the store's identity key space (Store.put_record), so planes sharing an etcd
store share tokens, issued certificates and revocations; a revocation made on any plane reaches
the others through their watch (store_etcd.follow_records) and is republished within seconds.

    tokens/<token id>          JoinToken.as_record() (the secret's SHA-256, never the secret)
    certificates/<serial hex>  {"serial", "spiffeId", "notAfter", "issuer", "node", "issuedAt",
                                "revoked", "revokedAt"}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshctl.control.store import Store, StoreError
from meshctl.identity import tokens
from meshctl.identity.ca import CaError, CertificateAuthority, IssuedCertificate, fingerprint
from meshctl.identity.spiffe import SpiffeId

log = logging.getLogger("meshctl.control.identity")

TOKENS = "tokens"
CERTIFICATES = "certificates"
# Planes on one etcd store share the generated roots (keys included, as Istio keeps its CA in a
# Kubernetes secret): whoever can read that etcd prefix can sign identities.
SHARED_CA = "ca"
SHARED_CA_KEY = "roots"
# Expired certificate records are kept this long (they leave the CRLs when they expire), then
# pruned so renewals every few hours do not grow the store forever.
EXPIRED_KEPT = 3600.0
PRUNE_INTERVAL = 600.0
# CRLs carry a nextUpdate this far ahead and are re-signed well before it passes.
CRL_LIFETIME = 4 * 3600.0
CRL_REFRESH = 3600.0


class IdentityError(Exception):
    """A refusal with its kind: "not_found", "invalid", "conflict"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class CertificateSettings:
    default_ttl: float = 24 * 3600.0
    max_ttl: float = 24 * 3600.0
    min_ttl: float = 60.0

    def ttl_for(self, requested: float) -> float:
        """0 → the default; anything else within [min, max]."""
        if requested < 0 or not math.isfinite(requested):
            raise IdentityError("invalid", f"validity_duration {requested:g} is negative")
        ttl = requested or self.default_ttl
        return min(max(ttl, self.min_ttl), self.max_ttl)


class IdentityAuthority:
    """Bound to the store by `serve()`; every method after that runs on the plane's trio thread."""

    def __init__(
        self, ca: CertificateAuthority, settings: CertificateSettings = CertificateSettings()
    ) -> None:
        self.ca = ca
        self.settings = settings
        self.store: Store | None = None
        # Revoked, unexpired certificates by serial: (issuer key id, revoked at, not after).
        self._revoked: dict[int, tuple[str, float, float]] = {}
        # Goes up whenever the trust material sidecars get changes (roots, CRLs).
        self.generation = 0
        self._changed = trio.Event()
        self._crls: str = ""
        self._crls_made = 0.0
        # Called after every change of the roots (the xDS port rebuilds its TLS context).
        self.on_roots_changed: list[Callable[[], None]] = []
        # Until the store's revocations are read, revoked_serial() cannot be trusted (the API
        # port opens before this service starts, and refuses client certificates meanwhile).
        self.revocations_loaded = False

    # --- lifecycle -----------------------------------------------------------------------------

    async def serve(
        self, store: Store, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Load revocations, then keep CRLs fresh, finish rotations whose overlap ran out, prune
        expired records and (etcd) follow other planes' revocations, until cancelled."""
        self.store = store
        shared = hasattr(store, "follow_records") and not self.ca.operator_supplied
        if shared:
            await self._join_shared_ca(store)
        for record in await store.list_records(CERTIFICATES):
            self._learn(record)
        self._make_crls()
        self.revocations_loaded = True
        async with trio.open_nursery() as nursery:
            if hasattr(store, "follow_records"):
                await nursery.start(store.follow_records, CERTIFICATES, self._on_shared_record)
            if shared:
                await nursery.start(store.follow_records, SHARED_CA, self._on_shared_ca)
            nursery.start_soon(self._maintain)
            task_status.started(self.describe())

    def describe(self) -> str:
        root = self.ca.signer.root
        origin = "operator-supplied" if self.ca.operator_supplied else "generated"
        return (
            f"CA for trust domain {self.ca.trust_domain} ({origin}, root SHA-256 "
            f"{fingerprint(root)[:23]}..., bundle in {self.ca.directory / 'root-bundle.pem'})"
        )

    async def _join_shared_ca(self, store: Store) -> None:
        """The first plane on the store puts its roots there; every later one adopts them."""
        state = self.ca.shared_state()
        if await store.put_record_if_absent(SHARED_CA, SHARED_CA_KEY, state):  # type: ignore[attr-defined]
            log.info("this plane's CA roots are now shared through the store")
            return
        found = await store.get_record(SHARED_CA, SHARED_CA_KEY)
        if found is not None and self.ca.adopt(found):
            log.info(
                "adopted the CA roots shared through the store (root SHA-256 %s...)",
                fingerprint(self.ca.signer.root)[:23],
            )
            self._roots_changed()

    def _on_shared_ca(self, state: dict[str, Any]) -> None:
        try:
            changed = self.ca.adopt(state)
        except CaError as error:
            log.warning("ignoring the shared CA state: %s", error)
            return
        if changed:
            log.info(
                "the CA roots changed on another control plane (%d trusted now)",
                len(self.ca.roots()),
            )
            self._roots_changed()

    async def _share_roots(self) -> None:
        store = self.store
        if store is not None and hasattr(store, "follow_records") and not self.ca.operator_supplied:
            await store.put_record(SHARED_CA, SHARED_CA_KEY, self.ca.shared_state())

    async def _maintain(self) -> None:
        last_prune = 0.0
        while True:
            now = time.time()
            if self.ca.overlap_over(now):
                log.info(
                    "root rotation: the overlap is over; the previous root is no longer trusted"
                )
                try:
                    await self.finish_rotation()
                except (IdentityError, StoreError) as error:
                    log.warning("finishing the root rotation: %s", error)
            elif now - self._crls_made >= CRL_REFRESH or self._drop_expired(now):
                self._make_crls()
                self._bump()
            if now - last_prune >= PRUNE_INTERVAL:
                last_prune = now
                try:
                    await self._prune(now)
                except StoreError as error:
                    log.warning("pruning expired certificate records: %s", error)
            await trio.sleep(1.0)

    def _require_store(self) -> Store:
        if self.store is None:
            raise IdentityError("unavailable", "the certificate authority is still starting; retry")
        return self.store

    # --- what sidecars trust ---------------------------------------------------------------------

    def bundle_pem(self) -> str:
        return self.ca.bundle_pem()

    def crls_pem(self) -> str:
        return self._crls or self._make_crls()

    def revoked_serial(self, serial: int) -> bool:
        return serial in self._revoked

    async def wait_for_change(self, after: int) -> int:
        while self.generation <= after:
            await self._changed.wait()
        return self.generation

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()

    def _make_crls(self) -> str:
        by_issuer: dict[str, list[tuple[int, float]]] = {}
        for serial, (issuer, revoked_at, _) in self._revoked.items():
            by_issuer.setdefault(issuer, []).append((serial, revoked_at))
        self._crls = self.ca.crls_pem(by_issuer, lifetime=CRL_LIFETIME)
        self._crls_made = time.time()
        return self._crls

    def _drop_expired(self, now: float) -> bool:
        gone = [serial for serial, (_, _, not_after) in self._revoked.items() if not_after < now]
        for serial in gone:
            del self._revoked[serial]
        return bool(gone)

    def _learn(self, record: dict[str, Any]) -> bool:
        """Take a certificate record's revocation into the CRLs; True if it is news."""
        try:
            serial = int(record["serial"], 16)
            if not record.get("revoked") or serial in self._revoked:
                return False
            if float(record["notAfter"]) < time.time():
                return False
            self._revoked[serial] = (str(record["issuer"]), float(record.get("revokedAt") or time.time()),
                                     float(record["notAfter"]))  # fmt: skip
            return True
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed certificate record: %r", record)
            return False

    def _on_shared_record(self, record: dict[str, Any]) -> None:
        if self._learn(record):
            log.info("certificate %s (%s) was revoked on another control plane",
                     record.get("serial"), record.get("spiffeId"))  # fmt: skip
            self._make_crls()
            self._bump()

    # --- join tokens -----------------------------------------------------------------------------

    async def create_token(
        self, service_account: str, namespace: str, ttl: float
    ) -> tuple[str, tokens.JoinToken]:
        store = self._require_store()
        SpiffeId(self.ca.trust_domain, namespace, service_account)  # validates both names
        try:
            text, record = tokens.new_token(service_account, namespace, ttl)
        except tokens.JoinTokenError as error:
            raise IdentityError("invalid", str(error)) from None
        await store.put_record(TOKENS, record.token_id, record.as_record())
        log.info(
            "join token %s created for %s/%s, expires in %.0fs",
            record.token_id,
            namespace,
            service_account,
            ttl,
        )
        return text, record

    async def list_tokens(self) -> list[tokens.JoinToken]:
        return [
            tokens.JoinToken.from_record(r)
            for r in await self._require_store().list_records(TOKENS)
        ]

    async def revoke_token(self, token_id: str) -> tokens.JoinToken:
        store = self._require_store()
        found = await store.get_record(TOKENS, token_id)
        if found is None:
            raise IdentityError("not_found", f"join token {token_id} not found")
        found["revoked"] = True
        await store.put_record(TOKENS, token_id, found)
        log.info("join token %s revoked", token_id)
        return tokens.JoinToken.from_record(found)

    async def check_join_token(self, text: str) -> tokens.JoinToken:
        """The live token `text` stands for; JoinTokenError says why not (read from the store
        every time: a revocation on another plane counts at once)."""
        token_id, secret = tokens.parse_token(text)
        record = await self._require_store().get_record(TOKENS, token_id)
        return tokens.check_token(
            tokens.JoinToken.from_record(record) if record else None, token_id, secret
        )

    # --- certificates ------------------------------------------------------------------------

    async def issue(self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, requested_ttl: float,
                    node: str | None) -> IssuedCertificate:  # fmt: skip
        """Sign (CsrError if the CSR does not fit `spiffe_id`) and record the certificate."""
        store = self._require_store()
        issued = self.ca.sign_csr(csr, spiffe_id, self.settings.ttl_for(requested_ttl))
        await store.put_record(CERTIFICATES, issued.serial_hex, {
            "serial": issued.serial_hex, "spiffeId": issued.spiffe_id, "notAfter": issued.not_after,
            "issuer": issued.issuer, "node": node, "issuedAt": time.time(), "revoked": False,
            "revokedAt": None,
        })  # fmt: skip
        log.info("issued certificate %s for %s%s, valid until %s", issued.serial_hex, issued.spiffe_id,
                 f" (node {node})" if node else "", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued.not_after)))  # fmt: skip
        return issued

    async def certificate_record(self, serial: int) -> dict[str, Any] | None:
        return await self._require_store().get_record(CERTIFICATES, format(serial, "x"))

    async def list_certificates(self) -> list[dict[str, Any]]:
        records = await self._require_store().list_records(CERTIFICATES)
        return sorted(records, key=lambda r: (r.get("spiffeId", ""), r.get("notAfter", 0)))

    async def revoke_serial(self, serial_text: str) -> list[dict[str, Any]]:
        store = self._require_store()
        try:
            serial = int(serial_text.replace(":", ""), 16)
        except ValueError:
            raise IdentityError("invalid", f"serial {serial_text!r} is not hexadecimal") from None
        record = await store.get_record(CERTIFICATES, format(serial, "x"))
        if record is None:
            raise IdentityError(
                "not_found", f"no certificate with serial {format(serial, 'x')} was issued here"
            )
        return await self._revoke([record])

    async def revoke_service_account(
        self, service_account: str, namespace: str
    ) -> list[dict[str, Any]]:
        wanted = str(SpiffeId(self.ca.trust_domain, namespace, service_account))
        now = time.time()
        records = [
            r for r in await self._require_store().list_records(CERTIFICATES)
            if r.get("spiffeId") == wanted and float(r.get("notAfter", 0)) > now
        ]  # fmt: skip
        if not records:
            raise IdentityError("not_found", f"no unexpired certificate was issued for {wanted}")
        return await self._revoke(records)

    async def _revoke(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        store = self._require_store()
        changed = False
        for record in records:
            if not record.get("revoked"):
                record["revoked"], record["revokedAt"] = True, time.time()
                await store.put_record(CERTIFICATES, record["serial"], record)
                log.info("certificate %s (%s) revoked", record["serial"], record.get("spiffeId"))
            changed = self._learn(record) or changed
        if changed:
            self._make_crls()
            self._bump()  # the ROOTCA secret goes out with the new CRLs now
        return records

    # --- roots ---------------------------------------------------------------------------------

    def roots_json(self) -> dict[str, Any]:
        current = self.ca.signer.root
        return {
            "trustDomain": self.ca.trust_domain,
            "operatorSupplied": self.ca.operator_supplied,
            "overlapUntil": self.ca.overlap_until if self.ca.previous is not None else None,
            "roots": [
                {
                    "subject": root.subject.rfc4514_string(),
                    "fingerprintSha256": fingerprint(root),
                    "notAfter": root.not_valid_after_utc.timestamp(),
                    "signing": root == current,
                    "pem": _pem(root),
                }
                for root in self.ca.roots()
            ],
        }

    async def rotate(self, overlap: float) -> None:
        try:
            self.ca.rotate(overlap)
        except CaError as error:
            raise IdentityError("conflict", str(error)) from None
        log.info("root rotation started: new root %s; the previous one is trusted for %.0fs more",
                 fingerprint(self.ca.signer.root)[:23], overlap)  # fmt: skip
        self._roots_changed()
        await self._share_roots()

    async def finish_rotation(self) -> None:
        try:
            self.ca.finish_rotation()
        except CaError as error:
            raise IdentityError("conflict", str(error)) from None
        log.info(
            "root rotation finished: only root %s is trusted", fingerprint(self.ca.signer.root)[:23]
        )
        self._roots_changed()
        await self._share_roots()

    def _roots_changed(self) -> None:
        known = {signer.key_id for signer in self.ca.signers()}
        for serial in [s for s, (issuer, _, _) in self._revoked.items() if issuer not in known]:
            del self._revoked[serial]  # its root is no longer trusted at all
        self._make_crls()
        self._bump()
        for callback in self.on_roots_changed:
            callback()

    async def _prune(self, now: float) -> None:
        store = self._require_store()
        stale = [
            r["serial"] for r in await store.list_records(CERTIFICATES)
            if float(r.get("notAfter", 0)) < now - EXPIRED_KEPT
        ]  # fmt: skip
        if stale:
            await store.delete_records(CERTIFICATES, stale)
        gone = [
            r["token_id"] for r in await store.list_records(TOKENS)
            if float(r.get("expires_at", 0)) < now - EXPIRED_KEPT
        ]  # fmt: skip
        if gone:
            await store.delete_records(TOKENS, gone)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def identity_service(authority: IdentityAuthority) -> Callable[[Store], Any]:
    """A run_control_plane service factory: the authority, bound to the plane's store."""

    def factory(store: Store):
        async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            await authority.serve(store, task_status=task_status)

        return serve

    return factory
