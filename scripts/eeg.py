"""Few-shot motor imagery on real EEG: leave-one-subject-out over PhysioNet subjects.

PhysioNet EEG Motor Movement/Imagery (MOABB's ``PhysionetMI``), imagined left vs right fist (run 4;
``--with-executed`` adds the executed run 3), cut by MOABB's ``LeftRightImagery`` (8-30 Hz, 3 s,
resampled to 80 Hz: 64 channels x 240 samples) and loaded through ``MOABBDataModule``. Each fold
holds one subject out: the networks are meta-trained (or trained) on the other subjects, then
every method is given the same K labelled trials per class of the held-out subject (the support
set) and scored on the rest of that subject's trials (the query set, never in a support set):

- MAML / first-order MAML: EEGNet-8,2 meta-trained on episodes of the training subjects, adapted
  with ``--eval-steps`` SGD steps of size ``--inner-lr`` on the support set;
- joint: the same network trained on the same episodes without an inner loop (``MAMLModule`` with
  ``inner_steps=0``), fine-tuned exactly like MAML;
- scratch: a fresh EEGNet trained on the support set alone (``--scratch-steps`` steps);
- CSP+LDA zero-shot: MNE's CSP (4 components, Ledoit-Wolf) and scikit-learn's LDA fitted on the
  training subjects' trials; CSP+LDA + K: refitted with the support trials added.

Every method sees the same folds and episodes. Hyper-parameters are fixed in advance (the defaults
below), chosen on no subject's results. Reports accuracy per K: the mean over folds and episodes
with a 95% interval over the pooled episodes, and the mean of the per-fold means with a t interval
over folds; and MAML's per-fold difference to each method with its t interval. Writes a figure,
JSON and a Markdown table.

    python scripts/eeg.py --mne-data ../shared/data/mne_data   # the five subjects, offline

``--mne-data`` points MNE (``MNE_DATA``, ``MNE_DATASETS_EEGBCI_PATH``) at a folder holding the
recordings and skips MOABB's mirror (``MOABB_DOWNLOAD_PROVIDER=upstream``); without it, MNE's
configured folder is used and missing recordings are downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mne-data", help="MNE data folder holding the PhysioNet recordings")
    parser.add_argument("--subjects", default="1,2,3,4,5", help="PhysioNet subjects")
    parser.add_argument("--folds", default=None, help="held-out subjects to run (default: all)")
    parser.add_argument("--with-executed", action="store_true", help="add the executed run 3")
    parser.add_argument("--k-shots", default=None, help="trials per class (default 1,3,5)")
    parser.add_argument("--train-k-shot", type=int, default=3, help="support per class, training")
    parser.add_argument("--train-query", type=int, default=4, help="query per class, training")
    parser.add_argument("--algorithms", default="maml,fomaml", help="MAML-family algorithms")
    parser.add_argument("--meta-steps", type=int, default=200)
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--inner-steps", type=int, default=1, help="inner steps, meta-training")
    parser.add_argument("--eval-steps", type=int, default=10, help="adaptation steps, test")
    parser.add_argument("--scratch-steps", type=int, default=100)
    parser.add_argument("--scratch-lr", type=float, default=0.1)
    parser.add_argument("--episodes", type=int, default=20, help="test episodes per fold and K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/eeg")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, which never collapses; on a machine of your own "
        "EEGNet runs about 1.5x faster with 2 on 2 cores, and 11x slower when another process "
        "shares them)",
    )
    args = parser.parse_args()
    args.subjects = [int(s) for s in args.subjects.split(",")]
    args.folds = args.subjects if args.folds is None else [int(s) for s in args.folds.split(",")]
    default_k = "1,3,5,10" if args.with_executed else "1,3,5"
    args.k_shots = [int(k) for k in (args.k_shots or default_k).split(",")]
    args.algorithms = args.algorithms.split(",")
    if len(args.subjects) < 2:
        parser.error(f"--subjects needs at least 2 subjects, got {args.subjects}")
    if not set(args.folds) <= set(args.subjects):
        parser.error(f"--folds {args.folds} must be among --subjects {args.subjects}")
    for name in ("meta_steps", "episodes", "eval_steps", "scratch_steps", "train_k_shot"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.k_shots) < 1:
        parser.error(f"--k-shots must be >= 1, got {args.k_shots}")
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
    adapted_accuracies,
    cpu_trainer,
    markdown_table,
    mean_and_ci95,
    plot_accuracy_vs_k,
    quiet_lightning_info,
)
from mne.decoding import CSP  # noqa: E402
from moabb.datasets import PhysionetMI  # noqa: E402
from moabb.paradigms import LeftRightImagery  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lightning_maml import Episode, MAMLModule  # noqa: E402
from lightning_maml.datamodules import MOABBDataModule  # noqa: E402
from lightning_maml.models import EEGNet  # noqa: E402

NAMES = {"maml": "MAML", "fomaml": "first-order MAML", "reptile": "Reptile", "anil": "ANIL"}
NAMES.update({"metasgd": "Meta-SGD", "maml++": "MAML++"})
BASELINES = ["joint", "scratch", "CSP+LDA zero-shot", "CSP+LDA + K"]


def make_data(test_subject: int, args: argparse.Namespace) -> MOABBDataModule:
    """The fold's data: the other subjects meta-train, ``test_subject`` is held out."""
    dataset = PhysionetMI(imagined=True, executed=args.with_executed)
    runs = [4, 3] if args.with_executed else [4]
    return MOABBDataModule(
        dataset,
        LeftRightImagery(fmin=8, fmax=30, resample=80),
        train_subjects=[s for s in args.subjects if s != test_subject],
        val_subjects=[],
        test_subjects=[test_subject],
        n_way=2,
        k_shot=args.train_k_shot,
        query_size=args.train_query,
        meta_batch_size=args.meta_batch_size,
        episodes_per_epoch=50 * args.meta_batch_size,
        standardize="trial",
        cache_dir=str(Path(args.out) / "cache"),
        seed=args.seed,
        dataset_attributes={"hand_runs": runs, "feet_runs": []},
    )


