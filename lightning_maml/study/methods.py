"""Ways to calibrate to a new subject, as a :class:`~lightning_maml.study.CalibrationStudy`
scores them: fitted once per fold on the training subjects, then given each episode's labelled
support trials and asked for the class probabilities of the query trials, each classified without
statistics of the other query trials."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_maml.module import MAMLModule
    from lightning_maml.study.protocol import Fold


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _name_of(obj: Any) -> str:
    """A callable's or an object's description for a stored result's key: its module and
    qualified name, and for objects their ``repr``."""
    if hasattr(obj, "__qualname__"):
        module = getattr(obj, "__module__", "")
        # a worker process imports the main script as __mp_main__: the same function
        return f"{'__main__' if module == '__mp_main__' else module}.{obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}: {obj!r}"


class CalibrationMethod:
    """Base of a study's methods. A subclass defines :meth:`fit` (once per fold) and
    :meth:`predict_proba` (once per episode), and :meth:`describe` whatever shapes its results
    (a stored result is reused only for the same description).

    Attributes:
        name: the method's row in the tables.
        k_shots: the K it is scored at (``None``: every K of the study).
    """

    name: str
    k_shots: Sequence[int] | None = None

    def describe(self) -> dict:
        """Everything that shapes the method's results, JSON-able."""
        raise NotImplementedError

    def key(self) -> str:
        """What a fold's predictions are cached under: the class and the description without the
        name (methods of one class described alike share their predictions)."""
        described = {k: v for k, v in self.describe().items() if k != "name"}
        return _json([_name_of(type(self)), described])

    def fit_key(self) -> str:
        """What a fold's fitted state is cached under (default: :meth:`key`)."""
        return self.key()

    def fit(self, fold: Fold) -> Any:
        """What the method learns from the fold's training subjects (its state)."""
        raise NotImplementedError

    def predict_proba(
        self, state: Any, fold: Fold, subject: int, support: np.ndarray, query: np.ndarray
    ) -> np.ndarray:
        """Class probabilities ``[len(query), len(fold.classes)]`` of the ``query`` trials of
        ``subject``, calibrated with its labelled ``support`` trials (positions into
        ``fold.trials(subject)``)."""
        raise NotImplementedError

    def row_extras(self, state: Any) -> dict:
        """Values added to each of the method's rows (e.g. skipped meta-steps)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NetworkMethod(CalibrationMethod):
    """A network meta-trained with :class:`~lightning_maml.MAMLModule` on episodes of the
    training subjects (``inner_steps=0``: trained jointly, without an inner loop;
    ``meta_train=False``: not trained, calibrated from its initialisation, a network from
    scratch), then calibrated to each support set with :meth:`MAMLModule.adapt
    <lightning_maml.MAMLModule.adapt>` (its algorithm's inner rule, ``eval_steps`` steps,
    BatchNorm from the support trials), which classifies each query trial alone.

    The trials are standardised as the study's ``data_options`` say (as the training data are),
    and with ``alignment="euclidean"`` aligned: training subjects by their own trials, a test
    subject's episode by its support trials alone.

    Args:
        name: the method's row.
        network: ``network(n_channels, n_samples, n_classes)`` returns a fresh ``nn.Module``.
        algorithm: the family member (a name or an
            :class:`~lightning_maml.functional.algorithms.Algorithm`).
        inner_lr: as :class:`~lightning_maml.MAMLModule` (the calibration's step size too).
        inner_steps: inner steps in meta-training (0: joint training).
        meta_lr: as :class:`~lightning_maml.MAMLModule`.
        meta_steps: meta-training steps.
        eval_steps: adaptation steps on a support set.
        alignment: ``"none"`` or ``"euclidean"``.
        k_shot: support trials per class of a meta-training episode.
        query_size: query trials per class of a meta-training episode.
        meta_batch_size: episodes per meta-step.
        meta_train: train on the training subjects (``False``: scratch).
        module_options: further :class:`~lightning_maml.MAMLModule` arguments.
        trainer_options: further ``Trainer`` arguments (default: one CPU, no logger,
            checkpoints or progress bar).

    The stored results' key holds ``network``'s module and name, not its code: give the method
    another name (or another store) when you change the function.
    """

    def __init__(
        self,
        name: str,
        network: Callable[[int, int, int], nn.Module],
        *,
        algorithm: Any = "maml",
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        meta_lr: float = 3e-3,
        meta_steps: int = 200,
        eval_steps: int = 10,
        alignment: Literal["none", "euclidean"] = "none",
        k_shot: int = 3,
        query_size: int = 4,
        meta_batch_size: int = 4,
        meta_train: bool = True,
        module_options: Mapping[str, Any] | None = None,
        trainer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if alignment not in ("none", "euclidean"):
            raise ValueError(f"`alignment` must be 'none' or 'euclidean', got {alignment!r}")
        settings = {"meta_steps": meta_steps, "k_shot": k_shot, "query_size": query_size,
                    "meta_batch_size": meta_batch_size}  # fmt: skip
        for arg, value in settings.items():
            if value < 1:
                raise ValueError(f"`{arg}` must be >= 1, got {value}")
        if eval_steps < 0 or inner_steps < 0:
            raise ValueError(f"`eval_steps` and `inner_steps` must be >= 0, got {eval_steps}, "
                             f"{inner_steps}")  # fmt: skip
        self.name, self.network, self.algorithm = name, network, algorithm
        self.inner_lr, self.inner_steps, self.meta_lr = inner_lr, inner_steps, meta_lr
        self.meta_steps, self.eval_steps, self.alignment = meta_steps, eval_steps, alignment
        self.k_shot, self.query_size, self.meta_batch_size = k_shot, query_size, meta_batch_size
        self.meta_train = meta_train
        self.module_options = dict(module_options or {})
        self.trainer_options = dict(trainer_options or {})

    def describe(self) -> dict:
        from lightning_maml.functional.algorithms import describe_algorithm

        algorithm = self.algorithm
        if not isinstance(algorithm, str):
            algorithm = describe_algorithm(algorithm)
        return {
            "type": "NetworkMethod", "name": self.name, "network": _name_of(self.network),
            "algorithm": algorithm, "inner_lr": self.inner_lr, "inner_steps": self.inner_steps,
            "meta_lr": self.meta_lr, "meta_steps": self.meta_steps, "eval_steps": self.eval_steps,
            "alignment": self.alignment, "k_shot": self.k_shot, "query_size": self.query_size,
            "meta_batch_size": self.meta_batch_size, "meta_train": self.meta_train,
            "module_options": {k: repr(v) for k, v in sorted(self.module_options.items())},
            "trainer_options": {k: repr(v) for k, v in sorted(self.trainer_options.items())},
        }  # fmt: skip

    def fit_key(self) -> str:
        """Methods that differ only in their adaptation steps share the trained network."""
        described = {k: v for k, v in self.describe().items() if k not in ("name", "eval_steps")}
        return _json([_name_of(type(self)), described])

    def fit(self, fold: Fold) -> MAMLModule:
        import lightning.pytorch as pl

        from lightning_maml import MAMLModule

        pl.seed_everything(fold.study.seed, verbose=False)
        x, _ = fold.trials(fold.train[0])
        net = self.network(x.shape[1], x.shape[2], len(fold.classes))
        module = MAMLModule(
            net,
            loss="cross_entropy",
            inner_lr=self.inner_lr,
            inner_steps=self.inner_steps,
            algorithm=self.algorithm,
            meta_lr=self.meta_lr,
            **{"on_nonfinite": "skip", **self.module_options},  # counted: skipped_steps
        )
        if self.meta_train:
            data = fold.data_module(
                k_shot=self.k_shot,
                query_size=self.query_size,
                meta_batch_size=self.meta_batch_size,
                episodes_per_epoch=50 * self.meta_batch_size,
                alignment=self.alignment,
            )
            options = {"accelerator": "cpu", "devices": 1, "max_steps": self.meta_steps,
                       "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                       "enable_model_summary": False, "enable_progress_bar": False,
                       **self.trainer_options}  # fmt: skip
            pl.Trainer(**options).fit(module, data)
        return module.cpu().eval()

    def _trials(self, fold: Fold, subject: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The subject's trials standardised as the networks' training data are."""
        key = ("network trials", subject)
        if key not in fold.cache:
            from lightning_maml.datamodules.recordings import standardize_trials

            how = fold.study.data_options.get("standardize", "subject")
            x = torch.as_tensor(standardize_trials(fold.trials(subject)[0], how))
            fold.cache[key] = x, torch.as_tensor(fold.labels(subject))
        return fold.cache[key]

    def predict_proba(self, state, fold, subject, support, query) -> np.ndarray:
        from lightning_maml.datamodules.alignment import align, alignment_matrix

        x, y = self._trials(fold, subject)
        support_x, query_x = x[support], x[query]
        if self.alignment == "euclidean":  # by the support trials alone
            matrix = alignment_matrix(support_x)
            support_x, query_x = align(support_x, matrix), align(query_x, matrix)
        try:
            calibrated = state.adapt(support_x, y[support], steps=self.eval_steps)
        except ValueError as error:
            if "diverged" not in str(error):
                raise
            warnings.warn(f"{self.name}, subject {subject}: {error}; scored as wrong",
                          stacklevel=2)  # fmt: skip
            return np.full((len(query), len(fold.classes)), np.nan)
        with torch.no_grad():
            return torch.softmax(calibrated(query_x), dim=1).double().numpy()

    def row_extras(self, state: MAMLModule) -> dict:
        return {"skipped_steps": int(state.nonfinite_steps)}


def _columns(model: Any, fold: Fold, probabilities: np.ndarray) -> np.ndarray:
    """A scikit-learn model's probabilities with columns in ``fold.classes`` order (a class it
    never saw gets 0)."""
    out = np.zeros((len(probabilities), len(fold.classes)))
    for j, c in enumerate(model.classes_):
        out[:, fold.classes.index(str(c))] = probabilities[:, j]
    return out


class PipelineMethod(CalibrationMethod):
    """Any scikit-learn classifier of trials (``[n, channels, samples]``, float64, string
    labels), e.g. ``make_pipeline(CSP(...), LinearDiscriminantAnalysis())``: fitted on the
    training subjects' trials and, with ``calibrate``, refitted for each episode with the support
    trials added; otherwise fitted once (zero-shot).

    Args:
        name: the method's row.
        pipeline: an unfitted scikit-learn estimator with ``predict_proba`` (cloned for each fit).
        calibrate: refit with each support set.
    """

    def __init__(self, name: str, pipeline: Any, calibrate: bool = True) -> None:
        self.name, self.pipeline, self.calibrate = name, pipeline, calibrate

    def describe(self) -> dict:
        return {"type": "PipelineMethod", "name": self.name, "pipeline": repr(self.pipeline),
                "calibrate": self.calibrate}  # fmt: skip

    def fit(self, fold: Fold) -> Any:
        from sklearn.base import clone

        x, y = fold.training_trials()
        return None if self.calibrate else clone(self.pipeline).fit(x, y)

    def predict_proba(self, state, fold, subject, support, query) -> np.ndarray:
        from sklearn.base import clone

        x, labels = fold.trials(subject)
        x = x.astype(np.float64)
        model = state
        if self.calibrate:
            train_x, train_y = fold.training_trials()
            model = clone(self.pipeline).fit(
                np.concatenate([train_x, x[support]]), np.concatenate([train_y, labels[support]])
            )
        return _columns(model, fold, model.predict_proba(x[query]))


def _covariances(fold: Fold, subject: int, estimator: str) -> np.ndarray:
    """A subject's trial covariances, computed once per study (they do not depend on the fold)."""
    key = ("covariances", subject, estimator)
    if key not in fold.study.shared:
        from pyriemann.estimation import Covariances

        x = fold.trials(subject)[0].astype(np.float64)
        fold.study.shared[key] = Covariances(estimator=estimator).transform(x)
    return fold.study.shared[key]


def recentred(covariances: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Covariances recentred by the Riemannian mean ``M`` of ``reference``: ``M^-1/2 C M^-1/2``
    (Zanini et al. 2018)."""
    from pyriemann.geometry.base import invsqrtm
    from pyriemann.geometry.mean import mean_riemann

    whitening = invsqrtm(mean_riemann(reference))
    return whitening @ covariances @ whitening


def tangent_space_lr() -> Any:
    """Tangent space (Riemannian) + logistic regression, the classifier of the Riemannian
    pipelines here."""
    from pyriemann.tangentspace import TangentSpace
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TangentSpace(metric="riemann"), LogisticRegression(max_iter=1000))


class RecentredTangentSpace(CalibrationMethod):
    """The recentred tangent-space pipeline: trial covariances (``estimator``), each training
    subject recentred to the identity by its own Riemannian mean, tangent space + logistic
    regression. ``mode``: ``"calibrated"`` (default, "+ K"): the new subject recentred by its
    support trials and the classifier refitted with them added; ``"zero-shot"``: neither;
    ``"transductive"``: zero-shot, the new subject recentred by all of its trials, the query
    trials included (not a calibration: it uses the trials to be classified).
    """

    _NAMES = {"calibrated": "TS+LR + K", "zero-shot": "TS+LR zero-shot",
              "transductive": "TS+LR zero-shot (transductive)"}  # fmt: skip

    def __init__(
        self,
        name: str | None = None,
        mode: Literal["calibrated", "zero-shot", "transductive"] = "calibrated",
        estimator: str = "oas",
    ) -> None:
        if mode not in self._NAMES:
            raise ValueError(f"`mode` must be one of {list(self._NAMES)}, got {mode!r}")
        self.name, self.mode, self.estimator = name or self._NAMES[mode], mode, estimator

    def describe(self) -> dict:
        return {"type": "RecentredTangentSpace", "name": self.name, "mode": self.mode,
                "estimator": self.estimator}  # fmt: skip

    def fit(self, fold: Fold) -> Any:
        parts = []
        for s in fold.train:
            key = ("recentred", s, self.estimator)
            if key not in fold.study.shared:
                c = _covariances(fold, s, self.estimator)
                fold.study.shared[key] = recentred(c, c)
            parts.append(fold.study.shared[key])
        train_c = np.concatenate(parts)
        train_y = np.concatenate([fold.trials(s)[1] for s in fold.train])
        if self.mode == "calibrated":
            return train_c, train_y
        return tangent_space_lr().fit(train_c, train_y)

    def predict_proba(self, state, fold, subject, support, query) -> np.ndarray:
        c = _covariances(fold, subject, self.estimator)
        if self.mode == "zero-shot":
            return _columns(state, fold, state.predict_proba(c[query]))
        if self.mode == "transductive":
            return _columns(state, fold, state.predict_proba(recentred(c, c)[query]))
        train_c, train_y = state
        mine = recentred(c, c[support])
        labels = fold.trials(subject)[1]
        model = tangent_space_lr().fit(
            np.concatenate([train_c, mine[support]]), np.concatenate([train_y, labels[support]])
        )
        return _columns(model, fold, model.predict_proba(mine[query]))


class RiemannianProcrustes(CalibrationMethod):
    """Riemannian Procrustes analysis + K (Rodrigues et al. 2019) with pyriemann's transfer
    learning estimators: every training subject and the new subject's support trials (the target
    domain) recentred to the identity (``TLCenter``) and stretched to the same dispersion
    (``TLScale``), the training subjects rotated so that their class means match the target's
    (``TLRotate``), then tangent space + logistic regression on all of them (``TLClassifier``);
    the query trials recentred and stretched as the target domain.

    ``pool_sources`` (default): the training subjects, each recentred and stretched on its own,
    are rotated as one source domain (one rotation per episode); ``False``: each subject is
    rotated on its own, as ``TLRotate`` treats several source domains (about ``len(train)``
    times the cost: ``TLRotate``'s optimisation takes seconds per domain at 64 channels).

    Args:
        name: the method's row.
        pool_sources: rotate the training subjects as one domain.
        estimator: the covariance estimator.
        metric: ``TLRotate``'s ``metric``.
        k_shots: the K it is scored at (``None``: every K of the study).
    """

    def __init__(
        self,
        name: str = "RPA + K",
        pool_sources: bool = True,
        estimator: str = "oas",
        metric: str = "euclid",
        k_shots: Sequence[int] | None = None,
    ) -> None:
        self.name, self.pool_sources, self.estimator = name, pool_sources, estimator
        self.metric = metric
        self.k_shots = list(k_shots) if k_shots is not None else None

    def describe(self) -> dict:
        return {"type": "RiemannianProcrustes", "name": self.name, "metric": self.metric,
                "pool_sources": self.pool_sources, "estimator": self.estimator}  # fmt: skip

    def fit(self, fold: Fold) -> Any:
        """The training subjects recentred and stretched, each as its own domain (they do not
        depend on the new subject)."""
        from pyriemann.transfer import TLCenter, TLScale, encode_domains

        x = np.concatenate([_covariances(fold, s, self.estimator) for s in fold.train])
        y = np.concatenate([fold.trials(s)[1] for s in fold.train])
        domains = np.concatenate([[f"subject {s}"] * len(fold.trials(s)[1]) for s in fold.train])
        x_enc, y_enc = encode_domains(x, y, domains)
        centred = TLCenter(target_domain="").fit_transform(x_enc, y_enc)
        stretched = TLScale(target_domain="", centered_data=True).fit_transform(centred, y_enc)
        source = "source" if self.pool_sources else None
        return stretched, y, domains if source is None else np.full(len(y), source)

    def predict_proba(self, state, fold, subject, support, query) -> np.ndarray:
        from pyriemann.transfer import TLCenter, TLClassifier, TLScale, encode_domains

        source_x, source_y, source_domains = state
        c = _covariances(fold, subject, self.estimator)
        labels = fold.trials(subject)[1]
        target_enc = encode_domains(c[support], labels[support], ["target"] * len(support))
        center = TLCenter(target_domain="target")
        scale = TLScale(target_domain="target", centered_data=True)
        target = scale.fit_transform(center.fit_transform(*target_enc), target_enc[1])
        x = np.concatenate([source_x, target])
        x_enc, y_enc = encode_domains(
            x,
            np.concatenate([source_y, labels[support]]),
            np.concatenate([source_domains, ["target"] * len(support)]),
        )
        classifier = TLClassifier(target_domain="target", estimator=tangent_space_lr())
        classifier.fit(self.rotate(x_enc, y_enc), y_enc)
        mine = scale.transform(center.transform(c[query]))
        return _columns(classifier.estimator, fold, classifier.predict_proba(mine))

    def rotate(self, x_enc: np.ndarray, y_enc: np.ndarray) -> np.ndarray:
        """The recentred, stretched matrices of every domain (pyriemann's encoded labels), the
        source domains rotated to the target's class means (``TLRotate``)."""
        from pyriemann.transfer import TLRotate

        with warnings.catch_warnings():  # TLRotate's optimiser stops at its iteration limit
            warnings.filterwarnings("ignore", "Convergence not reached")
            rotation = TLRotate(target_domain="target", metric=self.metric)
            return rotation.fit_transform(x_enc, y_enc)


class Ensemble(CalibrationMethod):
    """Methods' class probabilities averaged with fixed ``weights`` (default: equal). Members
    are fitted and their probabilities computed once per fold and episode, shared with the same
    methods scored on their own.

    Args:
        name: the method's row.
        members: the methods averaged.
        weights: one per member, fixed in advance (normalised to sum 1).
    """

    def __init__(
        self,
        name: str,
        members: Sequence[CalibrationMethod],
        weights: Sequence[float] | None = None,
    ) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"`weights` must be {len(members)} non-negative numbers with a "
                             f"positive sum, got {weights}")  # fmt: skip
        self.name, self.members = name, list(members)
        self.weights = [w / sum(weights) for w in weights]

    def describe(self) -> dict:
        return {"type": "Ensemble", "name": self.name, "weights": self.weights,
                "members": [m.describe() for m in self.members]}  # fmt: skip

    def fit(self, fold: Fold) -> None:
        for member in self.members:
            fold.fit(member)

    def predict_proba(self, state, fold, subject, support, query) -> np.ndarray:
        return sum(
            w * fold.predict(m, subject, support, query) for w, m in zip(self.weights, self.members)
        )
