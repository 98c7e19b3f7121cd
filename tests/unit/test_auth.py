"""The mutual HMAC handshake, both sides driven without sockets."""

from __future__ import annotations

import pytest

from collnet.errors import AuthError, ProtocolError
from collnet.membership import auth


def handshake(initiator_secret: bytes | None, responder_secret: bytes | None, host: str) -> None:
    ini = auth.Initiator(initiator_secret)
    res = auth.Responder(responder_secret, host)
    answer, done = res.on_hello(ini.hello({"peer": "a"}), "initiator")
    final, verdict = ini.on_answer(answer, "responder")
    if final is not None:
        assert not done
        try:
            res.on_proof(final, "initiator")
        except AuthError:
            assert verdict is not None, "the responder must not reject what the initiator accepts"
            raise
    if verdict is not None:
        raise verdict


def test_same_secret_authenticates_both_ways() -> None:
    handshake(b"s" * 32, b"s" * 32, "10.0.0.7")


def test_wrong_secret_is_rejected_on_both_sides() -> None:
    ini = auth.Initiator(b"a" * 32)
    res = auth.Responder(b"b" * 32, "10.0.0.7")
    answer, _ = res.on_hello(ini.hello({}), "initiator")
    final, verdict = ini.on_answer(answer, "responder")
    assert isinstance(verdict, AuthError) and "same shared secret" in str(verdict)
    with pytest.raises(AuthError, match="same shared secret"):
        res.on_proof(final, "initiator")


def test_initiator_proof_from_another_secret_is_rejected_by_the_responder() -> None:
    ini = auth.Initiator(b"a" * 32)
    res = auth.Responder(b"b" * 32, "127.0.0.1")
    res.on_hello(ini.hello({}), "x")
    forged = {"proof": auth.initiator_proof(b"a" * 32, ini.nonce, res.nonce)}
    with pytest.raises(AuthError):
        res.on_proof(forged, "x")


def test_a_proof_cannot_be_replayed_in_the_other_role_or_another_session() -> None:
    s = b"k" * 32
    ini = auth.Initiator(s)
    res = auth.Responder(s, "127.0.0.1")
    answer, _ = res.on_hello(ini.hello({}), "x")
    with pytest.raises(AuthError):  # the responder's own proof sent back
        res.on_proof({"proof": answer["proof"]}, "x")
    old, verdict = ini.on_answer(answer, "y")
    assert verdict is None
    res2 = auth.Responder(s, "127.0.0.1")
    res2.on_hello(auth.Initiator(s).hello({}), "x")
    with pytest.raises(AuthError):  # a proof from an earlier session
        res2.on_proof(old, "x")


def test_no_secret_admits_loopback_only() -> None:
    handshake(None, None, "127.0.0.1")
    handshake(None, None, "::1")
    with pytest.raises(AuthError, match="loopback"):
        handshake(None, None, "10.1.2.3")


def test_one_sided_secret_is_a_clear_error_on_either_side() -> None:
    with pytest.raises(AuthError, match="no shared secret"):
        handshake(None, b"s" * 32, "127.0.0.1")
    with pytest.raises(AuthError, match="none is configured here"):
        handshake(b"s" * 32, None, "127.0.0.1")


def test_malformed_handshake_fields_are_protocol_errors() -> None:
    res = auth.Responder(b"s" * 32, "127.0.0.1")
    with pytest.raises(ProtocolError):
        res.on_hello({"nonce": b"short"}, "x")
    with pytest.raises(ProtocolError):
        auth.Initiator(b"s" * 32).on_answer(["not", "a", "map"], "x")
