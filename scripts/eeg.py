"""Few-shot calibration of new EEG subjects: PhysioNet motor imagery, the MAML family against the
field's calibration pipelines; a command line over :mod:`lightning_maml.study`.

Data: PhysioNet EEG Motor Movement/Imagery (MOABB's ``PhysionetMI``), imagined left vs right fist
(runs 4, 8, 12: 45 trials per subject), cut by MOABB's ``LeftRightImagery`` (8-30 Hz, 0-3 s,
resampled to 80 Hz: 64 channels x 240 samples); networks get each trial standardised on its own.

A fold holds out test subjects (``--folds``: ``loso``, one at a time, or a number of groups);
every method is fitted once on the fold's training subjects, then given, for each test subject, K
and episode, the same K labelled trials per class (the support set) and scored on the rest of that
subject's trials (the query set), each query trial classified alone. Methods:

- ``maml``, ``fomaml``, ``anil``, ``metasgd``, ``imaml``, ``protomaml``: EEGNet-8,2 meta-trained on
  episodes of the training subjects with ``MAMLModule``, calibrated with ``MAMLModule.adapt`` (its
  inner rule, ``eval_steps`` steps, BatchNorm from the support trials); iMAML with
  ``lam = 1 / --inner-lr``; ProtoMAML's EEGNet has a plain linear output layer (its prototype
  initialisation assumes one);
- ``joint``: the same network trained on the same episodes without an inner loop, calibrated like
  MAML; ``scratch``: a new EEGNet trained on the support set alone;
- ``ensemble``: MAML's calibrated network and TS+LR + K, class probabilities averaged (1/2 each);
- ``csp-lda``: CSP (4 components, Ledoit-Wolf) + LDA, zero-shot and refitted with the support
  trials added;
- ``ts-lr``: the recentred tangent-space pipeline, zero-shot, zero-shot transductive and + K
  (``RecentredTangentSpace``);
- ``rpa``: Riemannian Procrustes analysis + K (pyriemann's TLCenter, TLScale, TLRotate,
  TLClassifier; training subjects rotated as one source domain), at ``--rpa-k-shots``.

Hyper-parameters: with ``--selection-subjects``, every candidate (each network method's
``alignment`` and ``eval_steps``) is scored leave-one-subject-out within those subjects, and the
best of each kept (methods not in ``--selection-methods`` take a selected one's setting: the family
MAML's, scratch joint's); without, the first value of each is used, fixed before any scoring.
``--train-subjects`` trains once on those subjects and calibrates every test subject.

Results are stored per (fold, method) in ``--out``/folds, keyed by everything that shapes them: a
killed run continues, and changed settings never mix with old results.

    python scripts/eeg.py --mne-data ../shared/data/mne_data

``--mne-data`` points MNE (``MNE_DATA``, ``MNE_DATASETS_EEGBCI_PATH``) at a folder holding the
recordings and skips MOABB's mirror (``MOABB_DOWNLOAD_PROVIDER=upstream``); without it, MNE's
configured folder is used and missing recordings are downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

FAMILY = ("maml", "fomaml", "anil", "metasgd", "imaml", "protomaml")
NETWORKS = (*FAMILY, "joint", "scratch", "ensemble")
CLASSICAL = ("csp-lda", "ts-lr", "rpa")
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
#: where a network method not scored in selection takes its settings from
INHERIT = {
    "fomaml": "maml", "anil": "maml", "metasgd": "maml", "joint": "maml", "scratch": "joint",
    "ensemble": "maml",
}  # fmt: skip


def _merged(path: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """An earlier run's results.json, refused unless scored on the same episodes and folds and
    holding none of ``--methods``."""
    try:
        earlier = json.loads(Path(path).read_text())
        given, earlier["rows"] = earlier["args"], earlier["rows"]
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--merge {path!r}: not a results.json of this script ({error})")
    for name in ("test_subjects", "k_shots", "episodes", "seed", "folds"):
        if given.get(name) != getattr(args, name):
            parser.error(
                f"--merge {path!r} was scored with {name}={given.get(name)}, this run with "
                f"{getattr(args, name)}: not the same episodes"
            )
    shared = sorted(set(given.get("methods", [])) & set(args.methods))
    if shared:
        parser.error(f"--merge {path!r} already holds {shared}: leave them out of --methods")
    return earlier


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
    add("--test-subjects", default="1-19", help="subjects scored in the table (default 1-19)")
    add("--folds", default="5", help="'loso' or a number of groups of test subjects (default 5)")
    add("--selection-subjects", default="", help="subjects settings are chosen on (default: "
        "none, the first value of each setting, fixed in advance)")  # fmt: skip
    add(
        "--selection-methods",
        default=None,
        help="network methods whose settings are chosen on the selection subjects (default: all "
        "of --methods); the others take a chosen one's: the MAML family MAML's, scratch joint's",
    )
    add("--train-subjects", default=None, help="train once on these instead of on all others")
    add("--methods", default="maml,joint,ensemble,ts-lr,rpa")
    add("--k-shots", default="1,5,10", help="labelled trials per class of a test subject")
    add("--rpa-k-shots", default="5,10", help="K at which RPA is scored (seconds per episode)")
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
    add("--merge", default=None, help="results.json of an earlier run on the same test "
        "subjects, folds, K, episodes and seed: its methods join the table")  # fmt: skip
    add(
        "--reference",
        default=None,
        help="the method the others are compared with (default: the ensemble if run, else the "
        "best family method of the selection, else the first)",
    )
    add("--out", default="outputs/eeg")
    add("--no-progress-bar", action="store_true")
    add("--workers", type=int, default=1, help="folds scored at once, each in a process of "
        "its own (e.g. 2 on 2 cores)")  # fmt: skip
    add("--threads", type=int, default=1, help="torch intra-op threads (default 1, which "
        "never collapses when another process shares the cores)")  # fmt: skip
    args = parser.parse_args(argv)
    args.subjects = _subjects(args.subjects, "--subjects", parser)
    args.test_subjects = _subjects(args.test_subjects, "--test-subjects", parser)
    args.selection_subjects = _subjects(
        args.selection_subjects, "--selection-subjects", parser, empty=True
    )
    if args.train_subjects is not None:
        args.train_subjects = _subjects(args.train_subjects, "--train-subjects", parser)
    if args.folds != "loso":
        if not args.folds.isdigit() or not 1 <= int(args.folds) <= len(args.test_subjects):
            parser.error(f"--folds {args.folds!r}: 'loso' or a number from 1 to the "
                         f"{len(args.test_subjects)} test subjects")  # fmt: skip
        args.folds = int(args.folds)
    args.methods = _values(args.methods, str)
    unknown = sorted(set(args.methods) - set(NETWORKS + CLASSICAL))
    if unknown:
        parser.error(f"--methods {unknown} unknown; methods: {', '.join(NETWORKS + CLASSICAL)}")
    networks = [m for m in args.methods if m in NETWORKS and m != "ensemble"]
    args.selection_methods = (
        networks if args.selection_methods is None else _values(args.selection_methods, str)
    )
    if not set(args.selection_methods) <= set(networks):
        parser.error(f"--selection-methods {args.selection_methods} must be network --methods "
                     "other than ensemble (which takes MAML's setting)")  # fmt: skip
    args.k_shots = _values(args.k_shots, int)
    args.rpa_k_shots = _values(args.rpa_k_shots, int)
    args.alignment = _values(args.alignment, str)
    args.eval_steps = _values(args.eval_steps, int)
    if not set(args.alignment) <= {"none", "euclidean"} or not args.alignment:
        parser.error(f"--alignment takes none and/or euclidean, got {args.alignment}")
    for name in ("meta_steps", "episodes", "scratch_steps", "train_k_shot", "meta_batch_size",
                 "workers"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.k_shots or min(args.k_shots) < 1 or not args.eval_steps or min(args.eval_steps) < 0:
        parser.error("--k-shots must be >= 1 and --eval-steps >= 0")
    if not set(args.rpa_k_shots) <= set(args.k_shots):
        parser.error(f"--rpa-k-shots {args.rpa_k_shots} must be among --k-shots {args.k_shots}")
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
        args.merge = _merged(args.merge, args, parser)
    if args.mne_data is not None:
        folder = Path(args.mne_data).resolve()
        if not folder.is_dir():
            parser.error(f"--mne-data {args.mne_data!r} is not a folder")
        os.environ["MNE_DATA"] = os.environ["MNE_DATASETS_EEGBCI_PATH"] = str(folder)
        os.environ["MOABB_DOWNLOAD_PROVIDER"] = "upstream"
    return args


# arguments before the heavy imports below: --help and argument errors answer at once
ARGS = parse_args() if __name__ == "__main__" else None

import mne  # noqa: E402
import torch  # noqa: E402
from benchtools import quiet_lightning_info  # noqa: E402
from mne.decoding import CSP  # noqa: E402
from moabb.datasets import PhysionetMI  # noqa: E402
from moabb.paradigms import LeftRightImagery  # noqa: E402
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

from lightning_maml.functional import IMAML  # noqa: E402
from lightning_maml.models import EEGNet  # noqa: E402
from lightning_maml.study import (  # noqa: E402
    CalibrationStudy,
    Ensemble,
    NetworkMethod,
    PipelineMethod,
    RecentredTangentSpace,
    RiemannianProcrustes,
    StudyResult,
)


def eegnet(n_channels: int, n_samples: int, n_classes: int) -> EEGNet:
    """EEGNet-8,2 for the 80 Hz trials."""
    return EEGNet(n_channels, n_samples, n_classes, sampling_rate=80)


def eegnet_linear_head(n_channels: int, n_samples: int, n_classes: int) -> EEGNet:
    """EEGNet-8,2 with a plain linear output layer (ProtoMAML's prototype initialisation assumes
    one; the paper's max-norm bound would rescale it)."""
    return EEGNet(n_channels, n_samples, n_classes, sampling_rate=80, dense_max_norm=None)


def physionet_study(args: argparse.Namespace) -> CalibrationStudy:
    return CalibrationStudy(
        PhysionetMI(imagined=True, executed=False),
        LeftRightImagery(fmin=8, fmax=30, resample=80),
        args.subjects,
        k_shots=args.k_shots,
        episodes=args.episodes,
        seed=args.seed,
        store=Path(args.out) / "folds",
        cache_dir=str(Path(args.out) / "cache"),
        data_options={"standardize": "trial",
                      "dataset_attributes": {"hand_runs": [4, 8, 12], "feet_runs": []}},
        progress=not args.no_progress_bar,
    )  # fmt: skip


def network(method: str, setting: dict, args: argparse.Namespace) -> NetworkMethod:
    """The network method ``method`` with ``setting`` (alignment, eval_steps)."""
    common = dict(inner_lr=args.inner_lr, meta_lr=args.meta_lr, meta_steps=args.meta_steps,
                  k_shot=args.train_k_shot, query_size=args.train_query,
                  meta_batch_size=args.meta_batch_size, **setting)  # fmt: skip
    name = NAMES[method]
    if method == "scratch":
        return NetworkMethod(name, eegnet, meta_train=False,
                             **{**common, "inner_lr": args.scratch_lr})  # fmt: skip
    if method == "joint":
        return NetworkMethod(name, eegnet, inner_steps=0, **common)
    algorithm = IMAML(lam=1 / args.inner_lr) if method == "imaml" else method
    net = eegnet_linear_head if method == "protomaml" else eegnet
    return NetworkMethod(name, net, algorithm=algorithm, inner_steps=args.inner_steps, **common)


def methods_of(args: argparse.Namespace, chosen: dict[str, dict]) -> list:
    """Every method of ``--methods`` (network ones with their ``chosen`` settings)."""
    out = []
    for method in args.methods:
        if method == "ensemble":
            members = [network("maml", chosen["ensemble"], args), RecentredTangentSpace()]
            out.append(Ensemble(NAMES["ensemble"], members))
        elif method in NETWORKS:
            out.append(network(method, chosen[method], args))
        elif method == "csp-lda":
            out += [PipelineMethod(f"CSP+LDA {name}", csp_lda(), calibrate=refit)
                    for name, refit in (("zero-shot", False), ("+ K", True))]  # fmt: skip
        elif method == "ts-lr":
            out += [RecentredTangentSpace(mode=m)
                    for m in ("zero-shot", "transductive", "calibrated")]  # fmt: skip
        else:
            out.append(RiemannianProcrustes(k_shots=args.rpa_k_shots))
    return out


def csp_lda():
    return make_pipeline(
        CSP(n_components=4, reg="ledoit_wolf", log=True), LinearDiscriminantAnalysis()
    )


def candidates(method: str, args: argparse.Namespace) -> list[dict]:
    if method == "scratch":
        return [{"alignment": a, "eval_steps": args.scratch_steps} for a in args.alignment]
    return [{"alignment": a, "eval_steps": s}
            for a, s in itertools.product(args.alignment, args.eval_steps)]  # fmt: skip


def choose(study: CalibrationStudy, args: argparse.Namespace) -> tuple[dict, str | None, dict]:
    """Each selected network method's setting chosen on the selection subjects (the others take
    a selected method's, :data:`INHERIT`) and the best selected family method."""
    if not args.selection_subjects:  # fixed in advance: the first value of each
        return {m: candidates(m, args)[0] for m in args.methods if m in NETWORKS}, None, {}
    grid = {m: candidates(m, args) for m in args.selection_methods}
    pool = {}
    for method, settings in grid.items():
        pool[method] = [network(method, s, args) for s in settings]
        for option, s in zip(pool[method], settings):  # each candidate its own row
            option.name = f"{NAMES[method]} {s}"
    selection = study.select(pool, args.selection_subjects, workers=args.workers,
                             worker_setup=quiet_lightning_info)  # fmt: skip
    chosen = {m: grid[m][pool[m].index(selection.chosen[m])] for m in grid}
    for method in (m for m in args.methods if m in NETWORKS and m not in chosen):
        source = INHERIT.get(method)
        while source is not None and source not in chosen:
            source = INHERIT.get(source)
        setting = dict(chosen[source]) if source else candidates(method, args)[0]
        if method == "scratch":
            setting["eval_steps"] = args.scratch_steps
        chosen[method] = setting
    family = [m for m in grid if m in FAMILY]
    best = max(family, key=lambda m: max(selection.scores[m])) if family else None
    return chosen, best, {"selection_rows": selection.result.rows, "scores": selection.scores}


def main(args: argparse.Namespace) -> None:
    quiet_lightning_info()
    torch.set_num_threads(args.threads)
    mne.set_log_level("error")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    study = physionet_study(args)
    chosen, best, selection = choose(study, args)
    if selection:
        print(f"chosen on subjects {args.selection_subjects}: {chosen}; best of the family: {best}")
    folds = args.folds if args.train_subjects is None else "loso"
    result = study.run(methods_of(args, chosen), args.test_subjects, folds, args.train_subjects,
                       workers=args.workers, worker_setup=quiet_lightning_info)  # fmt: skip
    total = time.perf_counter() - start
    if args.merge:
        result = result + StudyResult(args.merge["rows"], args.k_shots)
    family = [NAMES[m] for m in args.methods if m in FAMILY]
    if args.reference is not None:
        reference = NAMES[args.reference]
    elif "ensemble" in args.methods:
        reference = NAMES["ensemble"]
    else:
        reference = NAMES[best] if best else (family[0] if family else result.methods[0])
    if reference not in result.methods:
        raise SystemExit(f"the reference {reference!r} has no rows: add it to --methods")
    settings = ", ".join(f"{NAMES[m]}: {s}" for m, s in chosen.items())
    skipped: dict[str, int] = {}
    for r in (r for r in result.rows if r.get("skipped_steps")):
        skipped[r["method"]] = skipped.get(r["method"], 0) + r["skipped_steps"]
    title = "\n".join(
        [f"2-way left/right fist imagery, test subjects {args.test_subjects} ({args.folds} "
         f"folds): query accuracy, each query trial classified alone, mean over subjects ± 95% "
         f"t interval over subjects ({args.episodes} episodes per subject and K); chance 0.5.",
         f"Settings: {settings or 'as given'}."]
        + ([f"Meta-steps skipped for a non-finite meta-gradient: {skipped}."] if skipped else [])
    )  # fmt: skip
    table = result.markdown(reference=reference, title=title)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    result.plot_accuracy(out / "eeg_accuracy.png", chance=0.5, title=(
        f"PhysioNet left/right fist imagery, {len(args.test_subjects)} test subjects"))  # fmt: skip
    result.plot_subjects(out / "eeg_subjects.png", sorted(args.k_shots)[len(args.k_shots) // 2],
                         reference)  # fmt: skip
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("mne_data", "merge")},
              "chosen": chosen, "best_family_method": best, **selection,
              **result.to_dict(reference), "total_seconds": total}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\ntotal {total:.0f} s; {out / 'results.md'}, {out / 'eeg_accuracy.png'}")


if __name__ == "__main__":
    main(ARGS)
