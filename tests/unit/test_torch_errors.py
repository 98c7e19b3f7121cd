"""collnet_client.torch.errors: every collnet error, as torch.distributed sees it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from collnet_client.torch import errors  # noqa: E402

from collnet import errors as core  # noqa: E402

KINDS = [core.PeerLost, core.Timeout, core.WaitTimeout, core.MismatchError,
         core.CollectiveAborted, core.DaemonUnavailable, core.InvalidArgument,
         core.CodecError, core.NonFiniteError, core.ProtocolError, core.FrameTooLarge,
         core.AuthError]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_each_kind_becomes_a_dist_backend_error_of_the_same_kind(kind: type) -> None:
    typed = errors.as_torch_error(kind("m", peer="p", buffer_modified=True))
    assert type(typed).__name__ == kind.__name__ and typed.kind == kind.kind
    assert isinstance(typed, kind) and isinstance(typed, dist.DistBackendError)
    assert typed.fields == {"peer": "p"} and typed.buffer_modified is True and str(typed) == "m"
    # What the SDK does to an error it caught keeps both natures.
    copy = typed.with_buffer_modified(False)
    assert type(copy) is type(typed) and copy.buffer_modified is False


def test_a_typed_error_is_returned_as_it_is_and_caught_either_way() -> None:
    typed = errors.as_torch_error(core.PeerLost("gone", peer="peer02"))
    assert errors.as_torch_error(typed) is typed
    with pytest.raises(dist.DistBackendError):
        raise typed
    with pytest.raises(core.PeerLost) as info:
        raise typed
    assert info.value.peer == "peer02"
    assert isinstance(errors.as_torch_error(core.WaitTimeout("w")), errors.Timeout)
