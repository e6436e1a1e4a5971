"""Few-shot calibration of new EEG subjects: PhysioNet motor imagery, the MAML family against the
field's pipelines, hyper-parameters chosen on subjects apart from those scored.

Data: PhysioNet EEG Motor Movement/Imagery (MOABB's ``PhysionetMI``), imagined left vs right fist
(runs 4, 8, 12: 45 trials per subject), cut by MOABB's ``LeftRightImagery`` (8-30 Hz, 0-3 s,
resampled to 80 Hz: 64 channels x 240 samples), loaded through ``MOABBDataModule`` (networks: each
trial standardised on its own) and ``load_subject`` (classical pipelines: the band-passed trials).

A *fold* scores one test subject: the networks are (meta-)trained on the fold's training subjects,
then every method is given the same K labelled trials per class of the test subject (the support
set) and scored on the rest of that subject's trials (the query set): never in a support set, an
alignment estimate or a fit, except where a method is labelled *transductive*. Methods:

- ``maml``, ``fomaml``, ``anil``, ``metasgd``, ``imaml``, ``protomaml``: EEGNet-8,2 meta-trained on
  episodes of the training subjects with ``MAMLModule``, adapted on the support set with its own
  inner rule (Meta-SGD with its learned step sizes, iMAML its regularised steps, ProtoMAML from
  the prototype head) for ``eval_steps`` steps (``MAMLModule.adapt``'s computation); iMAML with
  ``lam = 1 / --inner-lr`` (fixed in advance, as in the sinusoid and digits comparisons; its
  meta-steps without an implicit gradient, where the regularised problem is not convex, are
  skipped and counted in the table); ProtoMAML's EEGNet has a plain
  linear output layer (its prototype initialisation assumes one; the paper's is max-norm bound);
- ``joint``: the same network trained on the same episodes without an inner loop, fine-tuned like
  MAML; ``scratch``: a new EEGNet trained on the support set alone;
- ``ensemble``: MAML's calibrated network and TS+LR + K (below) on the same episode, their class
  probabilities averaged with weights fixed in advance (1/2 each); MAML's trained network reused;
- ``csp-lda``: MNE's CSP (4 components, Ledoit-Wolf) + LDA on the training subjects (zero-shot),
  and refitted with the support trials added (+ K);
- ``ts-lr``: covariances (OAS), each subject recentred to the identity by its own Riemannian mean,
  tangent space + logistic regression (pyriemann, scikit-learn). Zero-shot: the test subject not
  recentred; zero-shot transductive: recentred by all of its unlabelled trials (the query trials
  included); + K: recentred by its support trials and refitted with them added.

Network methods can align the trials (``alignment``: Euclidean alignment, training subjects by their
own trials, a test subject's episode by its support trials alone). A network method's score
classifies each query trial alone: the network ``MAMLModule.adapt`` calibrates on the support set,
its BatchNorm normalising with the support trials' statistics, as an online BCI classifies trials
as they come; its rows "... (query batch)" score as before, the query trials normalised together.

Hyper-parameters: with ``--selection-subjects`` (default 1-9), every candidate of the grid (each
network method's ``alignment`` and ``eval_steps``) is scored leave-one-subject-out *within* those
subjects (each fold training on the other selection subjects), the best candidate of each method
by its mean accuracy at the largest two K is kept, and so is the best MAML-family method
(``--selection-methods`` scores some methods only: the rest of the family then takes MAML's
setting, joint MAML's, scratch joint's); the table
is then computed on ``--test-subjects`` (default 10-19), each fold training on every other
subject of ``--subjects``, with the chosen settings. ``--train-subjects`` trains once on those
subjects instead and calibrates each test subject (a lab's own subjects, new users).

Results are stored per fold, keyed by a hash of everything that shapes them: a killed run continues
from the folds already finished, and changed settings never mix with old results.

    python scripts/eeg.py --mne-data ../shared/data/mne_data

``--mne-data`` points MNE (``MNE_DATA``, ``MNE_DATASETS_EEGBCI_PATH``) at a folder holding the
recordings and skips MOABB's mirror (``MOABB_DOWNLOAD_PROVIDER=upstream``); without it, MNE's
configured folder is used and missing recordings are downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

FAMILY = ("maml", "fomaml", "anil", "metasgd", "imaml", "protomaml")
#: MAML's calibrated network and TS+LR + K, their class probabilities averaged (weights fixed
#: in advance, 1/2 each): the network the ``maml`` method trained, reused
ENSEMBLES = ("ensemble",)
NETWORKS = (*FAMILY, "joint", "scratch", *ENSEMBLES)
CLASSICAL = ("csp-lda", "ts-lr")


def _merged_rows(path: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> list:
    """The test rows of an earlier run's results.json, refused unless they were scored on the
    same episodes (test subjects, K, episodes per subject and K, seed) and hold none of
    ``--methods``."""
    try:
        earlier = json.loads(Path(path).read_text())
        given, rows = earlier["args"], earlier["rows"]
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--merge {path!r}: not a results.json of this script ({error})")
    for name in ("test_subjects", "k_shots", "episodes", "seed"):
        if given.get(name) != getattr(args, name):
            parser.error(
                f"--merge {path!r} was scored with {name}={given.get(name)}, this run with "
                f"{getattr(args, name)}: not the same episodes"
            )
    shared = sorted(set(given.get("methods", [])) & set(args.methods))
    if shared:
        parser.error(f"--merge {path!r} already holds {shared}: leave them out of --methods")
    return rows


def _subjects(
    text: str, option: str, parser: argparse.ArgumentParser, empty: bool = False
) -> list[int]:
    """``"1-9,12"`` -> ``[1, ..., 9, 12]``; refused, naming ``option``, unless every part is a
    number or an increasing range, no subject comes twice, and (unless ``empty``) one is named."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            parser.error(f"{option} {text!r}: {part!r} is not a subject number or a range a-b")
        start, stop = int(low), int(high) if dash else int(low)
        if stop < start:
            parser.error(f"{option} {text!r}: the range {part!r} runs backwards")
        out += list(range(start, stop + 1))
    twice = sorted({s for s in out if out.count(s) > 1})
    if twice:
        parser.error(f"{option} {text!r} names subjects {twice} more than once")
    if not out and not empty:
        parser.error(f"{option} {text!r} names no subject")
    return out


