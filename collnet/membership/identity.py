"""Who is at the other end of a connection: a certificate's name (sans-I/O).

With TLS, a peer's id *is* the name on its certificate, and this module is the
one place that reads that name and checks a connection's claims against it:

- a certificate names exactly one identity: its DNS subject-alternative name
  (``collnet certs issue`` writes the name there and in the subject CN); a
  certificate with no DNS name falls back to its CN; several DNS names, or a
  CN that differs from the DNS name, are refused rather than guessed at;
- the name is a valid peer id (``NAME_PATTERN``), so it can be logged and
  used as a key without escaping;
- the coordinator's certificate is named ``coordinator``, a name no peer may
  take.

Certificates arrive here already verified against the CA by the TLS layer, in
the decoded form ``ssl.SSLSocket.getpeercert()`` returns; this module only
decides what they say. A connection without TLS has no certified identity
(``None``): the shared-secret mode proves knowledge of the secret, not who
the peer is.
"""

from __future__ import annotations

import re
from typing import Any

from collnet.errors import AuthError

COORDINATOR = "coordinator"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)


def valid_name(name: object) -> bool:
    """Whether ``name`` can be a certificate name (a peer id or ``coordinator``)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def name_of(dns_names: list[str], common_names: list[str]) -> str:
    """The one identity a certificate with these DNS SANs and subject CNs names."""
    if len(dns_names) > 1 or len(common_names) > 1:
        raise AuthError(f"certificate names several identities: {dns_names or common_names!r}")
    if dns_names and common_names and dns_names[0] != common_names[0]:
        raise AuthError(
            f"certificate CN {common_names[0]!r} differs from its DNS name {dns_names[0]!r}"
        )
    names = dns_names or common_names
    if not names:
        raise AuthError("certificate names no identity (no DNS name, no CN)")
    if not valid_name(names[0]):
        raise AuthError(f"certificate name {names[0][:80]!r} is not a valid peer id")
    return names[0]


def name_of_peercert(cert: Any) -> str:
    """The identity in a verified certificate as ``getpeercert()`` decodes it."""
    if not isinstance(cert, dict) or not cert:
        raise AuthError("the peer presented no verified certificate")
    dns = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return name_of(dns, cns)


def check_claim(certified: str | None, claimed: str, who: str) -> None:
    """Refuse a connection whose claimed id is not the name on its certificate
    (nothing to check without TLS: ``certified`` is ``None``)."""
    if certified is not None and certified != claimed:
        raise AuthError(f"{who} claims to be {claimed[:80]!r} but its certificate is {certified!r}")


def check_peer_name(certified: str | None, who: str) -> None:
    """Refuse the coordinator's name where a peer is expected."""
    if certified == COORDINATOR:
        raise AuthError(f"{who} presents the coordinator's certificate as a peer")
