"""Why RPA + K is near chance on PhysioNet: each step of the pipeline on a few test subjects.

For each subject given, trained on its fold's training subjects (the five folds of
``scripts/eeg.py``), K = 10 trials per class, the first two episodes of the study: TS+LR + K,
RPA without its rotation (``TLCenter`` + ``TLScale`` + ``TLClassifier``), RPA with the training
subjects rotated as one source domain (the study's), and RPA with each rotated on its own
(pyriemann's multi-source treatment; minutes per episode).

    python scripts/rpa_check.py --mne-data ../shared/data/mne_data 3 7
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("subjects", nargs="+", type=int, help="test subjects (of 1-19)")
parser.add_argument("--mne-data", help="MNE data folder holding the PhysioNet recordings")
parser.add_argument("--cache", default="outputs/eeg/cache", help="cached trials (as eeg.py)")
args = parser.parse_args()
if args.mne_data:
    folder = str(Path(args.mne_data).resolve())
    os.environ["MNE_DATA"] = os.environ["MNE_DATASETS_EEGBCI_PATH"] = folder
    os.environ["MOABB_DOWNLOAD_PROVIDER"] = "upstream"

from moabb.datasets import PhysionetMI  # noqa: E402
from moabb.paradigms import LeftRightImagery  # noqa: E402

from lightning_maml.study import (  # noqa: E402
    CalibrationStudy,
    RecentredTangentSpace,
    RiemannianProcrustes,
    calibration_episodes,
    subject_folds,
)
from lightning_maml.study.protocol import Fold  # noqa: E402


class WithoutRotation(RiemannianProcrustes):
    """RPA + K with ``TLRotate`` left out: recentred, stretched, tangent space + LR."""

    def rotate(self, x_enc, y_enc):
        return x_enc


warnings.filterwarnings("ignore", message="Convergence not reached")
study = CalibrationStudy(
    PhysionetMI(imagined=True, executed=False),
    LeftRightImagery(fmin=8, fmax=30, resample=80),
    range(1, 20),
    k_shots=[10],
    cache_dir=args.cache,
    progress=False,
    data_options={"dataset_attributes": {"hand_runs": [4, 8, 12], "feet_runs": []}},
)
training = {s: train for test, train in subject_folds(range(1, 20), range(1, 20), 5) for s in test}
methods = [
    RecentredTangentSpace(),
    WithoutRotation("RPA without rotation"),
    RiemannianProcrustes("RPA + K (one source domain)"),
    RiemannianProcrustes("RPA + K (each subject a domain)", pool_sources=False),
]
for subject in args.subjects:
    fold = Fold(study, [subject], training[subject])
    y = fold.labels(subject)
    episodes = calibration_episodes(y, 10, 10, seed=[0, subject, 10])[:2]
    for method in methods:
        start = time.perf_counter()
        scores = [
            float((fold.predict(method, subject, s, q).argmax(1) == y[q]).mean())
            for s, q in episodes
        ]
        took = time.perf_counter() - start
        print(f"subject {subject}, {method.name}: {np.round(scores, 3)} ({took:.0f} s)", flush=True)