def _values(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--mne-data", help="MNE data folder holding the PhysioNet recordings")
    add("--subjects", default="1-19", help="every subject a fold may train on (default 1-19)")
    add("--test-subjects", default="10-19", help="subjects scored in the table")
    add("--selection-subjects", default="1-9", help="subjects hyper-parameters are chosen on")
    add(
        "--selection-methods",
        default=None,
        help="network methods whose settings are chosen on the selection subjects (default: all "
        "of --methods); the others take a chosen one's: the MAML family MAML's, scratch joint's",
    )
    add("--train-subjects", default=None, help="train once on these instead of on all others")
    add("--methods", default=",".join(NETWORKS + CLASSICAL))
    add("--k-shots", default="1,5,10", help="labelled trials per class of a test subject")
    add("--episodes", type=int, default=10, help="episodes per test subject and K")
    add("--alignment", default="none,euclidean", help="candidates: none, euclidean")
    add("--eval-steps", default="10,25", help="candidates: adaptation steps on the support set")
    add("--meta-steps", type=int, default=200)
    add("--meta-batch-size", type=int, default=4)
    add("--meta-lr", type=float, default=3e-3)
    add("--inner-lr", type=float, default=0.1)
    add("--inner-steps", type=int, default=1, help="inner steps in meta-training")
    add("--train-k-shot", type=int, default=3, help="support trials per class, meta-training")
    add("--train-query", type=int, default=4, help="query trials per class, meta-training")
    add("--scratch-steps", type=int, default=100)
    add("--scratch-lr", type=float, default=0.1)
    add("--seed", type=int, default=0)
    add(
        "--merge",
        default=None,
        help="results.json of an earlier run on the same test subjects, K, episodes and seed: "
        "its methods join the table (the same episodes), e.g. docs/eeg19_results.json",
    )
    add("--reference", default=None, help="the method the others are compared with (default: "
        "the best family method of the selection, else the first family method)")  # fmt: skip
    add("--out", default="outputs/eeg")
    add("--no-progress-bar", action="store_true")
    add(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, which never collapses; on a machine of your own "
        "EEGNet runs about 10%% faster with 2 on 2 cores, and 3x slower when another process "
        "shares them)",
    )
    args = parser.parse_args(argv)
    args.subjects = _subjects(args.subjects, "--subjects", parser)
    args.test_subjects = _subjects(args.test_subjects, "--test-subjects", parser)
    args.selection_subjects = _subjects(
        args.selection_subjects, "--selection-subjects", parser, empty=True
    )
    if args.train_subjects is not None:
        args.train_subjects = _subjects(args.train_subjects, "--train-subjects", parser)
    args.methods = _values(args.methods, str)
    networks = [m for m in args.methods if m in NETWORKS]
    args.selection_methods = (
        networks if args.selection_methods is None else _values(args.selection_methods, str)
    )
    if not set(args.selection_methods) <= set(networks):
        parser.error(f"--selection-methods {args.selection_methods} must be network --methods")
    args.k_shots = _values(args.k_shots, int)
    args.alignment = _values(args.alignment, str)
    args.eval_steps = _values(args.eval_steps, int)
    unknown = sorted(set(args.methods) - set(NETWORKS + CLASSICAL))
    if unknown:
        parser.error(f"--methods {unknown} unknown; methods: {', '.join(NETWORKS + CLASSICAL)}")
    if not set(args.alignment) <= {"none", "euclidean"} or not args.alignment:
        parser.error(f"--alignment takes none and/or euclidean, got {args.alignment}")
    for name in ("meta_steps", "episodes", "scratch_steps", "train_k_shot", "meta_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.k_shots or min(args.k_shots) < 1 or not args.eval_steps or min(args.eval_steps) < 0:
        parser.error("--k-shots must be >= 1 and --eval-steps >= 0")
    everyone = set(args.subjects)
    for name in ("test_subjects", "selection_subjects", "train_subjects"):
        given = getattr(args, name) or []
        if not set(given) <= everyone:
            parser.error(f"--{name.replace('_', '-')} {given} must be among --subjects")
    if set(args.test_subjects) & set(args.selection_subjects):
        parser.error("--test-subjects and --selection-subjects must not share a subject")
    if args.train_subjects and set(args.train_subjects) & set(args.test_subjects):
        parser.error("--train-subjects and --test-subjects must not share a subject")
    if len(args.selection_subjects) == 1:
        parser.error("--selection-subjects needs at least 2 subjects (or none: fixed settings)")
    if args.reference is not None and args.reference not in NETWORKS:
        parser.error(f"--reference {args.reference!r} unknown; methods: {', '.join(NETWORKS)}")
    if args.merge is not None:
        args.merge = _merged_rows(args.merge, args, parser)
    if args.mne_data is not None:
        folder = Path(args.mne_data).resolve()
        if not folder.is_dir():
            parser.error(f"--mne-data {args.mne_data!r} is not a folder")
        os.environ["MNE_DATA"] = os.environ["MNE_DATASETS_EEGBCI_PATH"] = str(folder)
        os.environ["MOABB_DOWNLOAD_PROVIDER"] = "upstream"
    return args


# arguments before the heavy imports below: --help and argument errors answer at once
ARGS = parse_args() if __name__ == "__main__" else None

import lightning.pytorch as pl  # noqa: E402
import mne  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchtools import (  # noqa: E402
    cpu_trainer,
    markdown_table,
    plot_accuracy_vs_k,
    quiet_lightning_info,
)
from mne.decoding import CSP  # noqa: E402
from moabb.datasets import PhysionetMI  # noqa: E402
from moabb.paradigms import LeftRightImagery  # noqa: E402
from pyriemann.estimation import Covariances  # noqa: E402
from pyriemann.geometry.base import invsqrtm  # noqa: E402
from pyriemann.geometry.mean import mean_riemann  # noqa: E402
from pyriemann.tangentspace import TangentSpace  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lightning_maml import Episode, MAMLModule  # noqa: E402
from lightning_maml.datamodules import MOABBDataModule  # noqa: E402
from lightning_maml.datamodules.alignment import SupportAlignment  # noqa: E402
from lightning_maml.functional import IMAML, meta_loss, nonfinite_tasks, query_correct  # noqa: E402
from lightning_maml.functional.algorithms import describe_algorithm  # noqa: E402
from lightning_maml.models import EEGNet  # noqa: E402

#: bump when what a stored fold holds changes meaning (2: a meta-step with a non-finite
#: meta-gradient, e.g. iMAML's where a task's regularised problem is not convex, is skipped and
#: counted in the rows' ``skipped_steps``; 3: a network method's rows score each query trial
#: alone, BatchNorm from the support trials, and its former scoring is the "(query batch)" rows)
RESULTS_FORMAT = 3
NAMES = {
    "maml": "MAML",
    "fomaml": "first-order MAML",
    "anil": "ANIL",
    "metasgd": "Meta-SGD",
    "imaml": "iMAML",
    "protomaml": "ProtoMAML",
    "joint": "joint + fine-tuning",
    "scratch": "scratch",
    "ensemble": "MAML & TS+LR + K",
}
#: the rows of a network method scored as before: its query trials normalised as one batch
BATCH_SCORED = " (query batch)"
CLASSICAL_ROWS = {
    "csp-lda": ["CSP+LDA zero-shot", "CSP+LDA + K"],
    "ts-lr": ["TS+LR zero-shot", "TS+LR zero-shot (transductive)", "TS+LR + K"],
}


#: family members meta-trained with settings other than a name's defaults, fixed in advance
FAMILY_SETTINGS = {"imaml": lambda args: IMAML(lam=1 / args.inner_lr)}
#: networks other than EEGNet-8,2 as the paper has it: ProtoMAML's prototype initialisation
#: assumes a plain linear output layer, which the paper's max-norm bound would rescale
NETWORK_SETTINGS = {"protomaml": {"dense_max_norm": None}}


def family_algorithm(method: str, args: argparse.Namespace):
    """The algorithm (a name or an object) a network method meta-trains with."""
    if method in FAMILY_SETTINGS:
        return FAMILY_SETTINGS[method](args)
    return "maml" if method == "joint" else method


# ---- data -----------------------------------------------------------------------------------


def make_data(
    train: list[int], test: list[int], alignment: str, args: argparse.Namespace
) -> MOABBDataModule:
    data = MOABBDataModule(
        PhysionetMI(imagined=True, executed=False),
        LeftRightImagery(fmin=8, fmax=30, resample=80),
        train_subjects=train,
        val_subjects=[],
        test_subjects=test,
        n_way=2,
        k_shot=args.train_k_shot,
        query_size=args.train_query,
        meta_batch_size=args.meta_batch_size,
        episodes_per_epoch=50 * args.meta_batch_size,
        standardize="trial",
        alignment=alignment,
        cache_dir=str(Path(args.out) / "cache"),
        seed=args.seed,
        dataset_attributes={"hand_runs": [4, 8, 12], "feet_runs": []},
    )
    data.prepare_data()
    data.setup("fit")
    return data


def held_out_episodes(y: np.ndarray, k: int, subject: int, args) -> list[tuple]:
    """``--episodes`` splits of a test subject's trials: per class ``k`` support trials and, as
    the query set, ``q`` others (``q`` = the smallest class's count minus ``k``, the same in every
    episode). Seeded by (seed, subject, k): every method sees the same episodes."""
    classes = sorted(set(y.tolist()))
    q = min(int((y == c).sum()) for c in classes) - k
    if q < 1:
        raise ValueError(f"K={k} leaves no query trial for subject {subject} ({q + k} per class)")
    rng = np.random.default_rng([args.seed, subject, k])
    episodes = []
    for _ in range(args.episodes):
        support, query = [], []
        for c in classes:
            order = rng.permutation(np.flatnonzero(y == c))
            support.append(order[:k])
            query.append(order[k : k + q])
        episodes.append((np.concatenate(support), np.concatenate(query)))
    return episodes


def episode_batch(x: torch.Tensor, y: torch.Tensor, episodes: list[tuple], align: bool) -> Episode:
    """The episodes as one batch; with ``align``, each aligned by its own support trials."""
    parts = [Episode(x[s], y[s], x[q], y[q]) for s, q in episodes]
    if align:
        parts = [SupportAlignment()(p) for p in parts]
    return Episode(*(torch.stack(field) for field in zip(*parts)))


# ---- networks -------------------------------------------------------------------------------


def train_network(data: MOABBDataModule, method: str, args: argparse.Namespace) -> MAMLModule:
    """Meta-train (or, ``joint``, train without an inner loop) EEGNet on the training subjects."""
    pl.seed_everything(args.seed, verbose=False)
    x = data.data["train"][0]
    settings = NETWORK_SETTINGS.get(method, {})
    net = EEGNet(x.shape[1], x.shape[2], len(data.classes), sampling_rate=80, **settings)
    module = MAMLModule(
        net,
        loss="cross_entropy",
        inner_lr=args.inner_lr,
        inner_steps=0 if method == "joint" else args.inner_steps,
        algorithm=family_algorithm(method, args),
        meta_lr=args.meta_lr,
        on_nonfinite="skip",  # counted in the rows' skipped_steps and the table
    )
    batches_per_epoch = -(-data.episodes_per_epoch // data.meta_batch_size)
    trainer = cpu_trainer(args.meta_steps, batches_per_epoch, progress_bar=False)
    trainer.fit(module, data)
    return module.eval()


def adapted_accuracies(
    module: MAMLModule, batch: Episode, steps: int, lr: float | None = None, chunk: int = 5
) -> list[float]:
    """Query accuracy per episode after ``steps`` steps of the module's own inner rule on the
    support set (first order, from detached parameters: what ``MAMLModule.adapt`` computes);
    ``lr`` replaces the step size (plain SGD, for a network trained from scratch)."""
    algorithm = "fomaml" if lr is not None else module.algorithm.with_order(first_order=True)
    learned = {n: t.detach() for n, t in module.algorithm.learned().items()}
    params = {n: p.detach() for n, p in module.net.named_parameters()}
    results: list[float] = []
    for start in range(0, len(batch.support_x), chunk):
        part = Episode(*(t[start : start + chunk] for t in batch))
        with torch.enable_grad():
            out = meta_loss(
                module.net,
                "cross_entropy",
                *part,
                inner_lr=lr or module.inner_lr,
                inner_steps=steps,
                algorithm=algorithm,
                params=params,
                learned=None if lr is not None else learned,
                track_initial_loss=False,
                executor=module.executor,
            )
        # a non-finite prediction is wrong, never argmax's class 0; such episodes are named
        correct = query_correct(out.query_predictions, part.query_y)
        bad = nonfinite_tasks(out).nonzero().flatten().tolist()
        if bad:
            warnings.warn(
                f"episodes {[start + b for b in bad]} of this batch ended with non-finite "
                f"predictions after {steps} adaptation steps: scored as wrong",
                stacklevel=2,
            )
        results += correct.float().mean(1).tolist()
    return results


def single_trial_probabilities(module: MAMLModule, batch: Episode, steps: int) -> list:
    """Per episode, the query trials' class probabilities from the network ``MAMLModule.adapt``
    calibrates on the support set (its inner rule, ``steps`` steps): BatchNorm normalises with the
    support trials' statistics, so each query trial is classified alone, as an online BCI does.
    An episode whose calibration diverges gets NaN probabilities (scored wrong), with a warning."""
    probabilities = []
    for e in range(len(batch.support_x)):
        try:
            calibrated = module.adapt(batch.support_x[e], batch.support_y[e], steps=steps)
        except ValueError as error:
            if "diverged" not in str(error):
                raise
            warnings.warn(f"episode {e}: {error}; scored as wrong", stacklevel=2)
            shape = (len(batch.query_y[e]), int(batch.support_y.max()) + 1)
            probabilities.append(torch.full(shape, float("nan")))
            continue
        with torch.no_grad():
            probabilities.append(torch.softmax(calibrated(batch.query_x[e]), dim=1))
    return probabilities


def probability_accuracies(probabilities: list, batch: Episode) -> list[float]:
    """Query accuracy per episode of class probabilities (NaN ones wrong)."""
    return [float(query_correct(p, y).float().mean()) for p, y in zip(probabilities, batch.query_y)]


# ---- classical pipelines --------------------------------------------------------------------


def csp_lda():
    return make_pipeline(
        CSP(n_components=4, reg="ledoit_wolf", log=True), LinearDiscriminantAnalysis()
    )


def recentred(covariances: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Covariances recentred by the Riemannian mean of ``reference``: ``M^-1/2 C M^-1/2``."""
    whitening = invsqrtm(mean_riemann(reference))
    return whitening @ covariances @ whitening


def tangent_lr():
    return make_pipeline(TangentSpace(metric="riemann"), LogisticRegression(max_iter=1000))


def classical_rows(
    method: str, fold: dict, raw: dict, k: int, episodes: list, cache: dict | None = None
) -> dict:
    """Query accuracies per episode of each row of a classical method."""
    train_x = np.concatenate([raw[s][0] for s in fold["train"]])
    train_y = np.concatenate([raw[s][1] for s in fold["train"]])
    x, y = raw[fold["test"]]

    def scores(model, features, labels) -> list[float]:
        return [float((model.predict(features[q]) == labels[q]).mean()) for _, q in episodes]

    if method == "csp-lda":
        zero_shot = csp_lda().fit(train_x, train_y)
        refitted = []
        for s, q in episodes:
            model = csp_lda().fit(np.concatenate([train_x, x[s]]), np.concatenate([train_y, y[s]]))
            refitted.append(float((model.predict(x[q]) == y[q]).mean()))
        return {"CSP+LDA zero-shot": scores(zero_shot, x, y), "CSP+LDA + K": refitted}
    tangent = tangent_space_data(fold, raw, cache)
    train_c, train_y, covariances, y = tangent
    zero_shot = tangent_lr().fit(train_c, train_y)
    calibrated = []
    for s, q in episodes:
        model, mine = ts_lr_calibrated(tangent, s, cache)
        calibrated.append(float((model.predict(mine[q]) == y[q]).mean()))
    return {
        "TS+LR zero-shot": scores(zero_shot, covariances, y),
        "TS+LR zero-shot (transductive)": scores(zero_shot, recentred(covariances, covariances), y),
        "TS+LR + K": calibrated,
    }


def tangent_space_data(fold: dict, raw: dict, cache: dict | None = None) -> tuple:
    """``(training covariances, each subject recentred by its own mean; their labels; the test
    subject's covariances, not recentred; its labels)`` for the tangent-space pipelines, computed
    once per fold (``cache``: the fold's; a Riemannian mean of 64-channel covariances takes
    seconds)."""
    if cache is not None and "tangent" in cache:
        return cache["tangent"]
    estimator = Covariances(estimator="oas")
    train_c = np.concatenate(
        [recentred(c, c) for c in (estimator.transform(raw[s][0]) for s in fold["train"])]
    )
    train_y = np.concatenate([raw[s][1] for s in fold["train"]])
    x, y = raw[fold["test"]]
    result = train_c, train_y, estimator.transform(x), y
    if cache is not None:
        cache["tangent"] = result
    return result


def _tangent(fold: dict, args, cache: dict) -> tuple:
    return tangent_space_data(fold, _raw(fold, args, cache), cache)


def ts_lr_calibrated(tangent: tuple, support: np.ndarray, cache: dict | None = None) -> tuple:
    """Tangent space + LR refitted with a new subject's support trials, its covariances
    recentred by the support trials alone: ``(model, recentred covariances of the subject)``, from
    :func:`tangent_space_data`'s ``tangent``; fitted once per support set of a fold (``cache``:
    the fold's; TS+LR + K and the ensemble score the same episodes)."""
    key = ("ts-lr + K", np.asarray(support).tobytes())
    if cache is not None and key in cache:
        return cache[key]
    train_c, train_y, covariances, y = tangent
    mine = recentred(covariances, covariances[support])
    features = np.concatenate([train_c, mine[support]])
    fitted = tangent_lr().fit(features, np.concatenate([train_y, y[support]])), mine
    if cache is not None:
        cache[key] = fitted
    return fitted


# ---- folds ----------------------------------------------------------------------------------


def candidates(method: str, args: argparse.Namespace, chosen: dict | None) -> list[dict]:
    """The settings to score for ``method``: the chosen one, or every candidate of the grid."""
    if method in CLASSICAL:
        return [{}]
    if chosen is not None:
        return [chosen[method]]
    steps = args.eval_steps if method != "scratch" else [args.scratch_steps]
    return [{"alignment": a, "eval_steps": e} for a in args.alignment for e in steps]


def fold_key(fold: dict, method: str, settings: list[dict], args: argparse.Namespace) -> str:
    shaping = {
        "format": RESULTS_FORMAT,
        "fold": fold,
        "method": method,
        "settings": settings,
        **({"family": _described(method, args)} if method in FAMILY_SETTINGS else {}),
        **({"network": NETWORK_SETTINGS[method]} if method in NETWORK_SETTINGS else {}),
        "k_shots": args.k_shots,
        "episodes": args.episodes,
        "seed": args.seed,
        **{
            name: getattr(args, name)
            for name in (
                "meta_steps",
                "meta_batch_size",
                "meta_lr",
                "inner_lr",
                "inner_steps",
                "train_k_shot",
                "train_query",
                "scratch_lr",
            )
        },
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:20]


def _described(method: str, args: argparse.Namespace) -> dict:
    return describe_algorithm(family_algorithm(method, args))


def _raw(fold: dict, args, cache: dict) -> dict:
    """The fold's subjects' band-passed trials and string labels (classical pipelines)."""
    raw = cache.setdefault("raw", {})
    data = cache.get("none") or cache.setdefault(
        "none", make_data(fold["train"], [fold["test"]], "none", args)
    )
    for s in {*fold["train"], fold["test"]} - set(raw):
        x, labels = data.load_subject(s)
        raw[s] = (x.astype(np.float64), labels)
    return raw


def _network(method: str, alignment: str, data: MOABBDataModule, fold: dict, args, cache):
    """The fold's trained network of ``method`` (the ensemble's is MAML's), trained once."""
    trained = "maml" if method in ENSEMBLES else method
    key = f"network:{trained}:{alignment}"
    if key not in cache:
        if trained == "scratch":
            pl.seed_everything(args.seed + fold["test"], verbose=False)
            x = data.data["train"][0]
            net = EEGNet(x.shape[1], x.shape[2], len(data.classes), sampling_rate=80)
            cache[key] = MAMLModule(net, loss="cross_entropy", inner_lr=args.scratch_lr).eval()
        else:
            cache[key] = train_network(data, trained, args)
    return cache[key]


def run_method(fold: dict, method: str, settings: list[dict], args, cache: dict) -> list[dict]:
    """Rows ``{method, setting, K, subject, accuracies}`` of one method on one fold."""
    rows = []
    if method in CLASSICAL:
        raw = _raw(fold, args, cache)
        for k in args.k_shots:
            episodes = held_out_episodes(raw[fold["test"]][1], k, fold["test"], args)
            rows_of = classical_rows(method, fold, raw, k, episodes, cache)
            for name, accuracies in rows_of.items():
                rows.append({"method": name, "setting": {}, "K": k, "accuracies": accuracies})
        return rows
    for alignment in dict.fromkeys(s["alignment"] for s in settings):
        data = cache.get(alignment) or cache.setdefault(
            alignment, make_data(fold["train"], [fold["test"]], alignment, args)
        )
        module = _network(method, alignment, data, fold, args, cache)
        if method in ENSEMBLES:
            tangent = _tangent(fold, args, cache)
        x, y, _ = data.data["test"]
        for k in args.k_shots:
            episodes = held_out_episodes(y.numpy(), k, fold["test"], args)
            batch = episode_batch(x, y, episodes, align=alignment == "euclidean")
            for setting in (s for s in settings if s["alignment"] == alignment):
                steps = setting["eval_steps"]
                probabilities = single_trial_probabilities(module, batch, steps)
                scored = {NAMES[method]: probabilities}
                if method in ENSEMBLES:  # TS+LR + K's probabilities on the same episodes
                    for e, (support, query) in enumerate(episodes):
                        model, mine = ts_lr_calibrated(tangent, support, cache)
                        other = torch.as_tensor(model.predict_proba(mine[query]))
                        probabilities[e] = (probabilities[e] + other.to(probabilities[e])) / 2
                for name, p in scored.items():
                    rows.append({"method": name, "setting": setting, "K": k,
                                 "accuracies": probability_accuracies(p, batch),
                                 "skipped_steps": module.nonfinite_steps})  # fmt: skip
                if method not in ENSEMBLES:  # the former scoring, labelled
                    lr = args.scratch_lr if method == "scratch" else None
                    rows.append({"method": NAMES[method] + BATCH_SCORED, "setting": setting,
                                 "K": k, "accuracies": adapted_accuracies(module, batch, steps, lr),
                                 "skipped_steps": module.nonfinite_steps})  # fmt: skip
    return rows


def run_stage(
    folds: list[dict], args, chosen: dict | None, stage: str, methods: list[str]
) -> list[dict]:
    """Every method on every fold, each (fold, method) read from its stored result where one
    with the same settings exists, else computed and stored."""
    store = Path(args.out) / "folds"
    store.mkdir(parents=True, exist_ok=True)
    units = [(fold, method) for fold in folds for method in methods]
    progress = tqdm(total=len(units), desc=stage, disable=args.no_progress_bar)
    rows: list[dict] = []
    cache: dict = {}
    current = None
    for fold, method in units:
        if fold != current:  # one fold's data at a time
            cache, current = {}, fold
        settings = candidates(method, args, chosen)
        path = store / f"{fold_key(fold, method, settings, args)}.json"
        progress.set_postfix_str(f"subject {fold['test']}, {method}")
        if path.exists():
            fold_rows = json.loads(path.read_text())["rows"]
        else:
            fold_rows = run_method(fold, method, settings, args, cache)
            for row in fold_rows:
                row["subject"] = fold["test"]
            # a name of this run's own (concurrent runs share the folder), then renamed whole: a
            # killed run leaves no half-written fold
            with tempfile.NamedTemporaryFile(
                "w", dir=store, prefix=path.stem + ".", suffix=".tmp", delete=False
            ) as temporary:
                temporary.write(json.dumps({"fold": fold, "method": method, "rows": fold_rows}))
            mask = os.umask(0o022)
            os.umask(mask)
            os.chmod(temporary.name, 0o666 & ~mask)  # as a plain write would (not 0600)
            os.replace(temporary.name, path)
        rows += fold_rows
        progress.update()
    progress.close()
    return rows


def folds_of(test_subjects: list[int], pool: list[int], fixed_train: list[int] | None) -> list:
    return [{"test": s, "train": fixed_train or [t for t in pool if t != s]} for s in test_subjects]


# ---- selection and summaries ----------------------------------------------------------------


#: where a network method not scored in selection takes its settings from
INHERIT = {
    "fomaml": "maml", "anil": "maml", "metasgd": "maml", "joint": "maml", "scratch": "joint",
    "ensemble": "maml",
}  # fmt: skip


def choose(rows: list[dict], args: argparse.Namespace) -> tuple[dict, str]:
    """Each selected network method's best setting by its mean accuracy over the selection folds
    at the largest two K (the others take a selected method's, :data:`INHERIT`), and the best
    selected MAML-family method by the same score."""
    ks = sorted(args.k_shots)[-2:]

    def score(method: str, setting: dict) -> float:
        cells = [
            a
            for r in rows
            if r["method"] == NAMES[method] and r["setting"] == setting and r["K"] in ks
            for a in r["accuracies"]
        ]
        return float(np.mean(cells))

    chosen, scores = {}, {}
    for method in args.selection_methods:
        chosen[method] = max(candidates(method, args, None), key=lambda s: score(method, s))
        scores[method] = score(method, chosen[method])
    for method in (m for m in args.methods if m in NETWORKS and m not in chosen):
        source = INHERIT.get(method)
        while source is not None and source not in chosen:
            source = INHERIT.get(source)
        setting = dict(chosen[source]) if source else candidates(method, args, None)[0]
        if method == "scratch":  # its own number of steps
            setting["eval_steps"] = args.scratch_steps
        chosen[method] = setting
    family = [m for m in args.selection_methods if m in FAMILY]
    best = max(family, key=lambda m: scores[m]) if family else None
    return chosen, best


def t_interval(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))


def summarise(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per method and K: mean over test subjects of each subject's mean accuracy, t interval."""
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for k in args.k_shots:
            cells = sorted((r for r in rows if r["method"] == method and r["K"] == k),
                           key=lambda r: r["subject"])  # fmt: skip
            means = [float(np.mean(r["accuracies"])) for r in cells]
            mean, ci = t_interval(means)
            summary.append(
                {
                    "method": method,
                    "K": k,
                    "accuracy": mean,
                    "ci95_subjects": ci,
                    "subjects": [r["subject"] for r in cells],
                    "subject_means": means,
                }
            )
    return summary


def differences(summary: list[dict], reference: str, args) -> list[dict]:
    """Per K, ``reference`` minus each other method, subject by subject: mean and t interval."""
    out = []
    for k in args.k_shots:
        mine = next(s for s in summary if s["method"] == reference and s["K"] == k)
        for s in summary:
            if s["K"] != k or s["method"] == reference:
                continue
            mean, ci = t_interval(
                [a - b for a, b in zip(mine["subject_means"], s["subject_means"])]
            )
            out.append({"K": k, "versus": s["method"], "difference": mean, "ci95_subjects": ci})
    return out


def interval(value: float) -> str:
    return "n/a (1 subject)" if np.isnan(value) else f"± {value:.3f}"


def markdown(summary, diffs, reference, chosen, args, subjects, rows=()) -> str:
    columns = [f"K={k}" for k in args.k_shots]
    accuracy = {
        m: [
            f"{s['accuracy']:.3f} {interval(s['ci95_subjects'])}"
            for s in summary
            if s["method"] == m
        ]
        for m in dict.fromkeys(s["method"] for s in summary)
    }
    difference = {
        v: [
            f"{d['difference']:+.3f} {interval(d['ci95_subjects'])}"
            for d in diffs
            if d["versus"] == v
        ]
        for v in dict.fromkeys(d["versus"] for d in diffs)
    }
    settings = ", ".join(f"{NAMES[m]}: {s}" for m, s in (chosen or {}).items())
    skipped = {}
    for r in rows:
        if r.get("skipped_steps"):
            skipped.setdefault(r["method"], {})[r["subject"]] = r["skipped_steps"]
    skipped_line = "; ".join(
        f"{m}: {sum(per.values())} in {len(per)} folds" for m, per in skipped.items()
    )
    lines = [
        f"2-way left/right fist imagery, test subjects {subjects}: query accuracy, mean over "
        f"subjects ± 95% t interval over subjects ({args.episodes} episodes per subject and K); "
        "chance 0.5.",
        f"Settings: {settings or 'as given'}.",
        *(
            [
                f"Meta-steps skipped for a non-finite meta-gradient (of {args.meta_steps} per "
                f"fold): {skipped_line}."
            ]
            if skipped
            else []
        ),
        "",
        *markdown_table("method", columns, accuracy),
        "",
        f"{reference} minus each method, subject by subject (mean ± t interval over subjects):",
        "",
        *markdown_table("versus", columns, difference),
    ]
    return "\n".join(lines)


def plot_subjects(summary: list[dict], reference: str, k: int, path: Path) -> None:
    """Each test subject's accuracy at ``k``: ``reference`` and every other method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [s for s in summary if s["K"] == k]
    subjects = cells[0]["subjects"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(cells)
    for i, s in enumerate(cells):
        positions = np.arange(len(subjects)) + (i - len(cells) / 2 + 0.5) * width
        ax.bar(positions, s["subject_means"], width, label=s["method"],
               edgecolor="black" if s["method"] == reference else None)  # fmt: skip
    ax.axhline(0.5, color="grey", ls=":")
    ax.set_xticks(np.arange(len(subjects)), [str(s) for s in subjects])
    ax.set_xlabel("test subject")
    ax.set_ylabel(f"query accuracy, K={k}")
    ax.set_ylim(0.2, 1.0)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    quiet_lightning_info()
    torch.set_num_threads(args.threads)
    mne.set_log_level("error")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chosen, best = None, None
    # the data folder is this machine's, not the result's: left out
    report: dict = {"args": {k: v for k, v in vars(args).items() if k != "mne_data"}}
    if args.selection_subjects:
        selection = run_stage(
            folds_of(args.selection_subjects, args.selection_subjects, None),
            args,
            None,
            "selection folds x methods",
            args.selection_methods,
        )
        chosen, best = choose(selection, args)
        report.update(selection_rows=selection, chosen=chosen, best_family_method=best)
        print(f"chosen on subjects {args.selection_subjects}: {chosen}; best of the family: {best}")
    else:  # no selection: the first value of each setting
        chosen = {m: candidates(m, args, None)[0] for m in args.methods if m in NETWORKS}
    rows = run_stage(
        folds_of(args.test_subjects, args.subjects, args.train_subjects),
        args,
        chosen,
        "test folds x methods",
        args.methods,
    )
    total = time.perf_counter() - start
    if args.merge:
        rows += args.merge
    summary = summarise(rows, args)
    family = [NAMES[m] for m in args.methods if m in FAMILY]
    reference = NAMES[best] if best else (family[0] if family else summary[0]["method"])
    if args.reference is not None:
        reference = NAMES[args.reference]
    diffs = differences(summary, reference, args)
    table = markdown(summary, diffs, reference, chosen, args, args.test_subjects, rows)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    plot_accuracy_vs_k(
        summary,
        "ci95_subjects",
        0.5,
        args.k_shots,
        (
            "K (labelled trials per class of the new subject)",
            "query accuracy (± t interval over subjects)",
            f"PhysioNet left/right fist imagery, {len(args.test_subjects)} test subjects",
        ),
        out / "eeg_accuracy.png",
        (7.5, 4.5),
    )
    plot_subjects(summary, reference, sorted(args.k_shots)[len(args.k_shots) // 2],
                  out / "eeg_subjects.png")  # fmt: skip
    report.update(summary=summary, differences=diffs, rows=rows, total_seconds=total)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\ntotal {total:.0f} s; {out / 'results.md'}, {out / 'eeg_accuracy.png'}")


if __name__ == "__main__":
    main(ARGS)
