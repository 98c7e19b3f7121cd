"""PyTorch on collnet.

- ``diloco``: tensors over SDK memory, state sync of tensors, and DiLoCo.

Importing this package needs torch (the ``torch`` extra).
"""

from collnet_client.torch.diloco import DiLoCo, OuterStep, empty, sync_state

__all__ = ["DiLoCo", "OuterStep", "empty", "sync_state"]