def make_net(data: MOABBDataModule) -> nn.Module:
    x = data.data["train"][0]
    return EEGNet(x.shape[1], x.shape[2], len(data.classes), sampling_rate=80)


def train(data: MOABBDataModule, algorithm: str | None, args: argparse.Namespace) -> nn.Module:
    """Meta-train with ``algorithm``, or jointly train (``None``: no inner loop), EEGNet."""
    pl.seed_everything(args.seed, verbose=False)
    net = make_net(data)
    module = MAMLModule(
        net,
        loss="cross_entropy",
        inner_lr=args.inner_lr,
        inner_steps=0 if algorithm is None else args.inner_steps,
        algorithm=algorithm or "maml",
        meta_lr=args.meta_lr,
    )
    batches_per_epoch = -(-data.episodes_per_epoch // data.meta_batch_size)
    trainer = cpu_trainer(args.meta_steps, batches_per_epoch, progress_bar=not args.no_progress_bar)
    trainer.fit(module, data)
    return net.eval()


def held_out_episodes(y: np.ndarray, k: int, fold: int, args: argparse.Namespace) -> list[tuple]:
    """``--episodes`` splits of a subject's trials: per class ``k`` support trials and, as the
    query set, ``q`` others (``q`` = the smallest class's count minus ``k``, the same for every
    episode). Seeded by (seed, fold, k): every method sees the same episodes."""
    classes = sorted(set(y.tolist()))
    q = min(int((y == c).sum()) for c in classes) - k
    if q < 1:
        raise ValueError(f"K={k} leaves no query trial (classes of {q + k} trials)")
    rng = np.random.default_rng([args.seed, fold, k])
    episodes = []
    for _ in range(args.episodes):
        support, query = [], []
        for c in classes:
            order = rng.permutation(np.flatnonzero(y == c))
            support.append(order[:k])
            query.append(order[k : k + q])
        episodes.append((np.concatenate(support), np.concatenate(query)))
    return episodes


def episode_batch(x: torch.Tensor, y: torch.Tensor, episodes: list[tuple]) -> Episode:
    """The held-out episodes (support and query trial indices) as one batch."""
    return Episode(
        torch.stack([x[s] for s, _ in episodes]),
        torch.stack([y[s] for s, _ in episodes]),
        torch.stack([x[q] for _, q in episodes]),
        torch.stack([y[q] for _, q in episodes]),
    )


def csp_lda():
    return make_pipeline(
        CSP(n_components=4, reg="ledoit_wolf", log=True), LinearDiscriminantAnalysis()
    )


def csp_accuracies(
    train_x: np.ndarray,
    train_y: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    episodes: list[tuple],
    refit: bool,
) -> list[float]:
    """CSP+LDA query accuracy per episode: fitted on the training subjects' trials, and with
    ``refit`` on those and the episode's support trials."""
    zero_shot = None if refit else csp_lda().fit(train_x, train_y)
    results = []
    for support, query in episodes:
        model = zero_shot
        if refit:
            fit_x = np.concatenate([train_x, x[support]])
            model = csp_lda().fit(fit_x, np.concatenate([train_y, y[support]]))
        results.append(float((model.predict(x[query]) == y[query]).mean()))
    return results


def run_fold(fold: int, args: argparse.Namespace, progress: tqdm) -> list[dict]:
    data = make_data(fold, args)
    data.prepare_data()
    data.setup("fit")
    progress.set_postfix_str(f"subject {fold} held out: training")
    models = {NAMES.get(a, a): train(data, a, args) for a in args.algorithms}
    models["joint"] = train(data, None, args)
    torch.manual_seed(args.seed + fold)
    scratch = make_net(data).eval()
    x, y, _ = data.data["test"]
    # the classical baseline on the paradigm's trials, unstandardised (CSP uses their covariance)
    raw = {s: data.load_subject(s) for s in args.subjects}
    train_x = np.concatenate([raw[s][0] for s in data.splits["train"]]).astype(np.float64)
    train_y = np.concatenate([raw[s][1] for s in data.splits["train"]])
    test_x, test_y = raw[fold][0].astype(np.float64), raw[fold][1]
    assert (np.asarray(data.classes)[y.numpy()] == test_y).all()  # one trial order
    rows = []
    for k in args.k_shots:
        episodes = held_out_episodes(y.numpy(), k, fold, args)
        batch = episode_batch(x, y, episodes)
        # a few episodes per call: memory stays small
        results = {
            name: adapted_accuracies(net, batch, args.inner_lr, args.eval_steps, chunk=8)
            for name, net in models.items()
        }
        results["scratch"] = adapted_accuracies(
            scratch, batch, args.scratch_lr, args.scratch_steps, chunk=8
        )
        for refit, name in ((False, "CSP+LDA zero-shot"), (True, "CSP+LDA + K")):
            results[name] = csp_accuracies(train_x, train_y, test_x, test_y, episodes, refit)
        for name, accuracies in results.items():
            rows.append({"method": name, "K": k, "fold": fold, "accuracies": accuracies})
        progress.update()
    return rows


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t interval (NaN half-width for one value)."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))


def summarise(rows: list[dict], methods: list[str], args: argparse.Namespace) -> list[dict]:
    summary = []
    for method in methods:
        for k in args.k_shots:
            cells = [r for r in rows if r["method"] == method and r["K"] == k]
            pooled = [a for r in cells for a in r["accuracies"]]
            mean, ci = mean_and_ci95(pooled)
            fold_means = [float(np.mean(r["accuracies"])) for r in cells]
            _, fold_ci = t_interval(fold_means)
            summary.append(
                {
                    "method": method,
                    "K": k,
                    "accuracy": mean,
                    "ci95_episodes": ci,
                    "ci95_folds": fold_ci,
                    "fold_means": fold_means,
                }
            )
    return summary


def differences(summary: list[dict], reference: str, args: argparse.Namespace) -> list[dict]:
    """Per K, ``reference`` minus each other method, per fold: mean and t interval."""
    out = []
    for k in args.k_shots:
        mine = next(s for s in summary if s["method"] == reference and s["K"] == k)["fold_means"]
        for s in summary:
            if s["K"] != k or s["method"] == reference:
                continue
            mean, ci = t_interval([a - b for a, b in zip(mine, s["fold_means"])])
            out.append({"K": k, "versus": s["method"], "difference": mean, "ci95_folds": ci})
    return out


def markdown(summary: list[dict], diffs: list[dict], reference: str, args) -> str:
    trials = "imagined and executed" if args.with_executed else "imagined"
    columns = [f"K={k}" for k in args.k_shots]
    accuracy = {
        method: [
            f"{s['accuracy']:.3f} ± {s['ci95_episodes']:.3f} [± {s['ci95_folds']:.3f}]"
            for s in summary
            if s["method"] == method
        ]
        for method in dict.fromkeys(s["method"] for s in summary)
    }
    difference = {
        versus: [
            f"{d['difference']:+.3f} ± {d['ci95_folds']:.3f}"
            for d in diffs
            if d["versus"] == versus
        ]
        for versus in dict.fromkeys(d["versus"] for d in diffs)
    }
    lines = [
        f"2-way left/right fist ({trials} trials), leave-one-subject-out over subjects "
        f"{args.subjects}: query accuracy, mean over {len(args.folds)} folds x {args.episodes} "
        "episodes ± 95% interval over episodes [± t interval over folds]; chance 0.5.",
        "",
        *markdown_table("method", columns, accuracy),
        "",
        f"{reference} minus each method, per fold (mean ± t interval over folds):",
        "",
        *markdown_table("versus", columns, difference),
    ]
    return "\n".join(lines)


def plot(summary: list[dict], args: argparse.Namespace, path: Path) -> None:
    plot_accuracy_vs_k(
        summary,
        "ci95_folds",
        0.5,
        args.k_shots,
        (
            "K (labelled trials per class of the held-out subject)",
            "query accuracy (± t interval over folds)",
            f"PhysioNet left/right fist imagery, leave-one-subject-out ({len(args.folds)})",
        ),
        path,
        (6.5, 4.2),
    )


def main(args: argparse.Namespace) -> None:
    quiet_lightning_info()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mne.set_log_level("error")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    progress = tqdm(
        total=len(args.folds) * len(args.k_shots), desc="folds x K", disable=args.no_progress_bar
    )
    rows = []
    for fold in args.folds:
        rows += run_fold(fold, args, progress)
    progress.close()
    total = time.perf_counter() - start

    methods = [NAMES.get(a, a) for a in args.algorithms] + BASELINES
    summary = summarise(rows, methods, args)
    reference = methods[0]
    diffs = differences(summary, reference, args)
    table = markdown(summary, diffs, reference, args)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    figure = out / "eeg_accuracy.png"
    plot(summary, args, figure)
    print(f"\ntotal {total:.0f} s; table: {out / 'results.md'}, figure: {figure}")
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "summary": summary,
                "differences": diffs,
                "rows": rows,
                "total_seconds": total,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(ARGS)
