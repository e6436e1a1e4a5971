"""Episodes, folds and the study's run loop: which trials each method is given and which it is
scored on, the selection of settings on subjects apart from those scored, and the stored
results that let a killed study continue."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from lightning_maml.study.results import StudyResult

if TYPE_CHECKING:
    from lightning_maml.datamodules import MOABBDataModule
    from lightning_maml.study.methods import CalibrationMethod

#: bump when what a stored (fold, method) holds changes meaning
STORE_FORMAT = 1


def calibration_episodes(
    labels: np.ndarray | Sequence, k: int, episodes: int, seed: int | Sequence[int] = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``episodes`` splits of one subject's trials into a support set of ``k`` trials per class
    and a query set of ``q`` other trials per class, ``q`` the smallest class's count minus ``k``
    (the same in every episode, so every episode weighs each class alike). Positions index
    ``labels``; the draw depends only on ``seed`` (the study seeds it with its seed, the subject
    and ``k``, so every method sees the same episodes).

    Raises:
        ValueError: if ``k`` or ``episodes`` is below 1, or ``k`` leaves no query trial.

    Example::

        >>> support, query = calibration_episodes([0, 1] * 5, k=2, episodes=1)[0]
        >>> len(support), len(query)
        (4, 6)
        >>> sorted(set(support) | set(query)) == list(range(10))
        True
    """
    y = np.asarray(labels)
    if k < 1 or episodes < 1:
        raise ValueError(f"`k` and `episodes` must be >= 1, got k={k}, episodes={episodes}")
    classes = sorted(set(y.tolist()))
    q = min(int((y == c).sum()) for c in classes) - k
    if q < 1:
        raise ValueError(
            f"k={k} leaves no query trial: the smallest class has {q + k} trials ({classes})"
        )
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        support, query = [], []
        for c in classes:
            order = rng.permutation(np.flatnonzero(y == c))
            support.append(order[:k])
            query.append(order[k : k + q])
        out.append((np.concatenate(support), np.concatenate(query)))
    return out


