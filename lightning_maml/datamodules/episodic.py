"""N-way K-shot episodes from any labelled data grouped by task (e.g. one task per EEG subject):
trials held in memory as one tensor, or any map-style ``Dataset`` read sample by sample."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_maml._checks import check_count
from lightning_maml.datamodules.resumable import ResumableLoader
from lightning_maml.episode import Episode


class EpisodicDataset(Dataset):
    """Item ``i`` is a seeded N-way K-shot episode drawn from one task's trials.

    For episode ``i`` the task is ``tasks[i % len(tasks)]``; ``n_way`` of its classes are drawn,
    and for each class ``k_shot + query_size`` distinct trials (without replacement inside the
    episode), the first ``k_shot`` for the support set and the rest for the query set, so both sets
    are class-balanced. The draw depends only on ``(seed, epoch, i)``: a dataset with a fixed seed
    is a fixed episode set, and :meth:`set_epoch` (called each epoch through
    :class:`EpisodeSampler`) swaps it for a fresh one.

    Args:
        x: ``[N, *features]`` trials, or any map-style ``Dataset`` of ``N`` samples (each an
            input, a tuple whose first element is the input, or with ``input_key`` a mapping or
            tuple holding it): an episode then reads exactly its samples, each once, through the
            dataset's ``__getitem__`` (in the DataLoader's workers, with the dataset's own
            transforms), and nothing before.
        y: ``[N]`` integer class labels.
        task_ids: ``[N]`` task of each trial (e.g. subject numbers).
        n_way: classes per episode.
        k_shot: support trials per class.
        query_size: query trials per class.
        num_episodes: length of the dataset.
        tasks: the tasks to draw from (default: every task in ``task_ids``, sorted).
        relabel: map the episode's classes to ``0..n_way-1`` in drawn order (default ``True``),
            so the same class takes different labels in different episodes; ``False`` keeps the
            original labels (classes in ascending order).
        seed: seed of the draws.
        input_key: where a sample of a ``Dataset`` holds its input: a key of a mapping sample
            (``{"image": ..., "label": ...}``) or an index of a tuple; default: the first item of
            a tuple or list, else the sample itself.
        transform: a function ``Episode -> Episode`` applied to every episode drawn (e.g.
            :class:`~lightning_maml.datamodules.alignment.SupportAlignment`).

    Raises:
        ValueError: on counts below 1, mismatched lengths, an unknown task, or a task with fewer
            than ``n_way`` classes holding ``k_shot + query_size`` trials (naming task and class);
            when an episode is read, on a mapping sample without ``input_key`` (naming its keys)
            or a sample without ``input_key``.

    Example::

        >>> import torch
        >>> x, y = torch.randn(40, 3), torch.arange(40) % 2
        >>> episodes = EpisodicDataset(x, y, torch.zeros(40), n_way=2, k_shot=5, query_size=3,
        ...                            num_episodes=10)
        >>> episodes[0].support_x.shape, episodes[0].query_y.tolist()
        (torch.Size([10, 3]), [0, 0, 0, 1, 1, 1])
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        task_ids: Tensor | np.ndarray | Sequence,
        n_way: int,
        k_shot: int,
        query_size: int,
        num_episodes: int,
        tasks: Sequence | None = None,
        relabel: bool = True,
        seed: int = 0,
        input_key: Any = None,
        transform: Callable[[Episode], Episode] | None = None,
    ) -> None:
        for name, value in (
            ("n_way", n_way),
            ("k_shot", k_shot),
            ("query_size", query_size),
            ("num_episodes", num_episodes),
        ):
            check_count(value, name)
        task_ids = np.asarray(task_ids)
        y = torch.as_tensor(y)
        if not (len(x) == len(y) == len(task_ids)):
            raise ValueError(
                f"`x`, `y` and `task_ids` must have the same length, got {len(x)}, {len(y)} and "
                f"{len(task_ids)}"
            )
        if not isinstance(x, Tensor) and not isinstance(x, Dataset):
            raise TypeError(f"`x` must be a Tensor or a map-style Dataset, got {type(x).__name__}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"`y` must hold integer class labels, got dtype {y.dtype}")
        self.x, self.y = x, y
        self.n_way, self.k_shot, self.query_size = n_way, k_shot, query_size
        self.num_episodes, self.relabel, self.seed = num_episodes, relabel, seed
        self.input_key, self.transform = input_key, transform
        self.epoch = 0
        present = sorted(set(task_ids.tolist()))
        self.tasks = list(present if tasks is None else tasks)
        if not self.tasks:
            raise ValueError("no task to draw episodes from: `tasks` is empty")
        need = k_shot + query_size
        self.pools: dict = {}
        labels = y.numpy()
        for task in self.tasks:
            if task not in present:
                raise ValueError(f"task {task!r} has no trials; tasks present: {present}")
            in_task = np.flatnonzero(task_ids == task)
            counts = {int(c): in_task[labels[in_task] == c] for c in np.unique(labels[in_task])}
            usable = {c: idx for c, idx in counts.items() if len(idx) >= need}
            if len(usable) < n_way:
                short = {c: len(idx) for c, idx in counts.items() if len(idx) < need}
                raise ValueError(
                    f"task {task!r} has {len(usable)} classes with at least k_shot + query_size = "
                    f"{need} trials, {n_way} needed (n_way); trials per class short of that: "
                    f"{short}"
                )
            self.pools[task] = usable

    def __len__(self) -> int:
        return self.num_episodes

    def set_epoch(self, epoch: int) -> None:
        """Draw the episodes of ``epoch`` from now on (epoch 0 is the initial set)."""
        self.epoch = check_count(epoch, "epoch", minimum=0)

    def __getitem__(self, index: int) -> Episode:
        support_idx, query_idx, support_y, query_y = self._draw(index)
        episode = Episode(
            self._read(support_idx),
            torch.tensor(support_y),
            self._read(query_idx),
            torch.tensor(query_y),
        )
        return episode if self.transform is None else self.transform(episode)

    def trial_indices(self, index: int) -> tuple[Tensor, Tensor]:
        """The positions in ``x`` of episode ``index``'s support and query trials, in the order
        the episode holds them (for scoring saved predictions against your own records).

        Example::

            >>> x, y = torch.randn(40, 3), torch.arange(40) % 4
            >>> episodes = EpisodicDataset(x, y, torch.zeros(40), n_way=2, k_shot=1, query_size=2,
            ...                            num_episodes=5)
            >>> support, query = episodes.trial_indices(0)
            >>> torch.equal(episodes[0].query_x, x[query])
            True
        """
        support_idx, query_idx, _, _ = self._draw(index)
        return support_idx, query_idx

    def task_of(self, index: int) -> Any:
        """The task (e.g. the subject) episode ``index`` is drawn from."""
        return self.tasks[index % len(self.tasks)]

    def _draw(self, index: int) -> tuple[Tensor, Tensor, list[int], list[int]]:
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range({self.num_episodes})")
        key = [self.seed, index] if self.epoch == 0 else [self.seed, index, self.epoch]
        rng = np.random.default_rng(key)
        pool = self.pools[self.task_of(index)]
        classes = rng.choice(sorted(pool), size=self.n_way, replace=False)
        if not self.relabel:
            classes = np.sort(classes)
        support, query, support_y, query_y = [], [], [], []
        for position, c in enumerate(classes):
            picked = rng.choice(pool[c], size=self.k_shot + self.query_size, replace=False)
            label = position if self.relabel else int(c)
            support.append(picked[: self.k_shot])
            query.append(picked[self.k_shot :])
            support_y += [label] * self.k_shot
            query_y += [label] * self.query_size
        return (
            torch.as_tensor(np.concatenate(support)),
            torch.as_tensor(np.concatenate(query)),
            support_y,
            query_y,
        )

    def _read(self, indices: Tensor) -> Tensor:
        if isinstance(self.x, Tensor):
            return self.x[indices]
        inputs = [self._input(self.x[int(i)], int(i)) for i in indices]
        return torch.stack([torch.as_tensor(t) for t in inputs])

    def _input(self, sample: Any, index: int) -> Any:
        what = f"sample {index} of {type(self.x).__name__}"
        if self.input_key is not None:
            try:
                return sample[self.input_key]
            except (KeyError, IndexError, TypeError):
                keys = list(sample) if isinstance(sample, Mapping) else type(sample).__name__
                raise ValueError(
                    f"{what} has no input at input_key={self.input_key!r} (it holds {keys})"
                ) from None
        if isinstance(sample, Mapping):
            raise ValueError(
                f"{what} is a mapping with keys {list(sample)}: pass input_key=<the input's key>"
            )
        return sample[0] if isinstance(sample, (tuple, list)) else sample


class EpisodeSampler(Sampler[int]):
    """Shuffled order over an :class:`EpisodicDataset` whose ``set_epoch`` also gives the dataset
    fresh episodes. Lightning calls ``set_epoch`` on a DataLoader's sampler at the start of every
    training epoch (through DDP's sampler wrapper too), so each epoch meta-trains on new episodes.

    Example::

        >>> import torch
        >>> x, y = torch.randn(40, 3), torch.arange(40) % 2
        >>> episodes = EpisodicDataset(x, y, torch.zeros(40), 2, 5, 3, num_episodes=4)
        >>> sampler = EpisodeSampler(episodes, seed=0)
        >>> loader = torch.utils.data.DataLoader(episodes, batch_size=2, sampler=sampler)
        >>> first = next(iter(loader)).support_x
        >>> sampler.set_epoch(1)
        >>> bool(torch.equal(first, next(iter(loader)).support_x))
        False
    """

    def __init__(self, episodes: EpisodicDataset, seed: int = 0) -> None:
        self.episodes, self.seed, self.epoch = episodes, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.episodes.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.episodes))
        return iter(order.tolist())


