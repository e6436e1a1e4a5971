"""EEG episodes through MOABB: a task is a subject, an episode is N-way K-shot trials from it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_maml.datamodules.alignment import SupportAlignment, align, alignment_matrix
from lightning_maml.datamodules.episodic import EpisodicDataModule, EpisodicDataset
from lightning_maml.datamodules.recordings import standardize_trials


def _resolve(value: Any, module_name: str, kwargs: dict | None, argument: str) -> Any:
    # a class name in `module_name`, or a dotted path "package.module.Class"
    if not isinstance(value, str):
        if kwargs:
            raise ValueError(f"`{argument}_kwargs` is only used when `{argument}` is a name")
        return value
    import importlib

    module_name, _, name = value.rpartition(".") if "." in value else (module_name, "", value)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"`{argument}` {value!r}: cannot import {module_name} ({error})") from None
    if not hasattr(module, name):
        raise ValueError(f"`{argument}` {value!r} is not a class of {module_name}")
    return getattr(module, name)(**(kwargs or {}))


def _describe(obj: Any) -> str:
    state = {k: repr(v) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
    return json.dumps([type(obj).__module__, type(obj).__qualname__, state], sort_keys=True)


#: the splits each stage of a Trainer needs (loaded alone where ``classes`` is given)
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                 "predict": ("test",)}  # fmt: skip

#: the ``alignment`` settings of :class:`MOABBDataModule`
ALIGNMENTS: tuple[str, ...] = ("none", "euclidean", "euclidean-transductive")

# bump when what a cache file holds changes meaning
_CACHE_FORMAT = 2


def _download_error(error: BaseException | None) -> bool:
    """Whether ``error``, or one it was raised from, says data could not be fetched (network) or
    found (missing files): the cases where the data folder is the user's next question."""
    kinds: list[type[BaseException]] = [
        ConnectionError,
        TimeoutError,
        FileNotFoundError,
        urllib.error.URLError,
    ]
    try:
        import requests

        kinds.append(requests.exceptions.RequestException)
    except ImportError:
        pass
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, tuple(kinds)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _checksum(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256(f"{x.dtype}{x.shape}{y.dtype}{y.shape}".encode())
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update("\0".join(y.tolist()).encode())
    return digest.hexdigest()


def _write_cache(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write atomically: a temporary file beside ``path``, renamed over it once complete, so a
    process killed while writing leaves no partial file and concurrent writers never collide.
    The file gets the permissions the umask gives new files (a cache folder shared between users
    stays readable by all of them). Raises ``OSError`` where the folder cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as file:
        try:
            np.savez(file, x=x, y=y, sha256=np.array(_checksum(x, y)))
            file.flush()
            os.fsync(file.fileno())
            os.chmod(file.name, 0o666 & ~_umask())  # NamedTemporaryFile makes it 0600
        except BaseException:
            file.close()
            Path(file.name).unlink(missing_ok=True)
            raise
    try:
        os.replace(file.name, path)
    except OSError:
        Path(file.name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The arrays of a cache file, or ``None`` (with a warning naming the file) where it cannot
    be read or does not hold what was written: shapes, dtypes, finite values and checksum."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            x, y, digest = cached["x"], cached["y"], str(cached["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        if x.ndim != 3 or x.dtype != np.float32 or y.ndim != 1 or len(y) != len(x):
            problem = f"malformed (x {x.dtype} {x.shape}, y {y.dtype} {y.shape})"
        elif y.dtype.kind != "U" or not np.isfinite(x).all():
            problem = "malformed (non-string labels or non-finite values)"
        elif _checksum(x, y) != digest:
            problem = "corrupted (its checksum does not match its contents)"
        else:
            return x, y
    warnings.warn(f"cache file {path} is {problem}; rebuilding it", stacklevel=3)
    return None


def _folders(root: Path) -> set[Path]:
    # os.walk reads directory entries' types without a stat per file: cheap before every load
    return {Path(top) / name for top, names, _ in os.walk(root) for name in names}


def _remove_new_empty_folders(root: Path, before: set[Path]) -> None:
    """Remove the folders under ``root`` that a failed download created and left empty."""
    for folder in sorted(_folders(root) - before, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


def mne_data_folder() -> str:
    """The folder MNE downloads datasets to: ``MNE_DATA`` (from the environment or MNE's
    configuration; an empty value is the current folder, as MNE reads it), else ``~/mne_data``."""
    import mne

    value = os.environ.get("MNE_DATA")
    if value is None:
        value = mne.get_config("MNE_DATA")
    if value is None:
        return str(Path.home() / "mne_data")
    return str(Path(value or ".").resolve())


def _dataset_folders() -> dict[str, str]:
    """``MNE_DATASETS_<NAME>_PATH`` settings (environment over MNE's configuration), resolved as
    MNE resolves them (empty: the current folder): where MNE puts each dataset's files."""
    import mne

    settings = {k: v for k, v in (mne.get_config() or {}).items() if _is_dataset_key(k)}
    settings.update({k: v for k, v in os.environ.items() if _is_dataset_key(k)})
    return {k: str(Path(v or ".").resolve()) for k, v in settings.items()}


class _DropMontageNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _MONTAGE_NOTICE not in record.getMessage()


# MOABB's PhysionetMI asks MNE 1.13 for a montage by a name MNE deprecates: nothing a user can do
_MONTAGE_NOTICE = "Montage name 'standard_1005' is deprecated"


@contextmanager
def _quiet_mne() -> Iterator[None]:
    """While MOABB loads a subject: MNE's information lines (one per file and event type) and
    the montage notice MOABB causes are left out; other warnings stay."""
    import mne

    notice = _DropMontageNotice()
    with mne.utils.use_log_level("WARNING"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MONTAGE_NOTICE, category=FutureWarning)
        mne.utils.logger.addFilter(notice)
        try:
            yield
        finally:
            mne.utils.logger.removeFilter(notice)


def _is_dataset_key(key: str) -> bool:
    return key.startswith("MNE_DATASETS_") and key.endswith("_PATH")


class MOABBDataModule(EpisodicDataModule):
    """Few-shot EEG episodes from a MOABB dataset, one task per subject.

    The dataset says what was recorded; the paradigm how to cut it into trials. Data are loaded
    with MOABB's own ``paradigm.get_data`` (downloads, when needed, go to MNE's data folder),
    standardised per subject (each channel to zero mean and unit variance over that subject's
    trials), and cached on disk as ``.npz`` per subject, keyed by every public setting of the
    dataset and the paradigm and by the subject, so a second run skips MNE. Cache files are
    written atomically (safe with several processes filling one folder) and checked on every read
    (shape, dtype, finite values, SHA-256 of the arrays); a bad file is rebuilt with a warning
    naming it. Subjects are split into meta-train, meta-val and
    meta-test sets; episodes are N-way K-shot with class-balanced support and query sets
    (:class:`~lightning_maml.datamodules.episodic.EpisodicDataset`).

    Args:
        dataset: a MOABB dataset instance, a class name in ``moabb.datasets`` or a dotted path to
            a dataset class (e.g.
            ``"lightning_maml.datamodules.synthetic_eeg.SyntheticMotorImagery"``), built with
            ``dataset_kwargs``.
        paradigm: a MOABB paradigm instance, a class name in ``moabb.paradigms`` (default
            ``"MotorImagery"``), built with ``paradigm_kwargs`` (e.g. ``events``, ``fmin``,
            ``fmax``, ``tmin``, ``tmax``, ``resample``).
        train_subjects: the meta-training subjects; any of the three subject lists left ``None``
            is drawn (seeded) from the remaining subjects.
        val_subjects: the validation subjects.
        test_subjects: the test subjects (new subjects, calibrated from their support trials).
        val_fraction: share of the subjects drawn for validation where ``val_subjects`` is
            ``None``.
        test_fraction: likewise for ``test_subjects``.
        n_way: classes per episode.
        k_shot: support trials per class.
        query_size: query trials per class.
        meta_batch_size: episodes (tasks) per batch.
        episodes_per_epoch: training episodes per epoch, drawn afresh every epoch
            (:class:`~lightning_maml.datamodules.episodic.EpisodeSampler`).
        num_eval_episodes: episodes per validation and test split, a fixed set.
        relabel: ``False`` (default) keeps class indices (label ``j`` is ``classes[j]`` in every
            episode, so a network has one output per class); ``True`` maps each episode's classes
            to ``0..n_way-1`` in random order, so a class takes different labels in different
            episodes.
        standardize: ``"subject"`` (default: each channel to zero mean and unit variance over all
            of a subject's trials), ``"trial"`` (over each trial's own samples: no statistics
            shared between trials, so held-out query trials inform nothing else) or ``"none"``.
        alignment: ``"none"`` (default); ``"euclidean"``: Euclidean alignment (He & Wu 2019,
            :mod:`~lightning_maml.datamodules.alignment`, after ``standardize``), each training
            subject by the mean covariance of its own trials, and each episode of a validation or
            test subject by that of the episode's support trials alone (a new subject is
            calibrated from its labelled trials; its query trials inform nothing);
            ``"euclidean-transductive"``: validation and test subjects too by all of their own
            trials (their unlabelled query trials included: transductive, say so wherever it is
            reported).
        cache_dir: where preprocessed arrays go (default ``<MNE data folder>/lightning_maml``).
        seed: seed of the split and the episodes.
        num_workers: DataLoader worker processes.
        dataset_kwargs: arguments of the dataset class when ``dataset`` is a name.
        dataset_attributes: attributes set on the dataset after it is built, for settings a
            MOABB dataset takes as attributes rather than arguments (e.g. ``PhysionetMI``'s
            ``{"hand_runs": [4], "feet_runs": []}`` to load only the runs present offline).
        classes: the class names, in the order of the network's outputs (label ``j`` is
            ``classes[j]``); default: every label of the loaded subjects, sorted, which needs
            every split loaded. Given, ``setup`` loads only the subjects its stage needs
            (``test`` and ``predict``: the test subjects; ``validate``: the validation subjects;
            ``fit``: training and validation), and a label outside them is refused.

    Raises:
        ValueError: on unknown subjects, overlapping splits, an empty split or counts below 1.
        RuntimeError: if a subject's data cannot be loaded, naming the dataset, the subject and
            the error; for a network error or missing files, also the MNE data folder.

    Example::

        >>> import mne
        >>> from moabb.datasets.fake import FakeDataset
        >>> mne.set_log_level("error")
        >>> dataset = FakeDataset(event_list=("left_hand", "right_hand"), n_subjects=4,
        ...                       n_sessions=1, n_runs=1, n_events=40, duration=100, seed=0)
        >>> dm = MOABBDataModule(dataset, "LeftRightImagery", {"resample": 64},
        ...                      train_subjects=[1, 2], val_subjects=[3], test_subjects=[4],
        ...                      n_way=2, k_shot=5, query_size=5, meta_batch_size=2,
        ...                      cache_dir=None)
        >>> dm.prepare_data(); dm.setup("fit")
        >>> next(iter(dm.train_dataloader())).support_x.shape
        torch.Size([2, 10, 3, 192])
    """

    def __init__(
        self,
        dataset: Any,
        paradigm: Any = "MotorImagery",
        paradigm_kwargs: dict | None = None,
        train_subjects: Sequence[int] | None = None,
        val_subjects: Sequence[int] | None = None,
        test_subjects: Sequence[int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        n_way: int = 2,
        k_shot: int = 5,
        query_size: int = 5,
        meta_batch_size: int = 4,
        episodes_per_epoch: int = 200,
        num_eval_episodes: int = 100,
        relabel: bool = False,
        standardize: str = "subject",
        alignment: Literal["none", "euclidean", "euclidean-transductive"] = "none",
        cache_dir: str | None = "default",
        seed: int = 0,
        num_workers: int = 0,
        dataset_kwargs: dict | None = None,
        dataset_attributes: dict | None = None,
        classes: Sequence[str] | None = None,
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
        if standardize not in ("subject", "trial", "none"):
            raise ValueError(
                f"`standardize` must be 'subject', 'trial' or 'none', got {standardize!r}"
            )
        self.dataset = _resolve(dataset, "moabb.datasets", dataset_kwargs, "dataset")
        for name, value in (dataset_attributes or {}).items():
            if not hasattr(self.dataset, name):
                raise ValueError(
                    f"`dataset_attributes` names {name!r}, which "
                    f"{type(self.dataset).__name__} does not have"
                )
            setattr(self.dataset, name, value)
        self.paradigm = _resolve(paradigm, "moabb.paradigms", paradigm_kwargs, "paradigm")
        self._paradigm_key = _describe(self.paradigm)  # before get_data, which sets attributes
        self._dataset_key: str | None = None  # on first use, after the user's own settings
        self.splits = self._split(
            train_subjects, val_subjects, test_subjects, val_fraction, test_fraction, seed
        )
        self.standardize = standardize
        if alignment not in ALIGNMENTS:
            raise ValueError(f"`alignment` must be one of {ALIGNMENTS}, got {alignment!r}")
        self.alignment = alignment
        self.relabel = relabel
        if cache_dir == "default":
            cache_dir = str(Path(mne_data_folder()) / "lightning_maml")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if classes is not None:
            classes = [str(c) for c in classes]
            if not classes or len(set(classes)) != len(classes):
                raise ValueError(f"`classes` must name each class once, got {classes}")
        self._given_classes = classes
        self.classes: list[str] = list(classes or [])
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}

    def _split(self, train, val, test, val_fraction, test_fraction, seed) -> dict[str, list[int]]:
        available = list(self.dataset.subject_list)
        given = {"train": train, "val": val, "test": test}
        for name, subjects in given.items():
            unknown = sorted(set(subjects or []) - set(available))
            if unknown:
                raise ValueError(
                    f"`{name}_subjects` holds subjects {unknown} that {self.dataset.code} does not "
                    f"have; its subjects are {available}"
                )
        taken = [s for subjects in given.values() for s in (subjects or [])]
        if len(taken) != len(set(taken)):
            raise ValueError(f"the subject splits overlap: {given}")
        rest = [s for s in available if s not in taken]
        rng = np.random.default_rng(seed)
        rest = [rest[i] for i in rng.permutation(len(rest))]
        splits = {}
        for name, fraction in (("test", test_fraction), ("val", val_fraction)):
            if given[name] is None:
                n = int(round(fraction * len(available)))
                splits[name], rest = rest[:n], rest[n:]
            else:
                splits[name] = list(given[name])
        splits["train"] = list(given["train"]) if given["train"] is not None else rest
        if not splits["train"]:
            raise ValueError(f"no subjects left for meta-training: {splits}")
        return splits

    def _cache_path(self, subject: int) -> Path | None:
        if self.cache_dir is None:
            return None
        if self._dataset_key is None:  # before any get_data
            self._dataset_key = _describe(self.dataset)
        key = json.dumps([_CACHE_FORMAT, self._dataset_key, self._paradigm_key, subject])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.dataset.code}-subject{subject}-{digest}.npz"

    def load_subject(self, subject: int) -> tuple[np.ndarray, np.ndarray]:
        """Trials ``[n, channels, samples]`` (float32) and string labels of one subject, from the
        cache when present, else through ``paradigm.get_data``."""
        path = self._cache_path(subject)
        if path is not None and path.exists():
            cached = _read_cache(path)
            if cached is not None:
                return cached
        # where MNE may write: the data folder and every dataset's own folder
        roots = {Path(p) for p in (mne_data_folder(), *_dataset_folders().values())}
        folders_before = {root: _folders(root) for root in roots}
        try:
            with _quiet_mne():
                x, y, _ = self.paradigm.get_data(dataset=self.dataset, subjects=[subject])
        except Exception as error:  # MNE/MOABB raise many kinds
            message = (
                f"could not load subject {subject} of {self.dataset.code} through "
                f"{type(self.paradigm).__name__}.get_data ({type(error).__name__}: {error})."
            )
            if not _download_error(error):
                raise RuntimeError(message) from error
            used = sorted(str(r) for r in roots if _folders(r) - folders_before[r])
            for root in roots:
                _remove_new_empty_folders(root, folders_before[root])
            configured = ", ".join(f"{k}={v!r}" for k, v in sorted(_dataset_folders().items()))
            where = (
                f"MNE looked for them in {', '.join(map(repr, used))}"
                if used
                else f"MNE looks for them in the MNE data folder {mne_data_folder()!r}"
                + (f" or the dataset's own ({configured})" if configured else "")
            )
            message += (
                f" Without network access the files must already be where MNE looks: {where}; "
                "set MNE_DATA (and a dataset's MNE_DATASETS_<NAME>_PATH) to the folder holding "
                "them. Offline, MOABB_DOWNLOAD_PROVIDER=upstream also skips MOABB's retries of "
                "its mirror."
            )
            # the message says it all: not the chain of retries and connection errors below it
            raise RuntimeError(message) from None
        x, y = x.astype(np.float32), np.asarray(y).astype(str)
        if path is not None:
            try:
                _write_cache(path, x, y)
            except OSError as error:  # read-only, not ours, full: the data are loaded anyway
                warnings.warn(
                    f"cannot write the cache folder {str(path.parent)!r} "
                    f"({type(error).__name__}: {error}); loading without caching. Pass "
                    "cache_dir=None to load without a cache, or cache_dir=<a writable folder>",
                    stacklevel=2,
                )
                self.cache_dir = None  # no further attempts (prepare_data then loads no more)
        return x, y

    def prepare_data(self) -> None:
        """Fill the cache (downloading through MOABB where needed), rebuilding entries that are
        missing or fail their check; without a cache there is nothing to prepare and ``setup``
        loads the data."""
        for subjects in self.splits.values():
            for subject in subjects:
                if self._cache_path(subject) is not None:
                    self.load_subject(subject)

    def setup(self, stage: str | None = None) -> None:
        needed = list(self.splits)
        if self._given_classes is not None and stage in _STAGE_SPLITS:
            needed = list(_STAGE_SPLITS[stage])
        missing = [split for split in needed if self.splits[split] and split not in self.data]
        if not missing:
            return
        from tqdm import tqdm

        subjects = [s for split in missing for s in self.splits[split]]
        # a bar where a person watches (a terminal): loading through MNE takes seconds a subject
        bar = tqdm(subjects, desc=f"loading {self.dataset.code}", unit="subject", disable=None)
        loaded = {s: self.load_subject(s) for s in bar}
        labels = {label for _, y in loaded.values() for label in y}
        if self._given_classes is None:
            self.classes = sorted(labels)
        elif not labels <= set(self.classes):
            raise ValueError(
                f"the subjects hold labels {sorted(map(str, labels - set(self.classes)))} that "
                f"`classes` {self.classes} does not name"
            )
        index = {c: i for i, c in enumerate(self.classes)}
        for split in missing:
            xs, ys, ids = [], [], []
            for s in self.splits[split]:
                x, y = loaded[s]
                x = torch.as_tensor(standardize_trials(x, self.standardize))
                if self._aligns_whole_subject(split):
                    x = align(x, alignment_matrix(x))
                xs.append(x)
                ys.append(torch.as_tensor([index[c] for c in y]))
                ids.append(np.full(len(y), s))
            self.data[split] = (torch.cat(xs), torch.cat(ys), np.concatenate(ids))

    def episodes(
        self,
        split: str,
        num_episodes: int | None = None,
        seed: int | None = None,
        k_shot: int | None = None,
    ) -> EpisodicDataset:
        """The episode set of ``"train"``, ``"val"`` or ``"test"`` subjects."""
        if split not in self.data:
            raise ValueError(f"split {split!r} has no subjects: {self.splits}")
        x, y, ids = self.data[split]
        offset = {"train": 0, "val": 1, "test": 2}[split]
        return EpisodicDataset(
            x,
            y,
            ids,
            self.n_way,
            self.k_shot if k_shot is None else k_shot,
            self.query_size,
            num_episodes or self.num_eval_episodes,
            relabel=self.relabel,
            seed=self.seed * 3 + offset if seed is None else seed,
            transform=self._episode_transform(split),
        )

    def describe_preprocessing(self) -> dict[str, Any]:
        """How this data module makes trials, as plain values
        (:class:`~lightning_maml.datamodules.recordings.EEGPreprocessing`): a
        :class:`~lightning_maml.MAMLModule` fitted on it keeps this in its checkpoints, so that a
        new person's recordings can be prepared the same way. Reads one subject's epochs through
        the paradigm for the channel names and sampling rate; call after ``setup``.

        Raises:
            ValueError: for a paradigm it cannot reproduce (a filter bank, a baseline).
            RuntimeError: before ``setup``.
        """
        from lightning_maml.datamodules.recordings import EEGPreprocessing

        if not self.data:
            raise RuntimeError("call setup() first: the classes come from the loaded subjects")
        paradigm, dataset = self.paradigm, self.dataset
        filters = getattr(paradigm, "filters", [(None, None)])
        if len(filters) != 1:
            raise ValueError(f"a filter bank ({len(filters)} bands) cannot be described")
        if getattr(paradigm, "baseline", None) is not None:
            raise ValueError(f"a baseline correction ({paradigm.baseline}) cannot be described")
        subject = next(s for split in ("train", "val", "test") for s in self.splits[split])
        with _quiet_mne():
            epochs, _, _ = paradigm.get_data(
                dataset=dataset, subjects=[subject], return_epochs=True
            )
        start = dataset.interval[0]
        tmax = dataset.interval[1] if paradigm.tmax is None else paradigm.tmax + start
        fmin, fmax = filters[0]
        return EEGPreprocessing(
            channels=tuple(epochs.ch_names),
            sampling_rate=float(epochs.info["sfreq"]),
            n_samples=len(epochs.times),
            fmin=None if fmin is None else float(fmin),
            fmax=None if fmax is None else float(fmax),
            tmin=float(paradigm.tmin + start),
            tmax=float(tmax),
            unit_factor=float(getattr(dataset, "unit_factor", 1e6)),
            standardize=self.standardize,
            alignment=self.alignment,
            classes=tuple(self.classes),
        ).as_dict()

    def _aligns_whole_subject(self, split: str) -> bool:
        # by all of a subject's trials: training subjects, and all subjects when transductive
        return self.alignment == "euclidean-transductive" or (
            self.alignment == "euclidean" and split == "train"
        )

    def _episode_transform(self, split: str) -> SupportAlignment | None:
        # a held-out subject's episode, by its support trials alone
        if self.alignment == "euclidean" and split != "train":
            return SupportAlignment()
        return None

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")
