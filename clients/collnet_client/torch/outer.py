"""DiLoCo's outer optimizer: any ``torch.optim`` optimizer over the synced global weights.

``OuterOptimizer`` builds one optimizer per fragment (``factory(params)``)
whose parameters are views of the flat global weights, so ``step`` updates
the shared state in place. The averaged pseudo-gradient is set as each
parameter's ``.grad`` (a view of the exchange buffer, no copy).

Bit-identity: every peer applies the same optimizer to the same weights,
state and gradient; torch's CPU optimizers take their per-tensor (not
fused) path for CPU tensors, elementwise and deterministic, so peers that
apply a step stay equal. Peers whose CPUs pick different vector widths may
differ in the last bit; the next ``sync_state`` then makes them equal again
(it moves the differing tensors), which costs bytes, never correctness.

The optimizer's state tensors are part of the shared state (``named_state``),
so a joiner adopts the momentum with the weights. ``sync_state`` needs every
member to offer the same names from the start, so the state is created at
construction: one step with zero gradients (weights restored afterwards) and
every ``step`` counter set back to 0, which for SGD, Adam(W), RMSprop and
their kin is exactly the state the first real step would create. Non-tensor
state entries are not synced (none of torch's optimizers keep any).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from collnet_client.torch.fragments import Fragment

F32 = npt.NDArray[np.float32]
OuterFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def nesterov(lr: float = 0.7, momentum: float = 0.9) -> OuterFactory:
    """The paper's outer optimizer: SGD with Nesterov momentum."""

    def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)

    return build


class OuterOptimizer:
    """One optimizer per fragment over views of ``weights``; see the module docstring."""

    def __init__(
        self,
        factory: OuterFactory,
        weights: F32,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        fragments: Sequence[Fragment],
    ) -> None:
        self.weights = weights
        self.names = list(names)
        self.shapes = list(shapes)
        self.fragments = list(fragments)
        self._offsets = np.cumsum([0, *(int(np.prod(s)) for s in shapes)]).tolist()
        self.views = [self._view(weights, i) for i in range(len(self.names))]
        self.optimizers = [factory([self.views[i] for i in f.params]) for f in self.fragments]
        for f in self.fragments:
            self._materialize(f)

    def _view(self, flat: F32, i: int) -> torch.Tensor:
        return torch.from_numpy(flat[self._offsets[i] : self._offsets[i + 1]]).view(self.shapes[i])

    def _materialize(self, fragment: Fragment) -> None:
        before = self.weights[fragment.start : fragment.stop].copy()
        self.step(fragment, np.zeros(fragment.size, np.float32))
        # Weight decay, say, moves weights even with a zero gradient.
        np.copyto(self.weights[fragment.start : fragment.stop], before)
        for state in self.optimizers[fragment.index].state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                step.zero_()

    def step(self, fragment: Fragment, grad: F32) -> None:
        """One outer step of ``fragment`` with ``grad`` (its flat slice) as the gradient."""
        if grad.size != fragment.size:
            raise ValueError(f"gradient of {grad.size} elements for a fragment of {fragment.size}")
        for i in fragment.params:
            lo = self._offsets[i] - fragment.start
            hi = self._offsets[i + 1] - fragment.start
            self.views[i].grad = torch.from_numpy(grad[lo:hi]).view(self.shapes[i])
        try:
            self.optimizers[fragment.index].step()
        finally:
            for i in fragment.params:
                self.views[i].grad = None

    def named_state(self) -> dict[str, torch.Tensor]:
        """The optimizers' state tensors, named ``outer.<parameter>.<key>``."""
        out: dict[str, torch.Tensor] = {}
        for f, opt in zip(self.fragments, self.optimizers, strict=True):
            for i in f.params:
                for key, value in sorted(opt.state.get(self.views[i], {}).items()):
                    if isinstance(value, torch.Tensor):
                        out[f"outer.{self.names[i]}.{key}"] = value
        return out

    def state_dict(self) -> list[dict[str, Any]]:
        """Each fragment's ``optimizer.state_dict()``, its tensors copied."""
        return [_cloned(opt.state_dict()) for opt in self.optimizers]

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"checkpoint has {len(states)} outer optimizers, this run {len(self.optimizers)}"
            )
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def _cloned(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cloned(v) for v in obj]
    return obj


__all__ = ["OuterFactory", "OuterOptimizer", "nesterov"]
