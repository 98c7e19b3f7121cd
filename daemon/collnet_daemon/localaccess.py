"""Who may use the daemon's local API: its own user (or a chosen group), and token holders.

The local API moves tensors (by naming shared memory) and can make the
daemon leave the world, so on a shared machine it is as private as the
daemon's own files:

- **ipc socket:** created 0600, or 0660 owned by ``--ipc-group``. It is bound
  under a umask that allows nothing more, then widened to the group if one
  is set, so it is never, even for an instant, open wider than that. Every
  request's peer credentials (SO_PEERCRED, which libzmq reports per message
  as its ``Peer-Address``, ``host:uid:gid:pid``) must be this user's or a
  group member's, so a socket file someone loosened, or an abstract socket
  (which has no file mode), still lets nobody else in. The uid becomes the
  request's requester (``collnet_daemon.buffers``).
- **TCP** (the loopback fallback, or ``--ipc tcp://...``): every local user
  can connect to a port, so every request there carries a token, a random
  secret the daemon writes to a file only its user (and group) can read;
  its holder counts as the daemon's own user.

A refused request is answered with ``AuthError`` and logged (once per
connection; further refusals at debug level).
"""

from __future__ import annotations

import contextlib
import grp
import hmac
import logging
import os
import pwd
import re
import secrets
import stat
from typing import Any

import zmq

from collnet.errors import AuthError, InvalidArgument

log = logging.getLogger(__name__)

# libzmq's Peer-Address of an ipc connection where the OS gives peer credentials.
_CREDENTIALS = re.compile(r"^(?P<host>.*):(?P<uid>\d+):(?P<gid>\d+):(?P<pid>\d+)$")
_TOKEN_BYTES = 32


def group_id(group: str) -> int:
    """The gid of ``group`` (a name or a number); ``InvalidArgument`` if unknown."""
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(f"no such group {group!r} (--ipc-group)") from None


class LocalAccess:
    """The local API's access rules; see the module docstring."""

    def __init__(self, group: str | None = None, token_file: str | None = None) -> None:
        self.uid = os.geteuid()
        self.gid = None if group is None else group_id(group)
        self.token_file = token_file
        self.token: bytes | None = None
        self._members: dict[int, bool] = {}
        self._refused: set[bytes] = set()

    # -- the endpoints -----------------------------------------------------
    def bind_ipc(self, sock: zmq.Socket[Any], address: str) -> None:
        """Bind ``sock`` to ``address`` (ipc://PATH), 0600 or 0660 to the group."""
        old = os.umask(0o177)
        try:
            sock.bind(address)
        finally:
            os.umask(old)
        path = address.removeprefix("ipc://")
        if self.gid is None or path.startswith("@"):
            return
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != self.uid:
            raise AuthError(f"{path} is not the socket this daemon just bound")
        os.chown(path, -1, self.gid)
        os.chmod(path, 0o660)

    def issue_token(self) -> None:
        """A fresh token, written to ``token_file`` (0600, or 0640 to the group)."""
        if not self.token_file:
            raise InvalidArgument("a TCP local API endpoint needs a token file (--ipc-token-file)")
        token = secrets.token_hex(_TOKEN_BYTES).encode()
        # A new file under a fresh name, then renamed over the old one: the token
        # is never in a file someone else created, and never readable wider.
        tmp = f"{self.token_file}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
                os.fchmod(fd, 0o640)
            os.write(fd, token + b"\n")
            os.close(fd)
            os.replace(tmp, self.token_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.token = token

    def close(self) -> None:
        """Remove the token file (best effort): nobody needs the token any more."""
        if self.token is not None and self.token_file:
            with contextlib.suppress(OSError):
                os.unlink(self.token_file)

    # -- requests ----------------------------------------------------------
    def check_ipc(self, ident: bytes, peer_address: str | None) -> int:
        """The uid of an ipc request's sender, if it may use the API; else ``AuthError``."""
        found = _CREDENTIALS.match(peer_address or "")
        if found is None:
            # No peer credentials on this OS: the socket file's mode is the guard.
            return self.uid
        uid, gid = int(found["uid"]), int(found["gid"])
        if self._allowed(uid, gid):
            return uid
        raise self._refused_error(
            ident,
            f"uid {uid} (pid {found['pid']}) is not this daemon's user (uid {self.uid})"
            + ("" if self.gid is None else f" nor in its group (gid {self.gid})"),
        )

    def check_token(self, ident: bytes, presented: bytes | None) -> int:
        """The requester of a TCP request (the daemon's user) if it carries the token."""
        if (
            self.token is not None
            and presented is not None
            and hmac.compare_digest(presented.strip(), self.token)
        ):
            return self.uid
        what = "no token" if presented is None else "a wrong token"
        raise self._refused_error(ident, f"a request on the TCP endpoint with {what}")

    def _allowed(self, uid: int, gid: int) -> bool:
        if uid == self.uid:
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        member = self._members.get(uid)
        if member is None:
            try:
                user = pwd.getpwuid(uid)
                member = self.gid in os.getgrouplist(user.pw_name, user.pw_gid)
            except KeyError:
                member = False
            if len(self._members) > 4096:
                self._members.clear()
            self._members[uid] = member
        return member

    def _refused_error(self, ident: bytes, why: str) -> AuthError:
        if ident in self._refused:
            log.debug("local API: refused %s (client %s)", why, ident.hex())
        else:
            if len(self._refused) > 4096:
                self._refused.clear()
            self._refused.add(ident)
            log.warning("local API: refused %s (client %s)", why, ident.hex())
        return AuthError(f"refused by the daemon's local API: {why}")
