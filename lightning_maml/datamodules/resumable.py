"""Training DataLoaders that continue a task stream where a resumed run left it, mid-epoch too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

TrainerGetter = Callable[[], "pl.Trainer | None"]


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` that continues a task stream where a resumed run left it.

    When the first batch of a pass is drawn, the loader takes its position ``(epoch,
    first_batch)`` (see :meth:`position`) and starts there: a sampler or dataset with
    ``set_position(epoch, first_batch)`` is told so before any worker starts (and yields the
    batches from ``first_batch`` on); otherwise the batches before ``first_batch`` are drawn and
    discarded, after any distributed sampler has taken its share, so each rank skips its own. A
    dataset's ``set_epoch(epoch)`` is called too.

    It is a stateful loader for Lightning: ``state_dict()`` (saved in checkpoints) holds the epoch
    and the batches of it already trained on, and after ``load_state_dict`` the first pass of that
    epoch starts there.

    Workers are never persistent here: each pass starts them with the dataset as the position
    left it (a persistent worker keeps the copy of its first pass).

    Args:
        trainer_fn: returns the Trainer that fits with this loader, or ``None`` (e.g. a
            DataModule's ``lambda: self.trainer``); without one, passes are epochs 0, 1, ...

    Example::

        >>> import torch
        >>> loader = ResumableLoader(torch.arange(6), batch_size=2)
        >>> loader.load_state_dict({"epoch": 0, "batches_done": 1})  # as from a checkpoint
        >>> [b.tolist() for b in loader]
        [[2, 3], [4, 5]]
    """

    def __init__(self, *args: Any, trainer_fn: TrainerGetter | None = None, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "`persistent_workers=True` would keep each worker's first copy of the dataset; "
                "ResumableLoader restarts its workers every pass"
            )
        super().__init__(*args, **kwargs)
        self.trainer_fn = trainer_fn
        self._passes = 0  # passes started outside a fitting Trainer
        self._restored: tuple[int, int] | None = None

    def position(self, start_pass: bool = False) -> tuple[int, int]:
        """``(epoch, batches of it already trained on)``, for a pass about to start
        (``start_pass=True``) or a checkpoint being written.

        While a Trainer fits, both come from Lightning's loop progress, which Lightning saves in
        every checkpoint and restores before a resumed run draws its first batch: ``(e, 0)`` at
        the start of epoch ``e``, ``(e, n)`` ``n`` batches into it (counted as batches enter
        training steps, so batches Lightning prefetched do not count). Otherwise the passes
        started so far and 0.
        """
        trainer = self.trainer_fn() if self.trainer_fn is not None else None
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            epoch = self._passes
            self._passes += start_pass
            return epoch, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self.position()
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._restored = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def __iter__(self) -> Iterator[Any]:
        # lazily: Lightning may create an epoch's iterator before it settles the epoch (when it
        # resumes from a checkpoint taken at an epoch's end, it re-enters that epoch, ends it and
        # draws the next epoch's batches from the same iterator)
        epoch, first_batch = self.position(True)
        if self._restored is not None:
            restored_epoch, restored_first = self._restored
            self._restored = None
            if restored_epoch == epoch:
                first_batch = restored_first
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        positioned = next(
            (o for o in (self.sampler, self.dataset) if hasattr(o, "set_position")), None
        )
        if positioned is not None:
            positioned.set_position(epoch, first_batch)
            yield from super().__iter__()
            return
        iterator = super().__iter__()
        for _ in range(first_batch):  # trained on before the checkpoint
            next(iterator, None)
        yield from iterator
