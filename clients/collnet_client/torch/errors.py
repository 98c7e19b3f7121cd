"""collnet's errors as torch.distributed sees them: each one both kinds at once.

A collective of ``ProcessGroupCollnet`` that fails raises the class of this
module named like the SDK's error: ``errors.PeerLost`` is a
``collnet.errors.PeerLost`` (with its ``peer``, ``fields`` and
``buffer_modified``) and a ``torch.distributed.DistBackendError``, so code
written for torch (``except dist.DistBackendError``) and code written for
collnet (``except collnet_client.PeerLost``) both catch it. ``as_torch_error``
makes one from any ``CollnetError``, keeping its message and fields.
"""

from __future__ import annotations

import torch.distributed as dist

from collnet import errors


class CollnetBackendError(errors.CollnetError, dist.DistBackendError):
    """Root of this module: a ``CollnetError`` that is a ``DistBackendError``."""


class ProtocolError(errors.ProtocolError, CollnetBackendError):
    pass


class FrameTooLarge(errors.FrameTooLarge, ProtocolError):
    pass


class CodecError(errors.CodecError, CollnetBackendError):
    pass


class NonFiniteError(errors.NonFiniteError, CodecError):
    pass


class PeerLost(errors.PeerLost, CollnetBackendError):
    pass


class Timeout(errors.Timeout, CollnetBackendError):
    pass


class WaitTimeout(errors.WaitTimeout, Timeout):
    pass


class MismatchError(errors.MismatchError, CollnetBackendError):
    pass


class CollectiveAborted(errors.CollectiveAborted, CollnetBackendError):
    pass


class DaemonUnavailable(errors.DaemonUnavailable, CollnetBackendError):
    pass


class InvalidArgument(errors.InvalidArgument, CollnetBackendError):
    pass


class AuthError(errors.AuthError, CollnetBackendError):
    pass


# Most specific first: a subclass of the SDK's error maps to its nearest kind.
_TORCH_KINDS: tuple[type[CollnetBackendError], ...] = (
    WaitTimeout,
    Timeout,
    PeerLost,
    MismatchError,
    CollectiveAborted,
    DaemonUnavailable,
    InvalidArgument,
    AuthError,
    NonFiniteError,
    CodecError,
    FrameTooLarge,
    ProtocolError,
)


def as_torch_error(exc: errors.CollnetError) -> CollnetBackendError:
    """``exc`` as the class of this module of its kind (itself if it is one already)."""
    if isinstance(exc, CollnetBackendError):
        return exc
    cls = next(
        (k for k in _TORCH_KINDS if isinstance(exc, k.__mro__[1])),
        CollnetBackendError,
    )
    typed = cls(exc.message, buffer_modified=exc.buffer_modified, **exc.fields)
    typed.__cause__ = exc.__cause__
    return typed.with_traceback(exc.__traceback__)
