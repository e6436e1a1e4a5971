"""Training DataLoaders that continue a task stream where a resumed run left it, mid-epoch too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

Position = Callable[[], tuple[int, int]]


def training_position(trainer: pl.Trainer | None, passes: list[int]) -> tuple[int, int]:
    """``(epoch, batches of it already trained on)`` for a training iterator about to start.

    Under a fitting Trainer, both come from Lightning's loop progress, which Lightning saves in
    every checkpoint and restores before the epoch's iterator is created: ``(e, 0)`` at the start
    of epoch ``e``, ``(e, n)`` when a run resumes from a checkpoint taken ``n`` batches into it
    (counted as batches enter training steps, so batches Lightning prefetched are not counted).
    Without one, the count of passes so far (``passes`` holds it) and 0.

    Example::

        >>> training_position(None, [0]), training_position(None, [1])
        ((0, 0), (1, 0))
    """
    if trainer is None or not trainer.training:
        epoch = passes[0]
        passes[0] += 1
        return epoch, 0
    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that asks ``position()`` for ``(epoch, first_batch)`` when the first
    batch of a pass is drawn, and starts there: a dataset with ``set_position(epoch,
    first_batch)`` is told so before any worker starts (and makes the batches from
    ``first_batch`` on); with any other dataset the batches before ``first_batch`` are drawn and
    discarded, after any distributed sampler has taken its share, so each rank skips its own. A
    dataset's ``set_epoch(epoch)`` is called too.

    Workers are never persistent here: each pass starts them with the dataset as ``position``
    left it (a persistent worker keeps the copy of its first pass).

    Example::

        >>> import torch
        >>> loader = ResumableLoader(torch.arange(6), batch_size=2, position=lambda: (0, 1))
        >>> [b.tolist() for b in loader]
        [[2, 3], [4, 5]]
    """

    def __init__(self, *args: Any, position: Position, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "`persistent_workers=True` would keep each worker's first copy of the dataset; "
                "ResumableLoader restarts its workers every pass"
            )
        super().__init__(*args, **kwargs)
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        # lazily: Lightning may create an epoch's iterator before it settles the epoch (when it
        # resumes from a checkpoint taken at an epoch's end, it re-enters that epoch, ends it and
        # draws the next epoch's batches from the same iterator)
        epoch, first_batch = self.position()
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if hasattr(self.dataset, "set_position"):
            self.dataset.set_position(epoch, first_batch)
            yield from super().__iter__()
            return
        iterator = super().__iter__()
        for _ in range(first_batch):  # trained on before the checkpoint
            next(iterator, None)
        yield from iterator
