"""Few-shot episodes from the datasets a Lightning project already has."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_maml.datamodules.episodic import EpisodicDataModule, EpisodicDataset

SPLITS = ("train", "val", "test")


def read_labels(dataset: Dataset, label_key: Any = None) -> np.ndarray:
    """The integer class label of every sample of a map-style dataset: its ``targets`` attribute
    where it has one (torchvision's convention), else one pass reading ``dataset[i][1]``
    (``dataset[i][label_key]`` with ``label_key``, e.g. the key of mapping samples).

    Raises:
        ValueError: if a label is not an integer (naming the sample) or a sample is no
            ``(input, label, ...)`` tuple.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> read_labels(TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))).tolist()
        [0, 1, 1, 0]
    """
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return _integer_labels(list(targets), "`dataset.targets`")
    labels = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if label_key is not None:
            try:
                labels.append(sample[label_key])
            except (KeyError, IndexError, TypeError):
                keys = list(sample) if isinstance(sample, Mapping) else type(sample).__name__
                raise ValueError(
                    f"sample {i} of {type(dataset).__name__} has no label at "
                    f"label_key={label_key!r} (it holds {keys})"
                ) from None
            continue
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise ValueError(
                f"sample {i} of {type(dataset).__name__} is not an (input, label) pair "
                f"(got {type(sample).__name__}); pass `labels` to give the labels, or "
                "`label_key` (and `input_key`) to say where a sample holds them"
            )
        labels.append(sample[1])
    return _integer_labels(labels, f"the labels of {type(dataset).__name__}")


def _shares(fractions: Sequence[float], n: int) -> list[int]:
    """Counts of ``n`` items in proportion to ``fractions`` (largest remainders): all ``n`` where
    the fractions sum to 1, so no class is left out by rounding.

    Example::

        >>> _shares((0.6, 0.2, 0.2), 7), _shares((0.5, 0.5, 0.0), 5), _shares((0.5, 0.2, 0), 10)
        ([4, 2, 1], [3, 2, 0], [5, 2, 0])
    """
    exact = [f * n for f in fractions]
    counts = [int(e) for e in exact]
    total = min(n, int(round(sum(fractions) * n)))
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: max(0, total - sum(counts))]:
        counts[i] += 1
    return counts


def _integer_labels(values: Sequence[Any], what: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
                raise ValueError(f"{what} must be integer class labels; item {i} is {value!r}")
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{what} must be integer class labels; item {i} is {value!r}")
        out[i] = int(value)
    return out


class FewShotDataModule(EpisodicDataModule):
    """N-way K-shot episodes from map-style datasets of ``(input, label)`` samples, read lazily.

    Give either one ``dataset``, split here between meta-training, validation and test the way
    few-shot benchmarks do (disjoint classes; with ``groups``, disjoint groups), or the ``train``
    / ``val`` / ``test`` datasets a project already has (:meth:`from_datamodule` takes them from a
    ``LightningDataModule``), whose classes (or groups) must not overlap.

    Samples are read through the dataset's own ``__getitem__`` when an episode is drawn, in the
    DataLoader's workers (its transforms and file loading run there); nothing is loaded up front
    and an episode reads each of its samples once. Labels are read once, in ``setup`` (from
    ``labels``, a ``targets`` attribute, or one pass over the dataset). A task is the whole split
    (episodes draw ``n_way`` of its classes) or, with ``groups``, one group (e.g. a subject);
    episode labels are ``0..n_way-1`` in drawn order. Training draws fresh, seeded episodes every
    epoch (different ones on each DDP rank) and resumes mid-epoch from checkpoints; validation
    and test use fixed episode sets.

    A validation or test loader (``val_dataloader``, ``test_dataloader``) exists only for a split
    that has data, as with ``LightningDataModule.from_datasets``: without a validation split
    ``Trainer.fit`` trains without validating, quietly.

    Args:
        dataset: one dataset to split.
        train: the meta-training dataset, instead of ``dataset``.
        val: the validation dataset (may be ``None``), with ``train``.
        test: the test dataset (may be ``None``), with ``train``.
        labels: the integer label of every sample (a sequence for ``dataset``, a mapping split ->
            sequence for ``train``/``val``/``test``), to skip reading them.
        groups: the group of every sample, same form as ``labels``: tasks are groups.
        classes: for ``dataset``, the classes (or with ``groups``, the groups) of each split, a
            mapping split -> list; default: drawn (seeded) with ``fractions``.
        fractions: shares of classes (or groups) for train, val, test (default 0.6, 0.2, 0.2).
        n_way: classes per episode.
        k_shot: support samples per class.
        query_size: query samples per class.
        meta_batch_size: episodes per batch.
        episodes_per_epoch: training episodes per epoch.
        num_eval_episodes: episodes per validation and test split.
        seed: seed of the split and of the episodes.
        num_workers: DataLoader workers (they read the samples).
        input_key: where a sample holds its input: a key of mapping samples
            (``input_key="image"``) or an index of tuples; default: item 0 of ``(input, label)``
            pairs.
        label_key: where a sample holds its label, likewise (default: item 1); read only where
            the labels are neither given nor a ``targets`` attribute.

    Raises:
        ValueError: on counts below 1, both or neither of ``dataset`` and ``train``, labels that
            are not integers, overlapping splits, an empty split (a nonzero fraction that gives
            no class included), or a split with too few samples per class for an episode (naming
            task and class), when ``setup`` runs.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(200, 8), torch.arange(200) % 10)
        >>> dm = FewShotDataModule(data, n_way=3, k_shot=2, query_size=4, meta_batch_size=5,
        ...                        fractions=(0.4, 0.3, 0.3))  # 4, 3 and 3 of the 10 classes
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([5, 6, 8]), torch.Size([5, 12]))
        >>> sorted(dm.split_classes["train"]) != sorted(dm.split_classes["test"])
        True
    """

    def __init__(
        self,
        dataset: Dataset | None = None,
        *,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        labels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        groups: Sequence[Any] | Mapping[str, Sequence[Any]] | None = None,
        classes: Mapping[str, Sequence[Any]] | None = None,
        fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        n_way: int = 5,
        k_shot: int = 1,
        query_size: int = 15,
        meta_batch_size: int = 4,
        episodes_per_epoch: int = 1000,
        num_eval_episodes: int = 100,
        seed: int = 0,
        num_workers: int = 0,
        input_key: Any = None,
        label_key: Any = None,
    ) -> None:
        super().__init__(
            n_way,
            k_shot,
            query_size,
            meta_batch_size,
            episodes_per_epoch,
            num_eval_episodes,
            seed,
            num_workers,
        )
        if (dataset is None) == (train is None):
            raise ValueError(
                "give either `dataset` (split here by class or group) or `train` (with optional "
                f"`val` and `test`), got dataset={type(dataset).__name__ if dataset else None} "
                f"and train={type(train).__name__ if train else None}"
            )
        if dataset is None and classes is not None:
            raise ValueError("`classes` splits `dataset`; with `train`/`val`/`test` leave it out")
        if len(fractions) != 3 or any(f < 0 for f in fractions) or not 0 < sum(fractions) <= 1:
            raise ValueError(
                f"`fractions` must be three shares >= 0 (train, val, test) summing to at most 1, "
                f"got {tuple(fractions)!r}"
            )
        self.dataset, self.datasets = dataset, {"train": train, "val": val, "test": test}
        self.labels, self.groups, self.classes = labels, groups, classes
        self.fractions = tuple(fractions)
        self.input_key, self.label_key = input_key, label_key
        #: per split: (dataset, labels, task ids), set by ``setup``
        self.splits: dict[str, tuple[Dataset, np.ndarray, np.ndarray]] = {}
        #: per split: its classes (or groups, with ``groups``)
        self.split_classes: dict[str, list] = {}
        # a validation or test loader only for a split that has data: Lightning then skips the
        # stage without one (as for LightningDataModule.from_datasets), instead of warning about
        # an empty one
        for split in self.present_splits()[1:]:
            setattr(self, f"{split}_dataloader", getattr(self, f"_{split}_loader"))

    def present_splits(self) -> list[str]:
        """The splits this data module serves, known at construction: ``train`` and the others
        that have a dataset, a nonzero fraction or given classes."""
        if self.dataset is None:
            return [s for s in SPLITS if self.datasets[s] is not None]
        if self.classes is not None:
            return ["train"] + [s for s in SPLITS[1:] if self.classes.get(s)]
        return ["train"] + [s for s, f in zip(SPLITS[1:], self.fractions[1:]) if f > 0]

    @classmethod
    def from_datamodule(
        cls, datamodule: pl.LightningDataModule, **kwargs: Any
    ) -> FewShotDataModule:
        """Episodes from the datasets behind an existing DataModule's loaders (its
        ``prepare_data`` and ``setup`` run first; a split whose loader it does not define is
        left out). ``kwargs`` are this class's other arguments."""
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.setup("test")
        datasets = {}
        for split in SPLITS:
            hook = f"{split}_dataloader"
            defined = is_overridden(hook, datamodule)
            datasets[split] = getattr(datamodule, hook)().dataset if defined else None
        return cls(**datasets, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.dataset is not None:
            self._split_one_dataset()
        else:
            self._take_given_datasets()
        self._check_episodes()

    def _per_split(self, value: Any, split: str, dataset: Dataset, what: str) -> np.ndarray | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(
                f"with `train`/`val`/`test`, `{what}` must be a mapping split -> sequence"
            )
        if split not in value:
            raise ValueError(f"`{what}` has no entry for split {split!r}")
        return self._check_length(value[split], dataset, f"`{what}[{split!r}]`")

    @staticmethod
    def _check_length(values: Sequence[Any], dataset: Dataset, what: str) -> np.ndarray:
        array = np.asarray(values)
        if len(array) != len(dataset):
            raise ValueError(f"{what} has {len(array)} entries for {len(dataset)} samples")
        return array

    def _split_one_dataset(self) -> None:
        dataset = self.dataset
        if self.labels is None:
            labels = read_labels(dataset, self.label_key)
        else:
            labels = _integer_labels(
                list(self._check_length(self.labels, dataset, "`labels`")), "`labels`"
            )
        groups = None
        if self.groups is not None:
            groups = self._check_length(self.groups, dataset, "`groups`")
        keys = labels if groups is None else groups
        available = sorted(set(keys.tolist()))
        if self.classes is not None:
            chosen = {s: list(self.classes.get(s, [])) for s in SPLITS}
            unknown = {s: sorted(set(c) - set(available)) for s, c in chosen.items()}
            unknown = {s: c for s, c in unknown.items() if c}
            if unknown:
                raise ValueError(f"`classes` names values not in the data: {unknown}")
        else:
            order = np.random.default_rng(self.seed).permutation(len(available))
            shuffled = [available[i] for i in order]
            counts = _shares(self.fractions, len(available))
            empty = [s for s, f, c in zip(SPLITS, self.fractions, counts) if f > 0 and c == 0]
            if empty:
                raise ValueError(
                    f"`fractions` {self.fractions} of the {len(available)} classes (or groups) "
                    f"leave the {' and '.join(empty)} split(s) empty: a larger share, or 0 for "
                    "no such split"
                )
            chosen, start = {}, 0
            for split, count in zip(SPLITS, counts):
                chosen[split], start = shuffled[start : start + count], start + count
        self._check_disjoint(chosen, "groups" if groups is not None else "classes")
        for split in SPLITS:
            if not chosen[split]:
                continue
            index = np.flatnonzero(np.isin(keys, chosen[split]))
            tasks = np.zeros(len(index), dtype=np.int64) if groups is None else groups[index]
            self.splits[split] = (Subset(dataset, index.tolist()), labels[index], tasks)
            self.split_classes[split] = list(chosen[split])
        if "train" not in self.splits:
            raise ValueError(f"no classes (or groups) left for meta-training: {chosen}")

    def _take_given_datasets(self) -> None:
        for split, dataset in self.datasets.items():
            if dataset is None:
                continue
            given = self._per_split(self.labels, split, dataset, "labels")
            labels = (
                read_labels(dataset, self.label_key)
                if given is None
                else _integer_labels(list(given), f"`labels[{split!r}]`")
            )
            groups = self._per_split(self.groups, split, dataset, "groups")
            tasks = np.zeros(len(labels), dtype=np.int64) if groups is None else groups
            self.splits[split] = (dataset, labels, tasks)
            keys = labels if groups is None else groups
            self.split_classes[split] = sorted(set(keys.tolist()))
        self._check_disjoint(self.split_classes, "groups" if self.groups is not None else "classes")

    @staticmethod
    def _check_disjoint(chosen: Mapping[str, Sequence[Any]], what: str) -> None:
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1 :]:
                shared = sorted(set(chosen.get(a) or []) & set(chosen.get(b) or []))
                if shared:
                    raise ValueError(
                        f"the {a} and {b} splits share {what} {shared}: few-shot evaluation "
                        f"needs {what} unseen in meta-training"
                    )

    def _check_episodes(self) -> None:
        if self.groups is None:  # a split is one task: it needs n_way classes
            counts = {split: len(self.split_classes[split]) for split in self.splits}
            short = {split: n for split, n in counts.items() if n < self.n_way}
            if short:
                split, n = next(iter(short.items()))
                origin = (
                    f"`fractions` {self.fractions} of the {sum(counts.values())} classes give "
                    if self.dataset is not None and self.classes is None
                    else "the splits have "
                )
                raise ValueError(
                    f"the {split} split has {n} classes, fewer than n_way={self.n_way}: {origin}"
                    + ", ".join(f"{s} {c}" for s, c in counts.items())
                    + ". Choose `fractions` (or `classes`) that give every split at least n_way "
                    "classes, e.g. fractions=(0.5, 0.25, 0.25) for 20 classes and n_way=5, or a "
                    "smaller n_way"
                )
        for split in self.splits:  # raises naming the task and class short of samples
            self.episodes(split, 1)

    def episodes(self, split: str, num_episodes: int | None = None) -> EpisodicDataset:
        """The episode set of ``"train"``, ``"val"`` or ``"test"`` (after ``setup``)."""
        if split not in self.splits:
            raise ValueError(f"split {split!r} has no data; splits: {sorted(self.splits)}")
        dataset, labels, tasks = self.splits[split]
        default = self.episodes_per_epoch if split == "train" else self.num_eval_episodes
        try:
            return EpisodicDataset(
                dataset,
                torch.as_tensor(labels),
                tasks,
                self.n_way,
                self.k_shot,
                self.query_size,
                num_episodes=default if num_episodes is None else num_episodes,
                relabel=True,
                seed=self.seed * 3 + SPLITS.index(split),
                input_key=self.input_key,
            )
        except ValueError as error:
            raise ValueError(f"{split} split: {error}") from None

    def _val_loader(self) -> DataLoader:
        return self._fixed_loader("val", self.num_workers)

    def _test_loader(self) -> DataLoader:
        return self._fixed_loader("test", self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The test split's episodes, for ``trainer.predict``."""
        if "test" not in self.present_splits():
            raise ValueError(
                "this FewShotDataModule has no test split to predict on: give `test`, a test "
                "fraction above 0, or test classes"
            )
        return self._test_loader()