def subject_folds(
    test_subjects: Sequence[int],
    subjects: Sequence[int],
    folds: int | str = "loso",
    train_subjects: Sequence[int] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """``(test subjects, training subjects)`` of each fold: ``"loso"``, one test subject at a
    time, trained on every other of ``subjects``; an integer ``n``, the test subjects in ``n``
    consecutive groups (sizes differing by at most one), each trained on the ``subjects`` outside
    its group; with ``train_subjects``, one fold: every test subject, trained on those.

    Raises:
        ValueError: on an unknown ``folds``, more folds than test subjects, or a training set that
            holds a test subject of its fold or is empty.

    Example::

        >>> subject_folds([1, 2, 3, 4, 5], range(1, 6), folds=2)
        [([1, 2, 3], [4, 5]), ([4, 5], [1, 2, 3])]
    """
    test, pool = list(test_subjects), list(subjects)
    if train_subjects is not None:
        groups = [test]
    elif folds == "loso":
        groups = [[s] for s in test]
    elif isinstance(folds, int) and not isinstance(folds, bool) and 1 <= folds <= len(test):
        groups = [list(g) for g in np.array_split(np.asarray(test), folds)]
        groups = [[int(s) for s in g] for g in groups]
    else:
        raise ValueError(
            f"`folds` must be 'loso' or a number of folds from 1 to the {len(test)} test "
            f"subjects, got {folds!r}"
        )
    out = []
    for group in groups:
        train = list(train_subjects) if train_subjects is not None else [
            s for s in pool if s not in group
        ]  # fmt: skip
        if not train or set(train) & set(group):
            raise ValueError(
                f"fold with test subjects {group}: training subjects {train} must be non-empty "
                "and hold none of them"
            )
        out.append((group, train))
    return out


class Fold:
    """One fold of a :class:`CalibrationStudy`: its test and training subjects, their trials, and
    what methods fitted on it (kept while the fold is scored).

    Attributes:
        test: the subjects scored.
        train: the subjects methods are fitted on.
        study: the study the fold belongs to.
        cache: per-fold values methods share (fitted states, predictions, data modules).
    """

    def __init__(self, study: CalibrationStudy, test: list[int], train: list[int]) -> None:
        self.study, self.test, self.train = study, list(test), list(train)
        self.cache: dict[Any, Any] = {}

    @property
    def classes(self) -> list[str]:
        """The study's class names; probability columns follow this order."""
        return self.study.classes

    def trials(self, subject: int) -> tuple[np.ndarray, np.ndarray]:
        """A subject's trials as the paradigm cuts them (``[n, channels, samples]``, float32) and
        their string labels."""
        return self.study.trials(subject)

    def labels(self, subject: int) -> np.ndarray:
        """A subject's labels as positions in :attr:`classes`."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([index[c] for c in self.trials(subject)[1]])

    def training_trials(self) -> tuple[np.ndarray, np.ndarray]:
        """Every training subject's trials (float64) and string labels, concatenated."""
        if "training trials" not in self.cache:
            parts = [self.trials(s) for s in self.train]
            self.cache["training trials"] = (
                np.concatenate([x.astype(np.float64) for x, _ in parts]),
                np.concatenate([y for _, y in parts]),
            )
        return self.cache["training trials"]

    def data_module(self, **episode_settings: Any) -> MOABBDataModule:
        """A :class:`~lightning_maml.datamodules.MOABBDataModule` of the training subjects, set up
        for fitting (episodes of ``episode_settings``: ``k_shot``, ``query_size``,
        ``meta_batch_size``, ``episodes_per_epoch``, ``alignment``), built once per setting."""
        key = ("data module", tuple(sorted(episode_settings.items())))
        if key not in self.cache:
            from lightning_maml.datamodules import MOABBDataModule

            data = MOABBDataModule(
                self.study.dataset,
                self.study.paradigm,
                train_subjects=self.train,
                val_subjects=[],
                test_subjects=self.test,
                n_way=len(self.classes),
                classes=self.classes,
                cache_dir=self.study.cache_dir,
                seed=self.study.seed,
                **{**self.study.data_options, **episode_settings},
            )
            data.prepare_data()
            data.setup("fit")
            self.cache[key] = data
        return self.cache[key]

    def fit(self, method: CalibrationMethod) -> Any:
        """``method`` fitted on this fold (once: methods described alike share the fit)."""
        key = ("state", method.fit_key())
        if key not in self.cache:
            self.cache[key] = method.fit(self)
        return self.cache[key]

    def predict(
        self, method: CalibrationMethod, subject: int, support: np.ndarray, query: np.ndarray
    ) -> np.ndarray:
        """``method``'s class probabilities of the ``query`` trials of ``subject`` given its
        labelled ``support`` trials (``[len(query), classes]``), computed once per episode."""
        key = ("probabilities", method.key(), subject, support.tobytes(), query.tobytes())
        if key not in self.cache:
            state = self.fit(method)
            p = np.asarray(method.predict_proba(state, self, subject, support, query), float)
            if p.shape != (len(query), len(self.classes)):
                raise ValueError(
                    f"{method.name}: predict_proba gave shape {p.shape}, expected "
                    f"{(len(query), len(self.classes))} (query trials x classes)"
                )
            self.cache[key] = p
        return self.cache[key]


class Selection(NamedTuple):
    """What :meth:`CalibrationStudy.select` chose: per name, the best candidate; the score of
    every candidate (its mean query accuracy at the scored K); the rows they were scored on."""

    chosen: dict[str, CalibrationMethod]
    scores: dict[str, list[float]]
    result: StudyResult


class CalibrationStudy:
    """Few-shot calibration of new subjects of a MOABB dataset (see :mod:`lightning_maml.study`).

    Args:
        dataset: a MOABB dataset (or its name).
        paradigm: a MOABB paradigm (or its name) that cuts the trials.
        subjects: every subject a fold may train or test on.
        k_shots: labelled trials per class of a test subject (the support set).
        episodes: episodes per test subject and K; every method is given the same ones.
        seed: seed of the episodes and of the networks' training.
        classes: class names, in the order of the probability columns (default: every label of
            the subjects, sorted).
        store: folder for the stored results (``None``: nothing stored).
        cache_dir: where the cut trials are cached (as :class:`MOABBDataModule`).
        data_options: further :class:`~lightning_maml.datamodules.MOABBDataModule` arguments
            for the networks' data (``standardize``, ``dataset_attributes``, ...).
        progress: show a progress bar in a terminal.

    Raises:
        ValueError: on an empty ``subjects``, a ``k_shots`` entry or ``episodes`` below 1.
    """

    def __init__(
        self,
        dataset: Any,
        paradigm: Any,
        subjects: Iterable[int],
        *,
        k_shots: Sequence[int] = (1, 5, 10),
        episodes: int = 10,
        seed: int = 0,
        classes: Sequence[str] | None = None,
        store: str | os.PathLike | None = None,
        cache_dir: str | None = "default",
        data_options: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.subjects = [int(s) for s in subjects]
        self.k_shots = [int(k) for k in k_shots]
        if not self.subjects:
            raise ValueError("`subjects` must name at least one subject")
        if not self.k_shots or min(self.k_shots) < 1 or episodes < 1:
            raise ValueError(
                f"`k_shots` entries and `episodes` must be >= 1, got k_shots={list(k_shots)}, "
                f"episodes={episodes}"
            )
        self.episodes, self.seed = int(episodes), int(seed)
        self.data_options = dict(data_options or {})
        self.store = Path(store) if store is not None else None
        self.cache_dir, self.progress = cache_dir, progress
        from lightning_maml.datamodules import MOABBDataModule

        self._loader = MOABBDataModule(
            dataset, paradigm, train_subjects=self.subjects, val_subjects=[], test_subjects=[],
            cache_dir=cache_dir, classes=classes,
            dataset_attributes=self.data_options.get("dataset_attributes"),
        )  # fmt: skip
        self.dataset, self.paradigm = self._loader.dataset, self._loader.paradigm
        self._classes = [str(c) for c in classes] if classes is not None else None
        self._trials: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        #: values shared across folds (a subject's covariances do not depend on the fold)
        self.shared: dict[Any, Any] = {}

    # ---- data --------------------------------------------------------------------------------

    def trials(self, subject: int) -> tuple[np.ndarray, np.ndarray]:
        """One subject's trials (float32, as the paradigm cuts them) and string labels."""
        if subject not in self._trials:
            x, y = self._loader.load_subject(subject)
            self._trials[subject] = (x, np.asarray([str(v) for v in y]))
        return self._trials[subject]

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            labels = {c for s in self.subjects for c in self.trials(s)[1]}
            self._classes = sorted(labels)
        return self._classes

    def describe(self) -> dict:
        """What shapes every result of this study (a stored result's key holds it)."""
        from lightning_maml.datamodules.moabb import _describe

        return {
            "dataset": _describe(self.dataset),
            "paradigm": _describe(self.paradigm),
            "episodes": self.episodes,
            "seed": self.seed,
            "classes": self.classes,
            "data_options": json.loads(json.dumps(self.data_options, default=repr)),
        }

    # ---- running -----------------------------------------------------------------------------

    def folds(
        self,
        test_subjects: Sequence[int] | None = None,
        folds: int | str = "loso",
        train_subjects: Sequence[int] | None = None,
    ) -> list[Fold]:
        """The folds of :func:`subject_folds` (default test subjects: all of ``subjects``).

        Raises:
            ValueError: on a test or training subject outside ``subjects``.
        """
        test = self.subjects if test_subjects is None else [int(s) for s in test_subjects]
        for name, given in (("test_subjects", test), ("train_subjects", train_subjects or [])):
            outside = sorted(set(given) - set(self.subjects))
            if outside:
                raise ValueError(f"`{name}` {outside} are not among the study's subjects")
        return [Fold(self, t, tr) for t, tr in subject_folds(test, self.subjects, folds,
                                                              train_subjects)]  # fmt: skip

    def run(
        self,
        methods: Sequence[CalibrationMethod],
        test_subjects: Sequence[int] | None = None,
        folds: int | str = "loso",
        train_subjects: Sequence[int] | None = None,
        stage: str = "test",
        workers: int = 1,
        worker_setup: Callable[[], object] | None = None,
    ) -> StudyResult:
        """Every method on every fold: rows ``{method, K, subject, accuracies, ...}``, each
        (fold, method) read from the store where a result with the same key exists, else computed
        (and stored). ``stage`` only labels the progress bar.

        ``workers > 1`` scores that many folds at once, each in a process of its own (started
        with ``spawn``, with this process's number of torch threads; ``worker_setup``, if given,
        is called there first, e.g. to quiet logging); their results reach this process through
        the store, so it needs one, and the methods must pickle (networks built by module-level
        functions, not lambdas). The rows are the same as with one process.

        Raises:
            ValueError: on two methods of one name; ``workers > 1`` without a store or with
                methods that do not pickle.
        """
        names = [m.name for m in methods]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"methods {twice} come more than once: give each its own name")
        if workers < 1:
            raise ValueError(f"`workers` must be >= 1, got {workers}")
        fold_list = self.folds(test_subjects, folds, train_subjects)
        from tqdm import tqdm

        bar = tqdm(total=len(fold_list) * len(methods), desc=stage,
                   disable=None if self.progress else True)  # fmt: skip
        if workers > 1:
            self._run_in_workers(fold_list, methods, workers, worker_setup, bar)
        rows: list[dict] = []
        seconds: dict[str, float] = {}
        for fold in fold_list:
            for method in methods:
                bar.set_postfix_str(f"subjects {fold.test}, {method.name}")
                stored = self._stored(fold, method)
                if stored is None:
                    start = time.perf_counter()
                    fold_rows = self._score(fold, method)
                    took = time.perf_counter() - start
                    self._keep(fold, method, fold_rows, took)
                else:
                    fold_rows, took = stored
                seconds[method.name] = seconds.get(method.name, 0.0) + took
                rows += fold_rows
                bar.update()
            fold.cache.clear()  # one fold's networks and data at a time
        bar.close()
        return StudyResult(rows, self.k_shots, seconds=seconds)

    def select(
        self,
        candidates: Mapping[str, Sequence[CalibrationMethod]],
        subjects: Sequence[int],
        folds: int | str = "loso",
        score_k: Sequence[int] | None = None,
        workers: int = 1,
        worker_setup: Callable[[], object] | None = None,
    ) -> Selection:
        """Choose each name's best candidate on ``subjects`` alone (folds within them, each
        training on the others): the highest mean query accuracy at ``score_k`` (default: the
        two largest K). Score the chosen ones on other subjects with :meth:`run`
        (``workers``, ``worker_setup``: as there).

        Raises:
            ValueError: with fewer than 2 subjects, or a name without candidates.
        """
        subjects = [int(s) for s in subjects]
        if len(subjects) < 2:
            raise ValueError(f"selection needs at least 2 subjects, got {subjects}")
        empty = [n for n, c in candidates.items() if not c]
        if empty:
            raise ValueError(f"no candidates for {empty}")
        ks = list(score_k) if score_k is not None else sorted(self.k_shots)[-2:]
        everyone = [m for c in candidates.values() for m in c]
        inner = CalibrationStudy.__new__(CalibrationStudy)
        inner.__dict__.update(self.__dict__)
        inner.subjects = subjects  # folds within the selection subjects
        result = inner.run(everyone, subjects, folds, stage="selection", workers=workers,
                           worker_setup=worker_setup)  # fmt: skip
        chosen, scores = {}, {}
        for name, options in candidates.items():
            scores[name] = [result.mean_accuracy(m.name, ks) for m in options]
            chosen[name] = options[int(np.argmax(scores[name]))]
        return Selection(chosen, scores, result)

    # ---- scoring and storing -----------------------------------------------------------------

    def __getstate__(self) -> dict:
        # what a worker process gets: the settings, not the loaded trials or shared values
        return {**self.__dict__, "_trials": {}, "shared": {}}

    def _run_in_workers(self, fold_list, methods, workers, worker_setup, bar) -> None:
        """Score the folds that are not stored yet in ``workers`` processes, which store them."""
        import multiprocessing
        import pickle
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if self.store is None:
            raise ValueError("workers > 1 keep each fold's results in the store: give `store`")
        try:
            pickle.dumps((list(methods), worker_setup))
        except Exception as error:  # pickle raises several kinds
            raise ValueError(
                "workers > 1 send the methods to other processes, so they must pickle (networks "
                f"built by module-level functions, not lambdas or local functions): {error}"
            ) from error
        todo = [f for f in fold_list if not all(self._path(f, m).exists() for m in methods)]
        if not todo:
            return
        threads = torch.get_num_threads()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            # the store's names are this process's: a function of the main script is
            # ``__main__.f`` here and ``__mp_main__.f`` in a worker
            futures = [
                pool.submit(_score_fold_in_worker, self, f.test, f.train, list(methods),
                            [self._path(f, m) for m in methods], threads, worker_setup)
                for f in todo
            ]  # fmt: skip
            for future in as_completed(futures):
                future.result()  # a worker's error is raised here
                bar.set_postfix_str("folds scored in workers")

    def _score(self, fold: Fold, method: CalibrationMethod) -> list[dict]:
        from lightning_maml.functional import query_correct

        rows = []
        state = fold.fit(method)
        for subject in fold.test:
            y = fold.labels(subject)
            for k in method.k_shots or self.k_shots:
                if k not in self.k_shots:
                    continue
                accuracies = []
                for e, (support, query) in enumerate(
                    calibration_episodes(y, k, self.episodes, seed=[self.seed, subject, k])
                ):
                    p = fold.predict(method, subject, support, query)
                    if not np.isfinite(p).all():
                        warnings.warn(
                            f"{method.name}, subject {subject}, K={k}, episode {e}: non-finite "
                            "class probabilities, scored as wrong",
                            stacklevel=2,
                        )
                    correct = query_correct(torch.as_tensor(p), torch.as_tensor(y[query]))
                    accuracies.append(float(correct.float().mean()))
                rows.append({"method": method.name, "K": k, "subject": subject,
                             "accuracies": accuracies, **method.row_extras(state)})  # fmt: skip
        return rows

    def _path(self, fold: Fold, method: CalibrationMethod) -> Path | None:
        if self.store is None:
            return None
        description = {
            "format": STORE_FORMAT,
            "study": self.describe(),
            "fold": {"test": fold.test, "train": fold.train},
            "method": method.describe(),
            "k_shots": [k for k in self.k_shots if not method.k_shots or k in method.k_shots],
        }
        text = json.dumps(description, sort_keys=True, default=repr)
        return self.store / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"

    def _stored(self, fold: Fold, method: CalibrationMethod) -> tuple[list, float] | None:
        path = self._path(fold, method)
        if path is None or not path.exists():
            return None
        stored = json.loads(path.read_text())
        return stored["rows"], stored.get("seconds", 0.0)

    def _keep(
        self,
        fold: Fold,
        method: CalibrationMethod,
        rows: list,
        seconds: float,
        path: Path | None = None,
    ) -> None:
        path = path or self._path(fold, method)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"fold": {"test": fold.test, "train": fold.train}, "method": method.name,
                  "description": method.describe(), "seconds": seconds, "rows": rows}  # fmt: skip
        # a name of this run's own (concurrent runs may share the folder), renamed whole: a killed
        # run leaves no half-written result
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=path.stem + ".", suffix=".tmp", delete=False
        ) as temporary:
            temporary.write(json.dumps(record, default=repr))
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(temporary.name, 0o666 & ~mask)  # as a plain write would (not 0600)
        os.replace(temporary.name, path)


def _score_fold_in_worker(
    study: CalibrationStudy,
    test: list[int],
    train: list[int],
    methods: list[CalibrationMethod],
    paths: list[Path],
    threads: int,
    setup: Callable[[], object] | None,
) -> None:
    """One fold's methods scored in a worker process and stored at ``paths`` (the main
    process's names for them)."""
    torch.set_num_threads(threads)
    if setup is not None:
        setup()
    fold = Fold(study, test, train)
    for method, path in zip(methods, paths):
        if not path.exists():
            start = time.perf_counter()
            rows = study._score(fold, method)
            study._keep(fold, method, rows, time.perf_counter() - start, path)
