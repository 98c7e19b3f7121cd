"""A DDP communication hook: gradient buckets averaged by collnet, with a codec.

    state = CollnetHookState(codec="uint8", error_feedback=True)
    ddp.register_comm_hook(state, collnet_hook)

Each bucket is averaged with one ``all_reduce(op="avg")`` through the
group's ``ProcessGroupCollnet`` (the default group, or ``state.process_group``),
started as soon as DDP hands the bucket over, so communication overlaps the
rest of the backward pass. With a lossy codec every rank still ends with the
same bits (the owner of each chunk quantizes it once for everyone), so the
replicas stay bit-identical. ``error_feedback`` adds each bucket's
quantization error of the previous step to its next input (kept per bucket
index in the SDK).

Failure model: DDP turns an error of a hook's future into a plain
``RuntimeError`` (and a Python exception as a future's value crashes its
reducer), so the hook reports failures itself, synchronously, where torch
keeps their type: a bucket's hook raises the typed error of any earlier
bucket that already failed, and the last bucket's hook waits for all of this
step's buckets, then raises the first typed error (a ``PeerLost`` that is a
``DistBackendError``). It comes out of ``loss.backward()``. The DDP instance
is then spent: re-form the group (``collnet_client.torch.reinit()``), wrap
the model in a new ``DistributedDataParallel`` (which broadcasts rank 0's
parameters, repairing a step some survivors completed and others did not),
and go on.

DDP checks the hook's annotations against torch's own classes at
registration, so this module does not postpone their evaluation.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket

from collnet.errors import InvalidArgument
from collnet_client.torch.commthread import CollnetWork
from collnet_client.torch.errors import as_torch_error
from collnet_client.torch.process_group import ProcessGroupCollnet


@dataclass
class CollnetHookState:
    """What ``collnet_hook`` needs: the codec, error feedback, and this step's buckets."""

    codec: str = "none"
    error_feedback: bool = False
    process_group: ProcessGroupCollnet | None = None
    # This backward pass's buckets in flight, in the order DDP handed them over.
    works: list[CollnetWork] = field(default_factory=list)

    def group(self) -> ProcessGroupCollnet:
        group = self.process_group or dist.distributed_c10d._get_default_group()
        if not isinstance(group, ProcessGroupCollnet):
            raise as_torch_error(InvalidArgument(f"collnet_hook needs a collnet group: {group!r}"))
        return group

    def raise_failed(self) -> None:
        """Raise the typed error of this step's first failed bucket, if any, and forget them."""
        failed = next((w for w in self.works if w.exception() is not None), None)
        if failed is not None:
            self.works = []
            error = failed.exception()
            assert error is not None
            raise error


def collnet_hook(state: CollnetHookState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over the group with ``state``'s codec; see the module docstring."""
    if bucket.index() == 0:
        state.works = []  # a new backward pass
    state.raise_failed()
    work = state.group().all_reduce_async(
        bucket.buffer(),
        op="avg",
        codec=state.codec,
        error_feedback=state.error_feedback,
        feedback_key=("ddp-bucket", bucket.index()),
    )
    state.works.append(work)
    if bucket.is_last():
        for w in state.works:
            w.pending.wait_done()
        state.raise_failed()
        state.works = []
    return work.get_future()
