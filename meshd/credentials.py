"""Our identity towards the coordinator: enrollment, trusted signing keys, certificate renewal, key rotation.

:class:`Credentials` owns the saved node state (``state.json`` through :class:`meshd.state.StateDir`) and
the :class:`meshd.control.ControlClient` that speaks for it. Everything that changes our keys or
certificate goes through here and is saved before it is used, so a crash never leaves WireGuard on a key
the state dir does not have. Failures the user or the daemon must act on raise :class:`CredentialError`
(never the local socket's ``ApiError`` nor the HTTP client's ``ControlError``).

Two loops run under supervision (meshd.supervise): :meth:`renew_loop` renews the node certificate at two
thirds of its lifetime and :meth:`rotation_loop` replaces the WireGuard key every ``--key-rotation``.
An exception that is not a refusal by the coordinator (a full disk while saving, say) leaves the loop,
so the supervisor logs it with its traceback and restarts the loop with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from nacl.public import PrivateKey

from meshd import rotation
from meshd.control import ControlClient, ControlError, Enrollment, NodeKeys, PendingApproval
from meshd.proto import cert, netmap, trust
from meshd.proto.encoding import b64encode
from meshd.state import NodeState, StateDir

log = logging.getLogger("meshd")

RENEW_RETRY = 30.0  #: seconds between renewal attempts after a failure
ROTATE_RETRY = 60.0
ROTATE_CHECK_MAX = 3600.0  #: re-read the key's age at least this often (the clock may jump)


class CredentialError(Exception):
    """Enrollment, renewal or rotation failed; the message says what to do (one line)."""


def enrollment_hint(e: ControlError) -> str:
    if e.status in (401, 403):
        return "; ask the admin for a fresh key (coordinator keys create --user NAME)"
    if e.status == 0:
        return "; check the URL and that `coordinator serve` runs there"
    return ""


class Credentials:
    """The node's saved state and its coordinator client, kept in step."""

    def __init__(
        self,
        store: StateDir,
        state: NodeState,
        client: ControlClient,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.state = state
        self.client = client
        self.clock = clock
        self.on_rekey: Callable[[], Awaitable[None]] | None = None  #: WireGuard and relay take the new key
        self._rotate_lock = asyncio.Lock()
        self._issuers_asked: set[str] = set()
        self._map_keys_asked: set[str] = set()  #: apart: a failed fetch for a certificate must not block maps
        client.map_keys = self.map_signing_keys  # meshd takes no map or delta that does not verify

    # -- read-only views -----------------------------------------------------------------------------------

    @property
    def enrollment(self) -> Enrollment:
        assert self.state.enrollment is not None, "not enrolled"
        return self.state.enrollment

    @property
    def keys(self) -> NodeKeys:
        return self.state.keys

    @property
    def wg_public_b64(self) -> str:
        return b64encode(self.state.keys.wg_public)

    @property
    def trusted_keys(self) -> list[bytes]:
        e = self.enrollment
        return list(e.trusted_keys) or [e.coordinator_public_key]

    def _save(self, state: NodeState) -> None:
        self.store.save(state)  # OSError (full disk) propagates: the caller's supervisor logs and retries
        self.state = state

    # -- enrollment ----------------------------------------------------------------------------------------

    async def enroll(self, url: str, hostname: str, auth_key: str | None, approval_wait: float) -> None:
        """Enroll with a pre-auth key, or print a code for ``coordinator nodes approve`` and wait."""
        try:
            result = await self.client.register(hostname, auth_key)
            if isinstance(result, PendingApproval):
                print(
                    f"To add this machine to the mesh, run on the coordinator:\n"
                    f"    coordinator nodes approve {result.code}",
                    flush=True,
                )
                result = await self.client.wait_for_approval(result.code, within=approval_wait)
        except ControlError as e:
            raise CredentialError(f"enrollment failed: {e}{enrollment_hint(e)}") from None
        self._save(self.state.with_enrollment(url, result))
        self.client.node_id = result.node_id
        log.info("enrolled as %s (%s)", result.name, ", ".join(result.ips))

    # -- signing keys and our certificate ------------------------------------------------------------------

    async def learn_signing_keys(self, m: netmap.NetMap, *, force: bool = False) -> None:
        """Certificates from an issuer we do not trust yet mean the coordinator rotated its signing key:
        fetch the announced keys and keep those endorsed by a key we trust (meshd.proto.trust); this also
        drops keys whose overlap ended. Then take our own re-issued certificate from the map."""
        e = self.enrollment
        known = {cert.key_id(k) for k in e.trusted_keys}
        issuers = set()
        for p in (*m.peers, m.self_node):
            with contextlib.suppress(cert.CertError):
                issuers.add(cert.decode(p.cert)[0].issuer)
        unknown = issuers - known
        if force or (unknown and not unknown <= self._issuers_asked):
            self._issuers_asked |= unknown
            await self._fetch_signing_keys()
        if self.state.pending_wg_private is not None and not self._rotate_lock.locked():
            await self._settle_pending_key(m)  # before the certificate: it names one of the two keys
        self._take_newer_cert(m.self_node.cert)

    async def _fetch_signing_keys(self) -> bool:
        """Trust the announced keys endorsed by a key we trust; False when the coordinator did not answer."""
        e = self.enrollment
        try:
            accepted = trust.accept(e.trusted_keys, await self.client.signing_keys())
        except ControlError as err:
            log.warning("cannot fetch the coordinator's signing keys: %s", err)
            return False
        if accepted != e.trusted_keys:
            e = dataclasses.replace(e, trusted_keys=accepted)
            self._save(self.state.with_enrollment(self.state.coordinator_url or "", e))
            log.info("trusted coordinator signing keys: %s", ", ".join(cert.key_id(k) for k in accepted))
        return True

    async def map_signing_keys(self, key_id: str) -> list[bytes]:
        """The keys a map signed by `key_id` is checked against (meshd.control.MapKeys). A map is signed
        by the coordinator's active key, so after a signing-key rotation the first map names a key we do
        not know yet: fetch the endorsed keys once per unknown id (the same fetch as for certificates from
        an unknown issuer), then the map verifies or is refused. A failed fetch is retried on the next
        map (one per reconnect, with backoff)."""
        known = {cert.key_id(k) for k in self.trusted_keys} | self._map_keys_asked
        if key_id not in known and await self._fetch_signing_keys():
            self._map_keys_asked.add(key_id)
        return self.trusted_keys

    def _take_newer_cert(self, mine: str) -> None:
        e = self.enrollment
        if mine == e.cert:
            return
        try:
            newer = cert.verify(mine, e.trusted_keys, self.clock()).serial > cert.decode(e.cert)[0].serial
        except cert.CertError:
            return
        if newer:
            self._save(self.state.with_cert(mine))

    async def renew_loop(self, current_map: Callable[[], netmap.NetMap | None]) -> None:
        """Renew the node certificate at two thirds of its lifetime (retry every 30 s on refusal)."""
        while True:
            payload = cert.decode(self.enrollment.cert)[0]
            renew_at = payload.not_before + (payload.not_after - payload.not_before) * 2 / 3
            await asyncio.sleep(max(1.0, renew_at - self.clock()))
            try:
                new = await self.client.renew_cert()
                cert.verify(new, self.enrollment.trusted_keys, self.clock())
            except (ControlError, cert.CertError) as e:
                log.warning("certificate renewal failed: %s; retrying in %.0f s", e, RENEW_RETRY)
                await asyncio.sleep(RENEW_RETRY)
                continue
            self._save(self.state.with_cert(new))
            log.info("node certificate renewed")
            m = current_map()
            if m is not None:
                await self.learn_signing_keys(m, force=True)

    # -- WireGuard key rotation ----------------------------------------------------------------------------

    async def rotate_keys(self, state_dir: Path) -> tuple[str, str]:
        """Replace our WireGuard key without dropping connections; returns (old, new) public keys.

        Order (meshd/rotation.py): make the key here, save it as pending, register it with proof of
        possession, save it as the key, then let WireGuard and the relay links take it (``on_rekey``).
        Saving it before the coordinator hears of it matters: a crash (or a lost answer) after the
        coordinator took it would otherwise leave us with only the key the coordinator has replaced, and
        peers would never handshake with us again. A pending key is settled by asking the coordinator
        which of the two it has (:meth:`recover_pending_key`, also done by the first map after a start).
        """
        async with self._rotate_lock:
            if self.state.pending_wg_private is not None:
                await self.recover_pending_key()
            old = self.wg_public_b64
            new = NodeKeys.generate().wg_private
            self._save(self.state.with_pending_wireguard_key(new))
            try:
                new_cert = await self.client.rotate_key(new)
            except ControlError as e:
                if 400 <= e.status < 500:  # refused: the coordinator kept the old key
                    self._save(self.state.with_pending_wireguard_key(None))
                    raise CredentialError(f"key rotation failed: {e}") from None
                raise CredentialError(  # no answer: it may have taken the key; the next map tells
                    f"key rotation failed: {e}; the new key stays pending until the coordinator says "
                    f"which key it has"
                ) from None
            try:
                cert.verify(new_cert, self.enrollment.trusted_keys, self.clock())
            except cert.CertError as e:  # an answer we cannot trust: the next map tells which key it has
                raise CredentialError(f"key rotation failed: {e}; the new key stays pending") from None
            self._save(self.state.with_wireguard_key(new).with_cert(new_cert))
            await self._switched(state_dir)
            log.info("wireguard key rotated: %s -> %s", old, self.wg_public_b64)
            return old, self.wg_public_b64

    async def _switched(self, state_dir: Path) -> None:
        """The saved key changed: record its age, sign with it, hand it to WireGuard and the relay."""
        rotation.record_key_created(state_dir, self.clock())
        self.client.keys = self.state.keys
        if self.on_rekey is not None:
            await self.on_rekey()

    async def recover_pending_key(self) -> None:
        """Settle a rotation cut short (crash, lost answer): ask the coordinator for our map and keep the
        key it has for us. CredentialError when it does not answer (the key stays pending)."""
        if self.state.pending_wg_private is None:
            return
        try:
            msg = await self.client.fetch_map()
        except ControlError as e:
            raise CredentialError(f"cannot settle the pending WireGuard key: {e}") from None
        if not isinstance(msg, netmap.MapMessage):
            raise CredentialError("cannot settle the pending WireGuard key: the coordinator sent no map")
        await self._settle_pending_key(msg.map)

    async def _settle_pending_key(self, m: netmap.NetMap) -> None:
        pending = self.state.pending_wg_private
        if pending is None:
            return
        known = m.self_node.wg_public_key
        if known == b64encode(bytes(PrivateKey(pending).public_key)):
            log.warning("the coordinator has the key of an interrupted rotation: using it (%s)", known)
            self._save(self.state.with_wireguard_key(pending))
            await self._switched(self.store.path)
        else:
            if known != self.wg_public_b64:
                log.warning("the coordinator has neither of our WireGuard keys (%s); keeping ours", known)
            else:
                log.info("an interrupted key rotation did not reach the coordinator: keeping %s", known)
            self._save(self.state.with_pending_wireguard_key(None))

    async def rotation_loop(self, state_dir: Path, interval: float) -> None:
        """Rotate the WireGuard key every ``interval`` seconds (retry every 60 s on failure)."""
        while True:
            due = rotation.key_created(state_dir, self.clock()) + interval
            await asyncio.sleep(min(max(1.0, due - self.clock()), ROTATE_CHECK_MAX))
            if self.clock() < due:
                continue
            try:
                await self.rotate_keys(state_dir)
            except CredentialError as e:
                log.warning("%s; retrying in %.0f s", e, ROTATE_RETRY)
                await asyncio.sleep(ROTATE_RETRY)


def default_hostname() -> str:
    return os.uname().nodename.split(".")[0]