class EpisodicDataModule(pl.LightningDataModule):
    """Base of the DataModules that serve an :class:`EpisodicDataset` per split: the episode
    settings, checked once, and the loaders. A subclass defines :meth:`episodes`.

    Training draws fresh episodes every epoch (:class:`EpisodeSampler`) through a
    :class:`~lightning_maml.datamodules.resumable.ResumableLoader`: a run resumed from any
    checkpoint (mid-epoch, with workers, under DDP) continues with the batch the interrupted run
    would have drawn next. Validation and test use fixed episode sets.

    Raises:
        ValueError: if a count is below 1, or ``seed`` or ``num_workers`` below 0.
    """

    def __init__(
        self,
        n_way: int,
        k_shot: int,
        query_size: int,
        meta_batch_size: int,
        episodes_per_epoch: int,
        num_eval_episodes: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_way", n_way),
            ("k_shot", k_shot),
            ("query_size", query_size),
            ("meta_batch_size", meta_batch_size),
            ("episodes_per_epoch", episodes_per_epoch),
            ("num_eval_episodes", num_eval_episodes),
        ):
            check_count(value, name)
        check_count(seed, "seed", minimum=0)
        check_count(num_workers, "num_workers", minimum=0)
        self.n_way, self.k_shot, self.query_size = n_way, k_shot, query_size
        self.meta_batch_size = meta_batch_size
        self.episodes_per_epoch, self.num_eval_episodes = episodes_per_epoch, num_eval_episodes
        self.seed, self.num_workers = seed, num_workers

    def episodes(self, split: str, num_episodes: int | None = None) -> EpisodicDataset:
        """The episode set of ``"train"``, ``"val"`` or ``"test"``."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        episodes = self.episodes("train", self.episodes_per_epoch)
        return ResumableLoader(
            episodes,
            batch_size=self.meta_batch_size,
            sampler=EpisodeSampler(episodes, seed=self.seed),
            num_workers=self.num_workers,
            trainer_fn=lambda: self.trainer,
        )

    def predict_dataloader(self) -> DataLoader:
        """The test split's episodes, for ``trainer.predict`` (``lightning-maml predict``)."""
        return self.test_dataloader()

    def _fixed_loader(self, split: str, num_workers: int = 0) -> DataLoader:
        return DataLoader(
            self.episodes(split), batch_size=self.meta_batch_size, num_workers=num_workers
        )
