"""Who may join: both sides prove the shared key on every connection, bound to its nonces and channel.

The source challenges with a fresh nonce; the destination answers with its
own nonce and an HMAC over both; the source answers with its HMAC.  The role
is part of each proof, so one side's proof is never valid as the other's, and
the channel too, so a proof for one connection opens no other.  Without
a key (``--key-file`` or ``$MIGRATE_KEY``) the key is empty and proves
nothing; the source then listens on loopback only, or relies on TLS
(docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from ..errors import RemoteProtocolError
from .events import NONCE_LEN, Challenge, Channel, Hello, Role, Welcome


def new_nonce() -> bytes:
    """A fresh random nonce for a challenge or a hello."""
    return secrets.token_bytes(NONCE_LEN)


def prove(key: bytes, role: Role, channel: Channel, source_nonce: bytes, dest_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof that ``role`` knows ``key``, bound to both nonces and the connection."""
    msg = b"|".join([b"uffd-migrate", role.value.encode(), channel.value.encode(), source_nonce, dest_nonce])
    return hmac.new(key, msg, hashlib.sha256).digest()


def proof_ok(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison of proofs."""
    return hmac.compare_digest(expected, got)


def hello(key: bytes, channel: Channel, session: bytes, challenge: Challenge) -> Hello:
    """The destination's answer to a challenge: ``session`` is ``b""`` for a new one."""
    nonce = new_nonce()
    return Hello(channel, session, nonce, prove(key, Role.DESTINATION, channel, challenge.nonce, nonce))


def check_hello(key: bytes, challenge: Challenge, got: Hello) -> None:
    """The source's check of the destination's proof.

    Raises:
        RemoteProtocolError: the destination does not know the key.
    """
    if not proof_ok(prove(key, Role.DESTINATION, got.channel, challenge.nonce, got.nonce), got.proof):
        raise RemoteProtocolError("authentication failed: the destination does not know the key")


def welcome(key: bytes, challenge: Challenge, got: Hello, session: bytes) -> Welcome:
    """The source's proof, sent once the destination's holds."""
    return Welcome(session, prove(key, Role.SOURCE, got.channel, challenge.nonce, got.nonce))


def check_welcome(key: bytes, challenge: Challenge, sent: Hello, got: Welcome) -> None:
    """The destination's check of the source's proof.

    Raises:
        RemoteProtocolError: the source does not know the key.
    """
    if not proof_ok(prove(key, Role.SOURCE, sent.channel, challenge.nonce, sent.nonce), got.proof):
        raise RemoteProtocolError("authentication failed: the source does not know the key",
                                  hint="give both sides the same --key-file")
