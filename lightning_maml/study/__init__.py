"""The few-shot calibration study: how well a method calibrates to a new subject from K labelled
trials per class, measured across subjects of any MOABB dataset.

A *fold* holds out test subjects; every method is fitted once on the fold's training subjects
(networks are (meta-)trained there), then given, for each test subject, K, and episode, the same K
labelled trials per class (the support set) and asked for the class probabilities of the rest of
that subject's trials (the query set), each classified without statistics of the others. Rows
hold the query accuracy of every episode; :class:`StudyResult` gives means over subjects with t
intervals, paired differences and figures. Results are stored per (fold, method), keyed by
everything that shapes them, so a killed study continues where it stopped.

Methods: any network through :class:`NetworkMethod` (meta-trained with
:class:`~lightning_maml.MAMLModule` by any algorithm of the family, or trained jointly, or from
scratch on the support set), any scikit-learn pipeline on the trials through
:class:`PipelineMethod`, the field's Riemannian calibration pipelines
(:class:`RecentredTangentSpace`, :class:`RiemannianProcrustes`) and weighted :class:`Ensemble`\\ s.

Needs the ``study`` extra (MNE, MOABB, scikit-learn, pyriemann, matplotlib).

Example (a user with internet; the EEG guide runs it on PhysioNet)::

    from moabb.datasets import BNCI2014_001
    from moabb.paradigms import LeftRightImagery
    from lightning_maml.models import EEGNet
    from lightning_maml.study import CalibrationStudy, NetworkMethod, RecentredTangentSpace

    study = CalibrationStudy(BNCI2014_001(), LeftRightImagery(fmin=8, fmax=30, resample=128),
                             subjects=range(1, 10), store="outputs/bnci")
    maml = NetworkMethod("MAML", lambda c, t, n: EEGNet(c, t, n, sampling_rate=128))
    result = study.run([maml, RecentredTangentSpace()], folds=3)
    print(result.markdown(reference="MAML"))
"""

from lightning_maml.study.methods import (
    CalibrationMethod,
    Ensemble,
    NetworkMethod,
    PipelineMethod,
    RecentredTangentSpace,
    RiemannianProcrustes,
)
from lightning_maml.study.protocol import (
    CalibrationStudy,
    Fold,
    Selection,
    calibration_episodes,
    subject_folds,
)
from lightning_maml.study.results import StudyResult, t_interval

__all__ = [
    "CalibrationMethod",
    "CalibrationStudy",
    "Ensemble",
    "Fold",
    "NetworkMethod",
    "PipelineMethod",
    "RecentredTangentSpace",
    "RiemannianProcrustes",
    "Selection",
    "StudyResult",
    "calibration_episodes",
    "subject_folds",
    "t_interval",
]
