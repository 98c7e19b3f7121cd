"""numpy and torch tensors as the host arrays the daemon reduces.

The daemon only ever sees bytes in shared memory. This module turns what a
trainer hands the SDK into a host numpy array, without importing torch: a
torch tensor can only exist if the trainer imported torch already, so
``sys.modules`` says whether to look for one.

- numpy arrays are used as they are;
- a contiguous CPU torch tensor becomes a numpy view of its storage (no copy;
  bfloat16 through an int16 view, since numpy has no native bfloat16);
- anything else (a CUDA tensor, a non-contiguous one) has no host view: the
  SDK stages it, one device-to-host copy in and one copy back on success.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from collnet.errors import InvalidArgument

BF16 = np.dtype(ml_dtypes.bfloat16)


def is_torch_tensor(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


_TORCH_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "int8", "float64")


def torch_numpy_dtype(tensor: Any) -> np.dtype[Any]:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise InvalidArgument(f"unsupported torch dtype {tensor.dtype}")
    return BF16 if name == "bfloat16" else np.dtype(name)


def torch_host_view(tensor: Any) -> npt.NDArray[Any] | None:
    """A numpy view of a CPU tensor's bytes, or None when there is none (CUDA, strided)."""
    torch = sys.modules["torch"]
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    view: npt.NDArray[Any] = t.numpy()
    return view.view(BF16) if tensor.dtype == torch.bfloat16 else view


@dataclass
class HostTensor:
    """What the SDK reduces for one caller tensor.

    ``array``: a host view of the caller's bytes (reduced in place, possibly
    with no copy at all), or None when the bytes must be staged.
    """

    original: Any
    array: npt.NDArray[Any] | None
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def copy_into(self, dst: npt.NDArray[Any]) -> None:
        """Copy the caller's values into host array ``dst`` (same shape and dtype)."""
        if self.array is not None:
            np.copyto(dst, self.array)
        else:
            _torch_of(dst, self.original).copy_(self.original.detach())

    def copy_from(self, src: npt.NDArray[Any]) -> None:
        """Write host array ``src`` back into the caller's tensor."""
        if self.array is not None:
            np.copyto(self.array, src)
        else:
            with sys.modules["torch"].no_grad():
                self.original.copy_(_torch_of(src, self.original))


def new_like(host: npt.NDArray[Any], like: Any) -> Any:
    """A new tensor holding a copy of host array ``host``: a torch tensor on the device
    and of the dtype of ``like`` when ``like`` is one, else a numpy array."""
    if not is_torch_tensor(like):
        return np.array(host, copy=True)
    return _torch_of(np.array(host, copy=True), like).to(like.device)


def empty_like(like: Any, shape: tuple[int, ...]) -> Any:
    """An uninitialised array of ``shape`` of the kind, dtype (and device) of ``like``."""
    if not is_torch_tensor(like):
        return np.empty(shape, dtype=like.dtype)
    return sys.modules["torch"].empty(shape, dtype=like.dtype, device=like.device)


def _torch_of(host: npt.NDArray[Any], like: Any) -> Any:
    """``host`` as a CPU torch tensor sharing its memory, typed like tensor ``like``."""
    torch = sys.modules["torch"]
    if like.dtype == torch.bfloat16:
        return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def host_tensor(tensor: Any) -> HostTensor:
    if isinstance(tensor, np.ndarray):
        return HostTensor(tensor, tensor, tensor.dtype, tensor.shape)
    if is_torch_tensor(tensor):
        return HostTensor(
            tensor, torch_host_view(tensor), torch_numpy_dtype(tensor), tuple(tensor.shape)
        )
    raise InvalidArgument(f"expected a numpy array or a torch tensor, got {type(tensor).__name__}")
