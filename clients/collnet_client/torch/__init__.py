"""PyTorch on collnet.

- ``diloco``: tensors over SDK memory, state sync of tensors, and DiLoCo.
- ``process_group``: ``ProcessGroupCollnet``, the torch.distributed backend
  ``"collnet"`` (registered on import, with the ``collnet://`` rendezvous);
  ``rendezvous``: ``init_process_group``, ``reinit``; ``errors``: collnet's
  errors that are also ``DistBackendError``s; ``hooks``: the DDP comm hook.

Importing this package needs torch (the ``torch`` extra).
"""

from collnet_client.torch.diloco import DiLoCo, OuterStep, empty, sync_state
from collnet_client.torch.process_group import ProcessGroupCollnet
from collnet_client.torch.rendezvous import init_process_group, register, reinit
from collnet_client.torch.topk import TopKConfig

register()

__all__ = [
    "DiLoCo",
    "OuterStep",
    "ProcessGroupCollnet",
    "TopKConfig",
    "empty",
    "init_process_group",
    "reinit",
    "sync_state",
]
