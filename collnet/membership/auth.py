"""Shared-secret authentication: a mutual HMAC challenge-response (sans-I/O).

Both ends prove they hold the secret without sending it: the initiator sends
a nonce; the responder answers with its own nonce and
``HMAC(secret, b"collnet-responder" | initiator_nonce | responder_nonce)``; the
initiator checks it and answers with
``HMAC(secret, b"collnet-initiator" | responder_nonce | initiator_nonce)``.
The role labels keep one side's proof from being replayed as the other's,
fresh nonces on both sides keep old proofs from being replayed at all, and
proofs are compared in constant time.

This proves knowledge of the secret only, once, at the start: it binds no
peer id (anyone with the secret can claim any id) and the frames after it
travel in plaintext, with neither confidentiality nor integrity. It is for
trusted networks; across the internet use TLS (``collnet.transport.tls``),
under which the handshake still runs if a secret is also configured.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Any

from collnet.errors import AuthError, ProtocolError

NONCE_BYTES = 32
PROOF_BYTES = 32
_RESPONDER = b"collnet-responder"
_INITIATOR = b"collnet-initiator"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _proof(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def responder_proof(secret: bytes, initiator_nonce: bytes, responder_nonce: bytes) -> bytes:
    return _proof(secret, _RESPONDER, initiator_nonce, responder_nonce)


def initiator_proof(secret: bytes, initiator_nonce: bytes, responder_nonce: bytes) -> bytes:
    return _proof(secret, _INITIATOR, responder_nonce, initiator_nonce)


def check_nonce(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise ProtocolError("handshake nonce must be 32 bytes")
    return value


def check_proof(expected: bytes, got: object, who: str) -> None:
    """Raise ``AuthError`` unless ``got`` equals ``expected``."""
    if not isinstance(got, bytes) or len(got) != PROOF_BYTES:
        raise AuthError(f"{who} sent no valid proof of the shared secret")
    if not hmac.compare_digest(expected, got):
        raise AuthError(f"{who} does not hold the same shared secret (HMAC mismatch)")


def is_loopback(host: object) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


class Initiator:
    """The dialling side of a handshake; ``secret=None`` means no authentication."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self.nonce = new_nonce() if secret is not None else b""

    def hello(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {**fields, "nonce": self.nonce} if self.secret is not None else dict(fields)

    def on_answer(self, meta: Any, who: str) -> tuple[dict[str, Any] | None, AuthError | None]:
        """Read the responder's HELLO: the final HELLO to send (if any), and the
        verdict on the responder. Send the final HELLO even when the verdict is
        an error, so both sides see the mismatch and log it."""
        if not isinstance(meta, dict):
            raise ProtocolError("HELLO metadata must be a map")
        if self.secret is None:
            if "proof" in meta:
                return None, AuthError(f"{who} requires a shared secret; none is configured here")
            return None, None
        if "proof" not in meta:
            return None, AuthError(f"{who} has no shared secret configured; this side needs one")
        theirs = check_nonce(meta.get("nonce"))
        final = {"proof": initiator_proof(self.secret, self.nonce, theirs)}
        try:
            check_proof(responder_proof(self.secret, self.nonce, theirs), meta.get("proof"), who)
        except AuthError as exc:
            return final, exc
        return final, None


class Responder:
    """The accepting side of a handshake; ``secret=None`` admits loopback peers only,
    unless the connection is ``certified`` (TLS proved who the peer is)."""

    def __init__(self, secret: bytes | None, remote_host: object, certified: bool = False) -> None:
        self.secret = secret
        self.remote_host = remote_host
        self.certified = certified
        self.nonce = new_nonce() if secret is not None else b""
        self._theirs = b""

    def on_hello(self, meta: dict[str, Any], who: str) -> tuple[dict[str, Any], bool]:
        """The answer to send, and whether the peer is authenticated already."""
        if self.secret is None:
            if not self.certified and not is_loopback(self.remote_host):
                raise AuthError(
                    f"{who} connects from {self.remote_host}, but with neither TLS nor a "
                    "shared secret configured only loopback peers are accepted"
                )
            if "nonce" in meta:
                raise AuthError(f"{who} expects a shared secret; none is configured here")
            return {}, True
        if "nonce" not in meta:
            raise AuthError(f"{who} sent no challenge: it has no shared secret configured")
        self._theirs = check_nonce(meta.get("nonce"))
        proof = responder_proof(self.secret, self._theirs, self.nonce)
        return {"nonce": self.nonce, "proof": proof}, False

    def on_proof(self, meta: Any, who: str) -> None:
        if self.secret is None or not self._theirs:
            raise ProtocolError("unexpected handshake message")
        got = meta.get("proof") if isinstance(meta, dict) else None
        check_proof(initiator_proof(self.secret, self._theirs, self.nonce), got, who)
