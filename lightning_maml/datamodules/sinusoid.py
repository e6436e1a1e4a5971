"""Sinusoid regression tasks of Finn et al. 2017 §5.1: ``y = A sin(x - phase)``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_maml._checks import check_count
from lightning_maml.datamodules.resumable import ResumableLoader
from lightning_maml.episode import Episode

_TRAIN, _VAL, _TEST = 0, 1, 2


def seeded_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of non-negative ints (hashed by numpy's SeedSequence),
    so that e.g. (seed, epoch, batch) keys give independent, reproducible streams."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def sample_sinusoid_tasks(
    n_tasks: int,
    k_shot: int,
    query_size: int,
    *,
    amplitude_range: tuple[float, float] = (0.1, 5.0),
    phase_range: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
    generator: torch.Generator | None = None,
    return_parameters: bool = False,
) -> Episode | tuple[Episode, Tensor, Tensor]:
    """Draw ``n_tasks`` sinusoids and their support/query points, as one batched :class:`Episode`.

    Amplitude, phase and inputs are uniform on their ranges; targets are ``A sin(x - phase)``.
    Tensors are float32 with shape ``[n_tasks, k_shot or query_size, 1]``. With
    ``return_parameters=True`` also returns the ``[n_tasks]`` amplitudes and phases.

    Example::

        >>> import torch
        >>> episode = sample_sinusoid_tasks(25, 10, 10, generator=torch.Generator().manual_seed(0))
        >>> episode.support_x.shape, episode.query_y.shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))
    """

    def uniform(shape: Sequence[int], low: float, high: float) -> Tensor:
        return torch.rand(*shape, generator=generator) * (high - low) + low

    amplitude = uniform((n_tasks,), *amplitude_range)
    phase = uniform((n_tasks,), *phase_range)
    x = uniform((n_tasks, k_shot + query_size, 1), *x_range)
    y = amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))
    episode = Episode(x[:, :k_shot], y[:, :k_shot], x[:, k_shot:], y[:, k_shot:])
    if return_parameters:
        return episode, amplitude, phase
    return episode


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SinusoidBatches(Dataset):
    """The training meta-batches of one epoch: item ``b`` is batch ``b`` of epoch ``epoch``.

    Batch ``b`` of epoch ``e`` is drawn from a generator keyed by ``(seed, e, b)``: the global batch
    holds ``meta_batch_size * world_size`` tasks and rank ``rank`` takes its own slice of it, so
    ranks see different tasks and the union over ranks does not depend on the number of processes.
    :meth:`set_epoch` moves it to another epoch's batches.

    Example::

        >>> kwargs = SinusoidDataModule(k_shot=5).sampler_kwargs
        >>> batches = SinusoidBatches(kwargs, meta_batch_size=4, batches_per_epoch=3, seed=0)
        >>> len(batches), batches[2].support_x.shape
        (3, torch.Size([4, 5, 1]))
    """

    def __init__(
        self,
        sampler_kwargs: dict,
        meta_batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sampler_kwargs = sampler_kwargs
        self.meta_batch_size = meta_batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Batches of ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getitem__(self, index: int) -> Episode:
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} out of range({self.batches_per_epoch})")
        generator = seeded_generator(self.seed, _TRAIN, self.epoch, index)
        tasks = sample_sinusoid_tasks(
            self.meta_batch_size * self.world_size, generator=generator, **self.sampler_kwargs
        )
        lo, hi = self.rank * self.meta_batch_size, (self.rank + 1) * self.meta_batch_size
        return Episode(*(t[lo:hi] for t in tasks))


class BatchOrder(DistributedSampler):
    """The batches of :class:`SinusoidBatches` in order, the same indices on every rank (each
    rank's dataset takes its own slice of every batch), from the ``first_batch`` of the last
    :meth:`set_position` on (a :class:`~lightning_maml.datamodules.resumable.ResumableLoader`
    sets it before every pass).

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP: Lightning replaces a
    training loader's other samplers with one that deals the batches out between the ranks,
    which would change which tasks each step sees with the number of processes.
    """

    def __init__(self, batches: SinusoidBatches) -> None:
        super().__init__(batches, num_replicas=batches.world_size, rank=batches.rank, shuffle=False)
        self.batches = batches
        self.first_batch = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.batches.set_epoch(epoch)

    def set_position(self, epoch: int, first_batch: int = 0) -> None:
        """The next pass yields batches ``first_batch`` onwards of epoch ``epoch``."""
        self.set_epoch(epoch)
        self.first_batch = first_batch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[int]:
        # not reset here: a DataLoader with workers creates its sampler iterator twice
        return iter(range(self.first_batch, len(self.batches)))


class TaskSet(Dataset):
    """A fixed set of tasks held as one batched :class:`Episode`; item ``i`` is task ``i``."""

    def __init__(self, episode: Episode) -> None:
        self.episode = episode

    def __len__(self) -> int:
        return self.episode.support_x.shape[0]

    def __getitem__(self, index: int) -> Episode:
        return Episode(*(t[index] for t in self.episode))


class SinusoidDataModule(pl.LightningDataModule):
    """Sinusoid regression episodes (Finn et al. 2017 §5.1) for :class:`~lightning_maml.MAMLModule`.

    Training draws fresh random tasks every batch; validation and test use fixed task sets drawn
    from ``seed`` (the same tasks in every epoch and every run). Batches are :class:`Episode` s of
    shape ``[meta_batch_size, k_shot | query_size, 1]``.

    Args:
        k_shot: support examples per task (default 10).
        query_size: query examples per task (default 10).
        meta_batch_size: tasks per batch and per process (default 25, as in the paper); under DDP
            with N processes each optimizer step sees ``N * meta_batch_size`` tasks.
        batches_per_epoch: training meta-batches per epoch (default 100).
        num_val_tasks: size of the fixed validation task set (default 100).
        num_test_tasks: size of the fixed test task set (default 600).
        amplitude_range: ``(low, high)`` of the amplitude (default ``(0.1, 5.0)``).
        phase_range: ``(low, high)`` of the phase (default ``(0, pi)``).
        x_range: ``(low, high)`` of the inputs (default ``(-5, 5)``).
        seed: seed of every task stream (default 0).
        num_workers: DataLoader workers for training (default 0; generation is cheap). They start
            anew each epoch, with the epoch's position in the task stream.

    Raises:
        ValueError: if a count is below 1 or a range has ``low > high``.

    Example::

        >>> dm = SinusoidDataModule(k_shot=5, meta_batch_size=4, batches_per_epoch=2)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader())).support_x.shape
        torch.Size([4, 5, 1])
    """

    def __init__(
        self,
        k_shot: int = 10,
        query_size: int = 10,
        meta_batch_size: int = 25,
        batches_per_epoch: int = 100,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in [
            ("k_shot", k_shot),
            ("query_size", query_size),
            ("meta_batch_size", meta_batch_size),
            ("batches_per_epoch", batches_per_epoch),
            ("num_val_tasks", num_val_tasks),
            ("num_test_tasks", num_test_tasks),
        ]:
            check_count(value, name)
        for name, value in [
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("x_range", x_range),
        ]:
            if len(value) != 2 or not all(math.isfinite(v) for v in value) or value[0] > value[1]:
                raise ValueError(
                    f"`{name}` must be a pair (low, high) of finite numbers with low <= high, "
                    f"got {tuple(value)!r}"
                )
        check_count(seed, "seed", minimum=0)
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.k_shot = k_shot
        self.query_size = query_size
        self.meta_batch_size = meta_batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.num_workers = num_workers
        self.sampler_kwargs = {
            "k_shot": k_shot,
            "query_size": query_size,
            "amplitude_range": tuple(amplitude_range),
            "phase_range": tuple(phase_range),
            "x_range": tuple(x_range),
        }
        self.num_tasks = {_VAL: num_val_tasks, _TEST: num_test_tasks}

    def fixed_tasks(self, split: str) -> Episode:
        """The fixed ``"val"`` or ``"test"`` task set as one batched :class:`Episode`."""
        key = {"val": _VAL, "test": _TEST}[split]
        return sample_sinusoid_tasks(
            self.num_tasks[key], generator=seeded_generator(self.seed, key), **self.sampler_kwargs
        )

    def train_dataloader(self) -> DataLoader:
        """Fresh tasks every batch; a run resumed from any checkpoint (mid-epoch, with workers,
        under DDP) continues with the batch the interrupted run would have drawn next."""
        rank, world_size = _rank_and_world_size()
        batches = SinusoidBatches(
            self.sampler_kwargs,
            self.meta_batch_size,
            self.batches_per_epoch,
            self.seed,
            rank,
            world_size,
        )
        return ResumableLoader(
            batches,
            batch_size=None,
            sampler=BatchOrder(batches),
            num_workers=self.num_workers,
            trainer_fn=lambda: self.trainer,
        )

    def predict_dataloader(self) -> DataLoader:
        """The test split's episodes, for ``trainer.predict`` (``lightning-maml predict``)."""
        return self.test_dataloader()

    def _fixed_loader(self, split: str) -> DataLoader:
        return DataLoader(TaskSet(self.fixed_tasks(split)), batch_size=self.meta_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")
