"""What a DiLoCo checkpoint holds, and restoring it.

``DiLoCo.state_dict()`` returns plain tensors and numbers (``torch.save``
them) in three parts:

- ``shared``: what every peer holds equal after a sync: the global weights,
  the outer optimizers' ``state_dict()``s (one per fragment), the sync
  counter (``round``) and the revision. Any peer's copy restores the world.
- ``peer``: this peer's own: its inner step, the anchors its next
  pseudo-gradients are measured from, its error-feedback residuals (the
  codec's or top-k's), the exchange in flight (waited for when the checkpoint
  is taken: its average, or its error, applied at the planned step after
  the restore) and its ``bytes_sent``.
- ``config``: parameter names and sizes, fragments, schedule and
  compression, checked on load: a checkpoint fits only the run that made it.

Not in it: the model's local weights and the inner optimizer's state, which
the trainer saves next to it as it would without DiLoCo
(``model.state_dict()``, ``inner_optimizer.state_dict()``, its data position).
With those, a whole world stopped after a sync and started again from its
checkpoints continues bit-identically to a run never stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from collnet_client.torch.exchange import ROUND_ERRORS, Completed, Exchange

F32 = npt.NDArray[np.float32]
VERSION = 1


def check(state: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of another format or another run's shape."""
    if state.get("version") != VERSION:
        raise ValueError(f"DiLoCo checkpoint version {state.get('version')!r}, not {VERSION}")
    saved = dict(state["config"])
    if "fragments" in saved:
        saved["fragments"] = [tuple(f) for f in saved["fragments"]]
    if saved != dict(config):
        diff = sorted(k for k in config if saved.get(k) != config[k])
        raise ValueError(f"the checkpoint is of another DiLoCo run (differs in {diff})")


def freeze_pending(pending: Exchange | None) -> dict[str, Any] | None:
    """The exchange in flight as data: waited for, its average or its error kept.

    The exchange's handle becomes ``Completed``, so the apply at the planned
    step does not wait again.
    """
    if pending is None:
        return None
    error: str | None = None
    try:
        pending.handle.wait()
    except ROUND_ERRORS as exc:
        error = f"{type(exc).__name__}: {exc}"
    pending.handle = Completed(error)
    return {
        "fragment": pending.fragment,
        "started_at": pending.started_at,
        "apply_at": pending.apply_at,
        "average": None if error else tensor(pending.buffer),
        "error": error,
        "bytes_sent": pending.bytes_sent,
    }


def thaw_pending(
    saved: Mapping[str, Any] | None, buffer_of: Callable[[int], F32]
) -> Exchange | None:
    """``freeze_pending``'s output as an exchange to apply, its average in the buffer."""
    if saved is None:
        return None
    fragment = int(saved["fragment"])
    buffer = buffer_of(fragment)
    if saved["average"] is not None:
        np.copyto(buffer, array(saved["average"]))
    return Exchange(
        fragment,
        int(saved["started_at"]),
        int(saved["apply_at"]),
        Completed(saved["error"]),
        buffer,
        int(saved["bytes_sent"]),
    )


def tensor(a: npt.NDArray[Any]) -> torch.Tensor:
    """A copy of ``a`` as a tensor (``torch.save`` stores tensors compactly)."""
    return torch.from_numpy(np.array(a, copy=True))


def array(t: Any) -> npt.NDArray[Any]:
    out: npt.NDArray[Any] = (
        t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    )
    return out


__all__ = ["VERSION", "array", "check", "freeze_pending", "tensor", "thaw_pending"]
