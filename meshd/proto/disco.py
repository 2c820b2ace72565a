"""Path probes ("disco" messages), sans-IO: authenticated, encrypted pings between node keys.

Probes travel on the WireGuard port next to WireGuard's own packets, so the first bytes must never look
like WireGuard (type 1..4 then three zero bytes) nor STUN (top two bits zero, RFC 8489 §6). Wire form::

    magic "MSH" 0xD1 (4) | sender node key, Ed25519 (32) | nonce (24) | NaCl box(plaintext)

The box is XSalsa20-Poly1305 between the two nodes' Ed25519 keys converted to X25519
(``crypto_sign_ed25519_pk_to_curve25519``), so only the addressed peer can read a probe and a probe
cannot be forged by anyone but the sender; the receiver looks the sender key up among its known peers
before it even tries to open the box. Plaintext::

    type (1) | version (1) | transaction id (12) | body

``PING`` has an empty body; ``PONG`` carries the source address the ping arrived from (family 4/6,
port, address), which is how a node learns its peer-reflexive address (RFC 8445 §7.2.5.3.1 in spirit).
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass
from enum import IntEnum

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from meshd.proto.endpoint import Endpoint

MAGIC = b"MSH\xd1"
VERSION = 1
KEY_LEN = 32
NONCE_LEN = 24
TXID_LEN = 12
HEADER_LEN = len(MAGIC) + KEY_LEN + NONCE_LEN
MAX_LEN = 256


class DiscoError(ValueError):
    """Not a probe of ours, or one that does not open; the text says which."""


class MsgType(IntEnum):
    PING = 0x01
    PONG = 0x02


@dataclass(frozen=True, slots=True)
class Ping:
    txid: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    txid: bytes
    observed: Endpoint  #: where the ping came from, as the answering node saw it


Message = Ping | Pong


def looks_like_disco(data: bytes) -> bool:
    return len(data) >= HEADER_LEN and data[:4] == MAGIC


def sender_key(data: bytes) -> bytes:
    """The sender's Ed25519 node key, read before decryption to find the peer (DiscoError if short)."""
    if not looks_like_disco(data):
        raise DiscoError("not a probe (magic missing or too short)")
    return bytes(data[4 : 4 + KEY_LEN])


class DiscoKeys:
    """Our node key and the box towards each peer, computed once per peer (a box costs an X25519)."""

    def __init__(self, node_signing_seed: bytes) -> None:
        sk = SigningKey(node_signing_seed)
        self.public = bytes(sk.verify_key)
        self._private = sk.to_curve25519_private_key()
        self._boxes: dict[bytes, Box] = {}

    def _box(self, peer_node_key: bytes) -> Box:
        box = self._boxes.get(peer_node_key)
        if box is None:
            try:
                peer = VerifyKey(peer_node_key).to_curve25519_public_key()
            except (CryptoError, ValueError, TypeError):
                raise DiscoError("peer node key is not a valid Ed25519 key") from None
            box = Box(PrivateKey(bytes(self._private)), PublicKey(bytes(peer)))
            self._boxes[peer_node_key] = box
        return box

    def forget(self, peer_node_key: bytes) -> None:
        self._boxes.pop(peer_node_key, None)

    def seal(self, peer_node_key: bytes, msg: Message, nonce: bytes | None = None) -> bytes:
        nonce = nonce or os.urandom(NONCE_LEN)
        sealed = self._box(peer_node_key).encrypt(encode_plain(msg), nonce)
        return MAGIC + self.public + sealed  # sealed = nonce + ciphertext

    def open(self, data: bytes, expected_sender: bytes) -> Message:
        """Decrypt a probe from ``expected_sender`` (the caller checked :func:`sender_key` is a peer)."""
        if len(data) > MAX_LEN:
            raise DiscoError(f"probe of {len(data)} bytes exceeds {MAX_LEN}")
        if sender_key(data) != expected_sender:
            raise DiscoError("probe sender differs from the expected peer")
        try:
            plain = self._box(expected_sender).decrypt(bytes(data[4 + KEY_LEN :]))
        except CryptoError:
            raise DiscoError("probe does not decrypt (wrong key or tampered)") from None
        return decode_plain(plain)


def encode_plain(msg: Message) -> bytes:
    if len(msg.txid) != TXID_LEN:
        raise DiscoError(f"transaction id has {len(msg.txid)} bytes, not {TXID_LEN}")
    if isinstance(msg, Ping):
        return bytes([MsgType.PING, VERSION]) + msg.txid
    ip = ipaddress.ip_address(msg.observed[0])
    return (
        bytes([MsgType.PONG, VERSION])
        + msg.txid
        + struct.pack("!BH", ip.version, msg.observed[1])
        + ip.packed
    )


def decode_plain(plain: bytes) -> Message:
    if len(plain) < 2 + TXID_LEN:
        raise DiscoError(f"probe body truncated: {len(plain)} bytes")
    mtype, version = plain[0], plain[1]
    if version != VERSION:
        raise DiscoError(f"probe version {version} unsupported")
    txid = bytes(plain[2 : 2 + TXID_LEN])
    body = plain[2 + TXID_LEN :]
    if mtype == MsgType.PING:
        return Ping(txid)
    if mtype == MsgType.PONG:
        if len(body) < 3:
            raise DiscoError("pong address truncated")
        family, port = struct.unpack_from("!BH", body)
        raw = body[3:]
        if (family, len(raw)) not in ((4, 4), (6, 16)):
            raise DiscoError(f"pong address family {family} with {len(raw)} bytes")
        return Pong(txid, (str(ipaddress.ip_address(raw)), port))
    raise DiscoError(f"probe type 0x{mtype:02x} unknown")


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)
