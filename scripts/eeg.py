"""Cross-subject few-shot motor imagery: MAML vs joint training + fine-tuning vs from scratch.

EEGNet-8,2 on the synthetic motor-imagery dataset (``SyntheticMotorImagery``, through MOABB's
``MotorImagery`` paradigm and ``MOABBDataModule``; a task is a subject). Subjects are split into
meta-train and held-out test subjects. Three models are compared on the held-out subjects, each
adapted on K labelled trials per class of a subject and scored on other trials of that subject:

- MAML: EEGNet meta-trained with second-order MAML across the training subjects, then adapted with
  ``--eval-steps`` SGD steps of size ``--inner-lr`` on the K trials;
- joint: EEGNet trained on all training subjects' trials at once (``MAMLModule`` with
  ``inner_steps=0``: the query loss at the shared parameters; same episodes, steps and optimizer
  as MAML), then fine-tuned exactly like MAML;
- scratch: a fresh EEGNet trained only on the K trials (``--scratch-steps`` SGD steps of size
  ``--scratch-lr``).

Reports query accuracy (mean and 95% CI over episodes) for K = 1, 5, 10, 20 trials per class,
saves a plot of accuracy vs K, a JSON of the results and the wall time.

    python scripts/eeg.py                      # a few minutes on 2 CPU cores
    python scripts/eeg.py --meta-steps 1000    # longer meta-training
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=12, help="synthetic subjects in all")
    parser.add_argument("--test-subjects", type=int, default=4, help="held out (the last ones)")
    parser.add_argument("--trials-per-class", type=int, default=40)
    parser.add_argument("--snr", type=float, default=0.6, help="SyntheticMotorImagery snr")
    parser.add_argument("--classes", type=int, default=3, choices=[2, 3])
    parser.add_argument("--k-shots", default="1,5,10,20", help="trials per class to adapt on")
    parser.add_argument("--query", type=int, default=15, help="query trials per class")
    parser.add_argument("--train-k-shot", type=int, default=5, help="support per class, training")
    parser.add_argument("--meta-steps", type=int, default=400)
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--inner-steps", type=int, default=1, help="inner steps, meta-training")
    parser.add_argument("--eval-steps", type=int, default=10, help="adaptation steps, test")
    parser.add_argument("--scratch-steps", type=int, default=100)
    parser.add_argument("--scratch-lr", type=float, default=0.1)
    parser.add_argument("--episodes", type=int, default=40, help="test episodes per K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/eeg")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, all cores; EEGNet's convolutions use "
        "them, but on cores another process shares, 1 is faster)",
    )
    args = parser.parse_args()
    args.k_shots = [int(k) for k in args.k_shots.split(",")]
    if not 1 <= args.test_subjects < args.subjects:
        parser.error(
            f"--test-subjects must be in [1, {args.subjects - 1}], got {args.test_subjects}"
        )
    if max(args.k_shots) + args.query > args.trials_per_class:
        parser.error(
            f"--trials-per-class {args.trials_per_class} is below the largest K + --query "
            f"({max(args.k_shots)} + {args.query})"
        )
    for name in ("meta_steps", "episodes", "eval_steps", "scratch_steps", "query"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# arguments before the heavy imports below: --help and argument errors answer at once
ARGS = parse_args() if __name__ == "__main__" else None

import math  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import matplotlib  # noqa: E402
import mne  # noqa: E402
import torch  # noqa: E402
from benchtools import cpu_trainer, mean_and_ci95, quiet_lightning_info  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lightning_maml import Episode, MAMLModule  # noqa: E402
from lightning_maml.datamodules import MOABBDataModule  # noqa: E402
from lightning_maml.datamodules.synthetic_eeg import SyntheticMotorImagery  # noqa: E402
from lightning_maml.functional import meta_loss  # noqa: E402
from lightning_maml.models import EEGNet  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def make_data(args: argparse.Namespace) -> MOABBDataModule:
    dataset = SyntheticMotorImagery(
        n_subjects=args.subjects,
        trials_per_class=args.trials_per_class,
        events=("left_hand", "right_hand", "feet")[: args.classes],
        snr=args.snr,
        seed=args.seed,
    )
    subjects = list(dataset.subject_list)
    return MOABBDataModule(
        dataset,
        "MotorImagery",
        {"n_classes": args.classes, "resample": 64},
        train_subjects=subjects[: -args.test_subjects],
        val_subjects=[],
        test_subjects=subjects[-args.test_subjects :],
        n_way=args.classes,
        k_shot=args.train_k_shot,
        query_size=args.query,
        meta_batch_size=args.meta_batch_size,
        episodes_per_epoch=100 * args.meta_batch_size,
        cache_dir=None,
        seed=args.seed,
    )


def make_net(data: MOABBDataModule, args: argparse.Namespace) -> nn.Module:
    x = data.data["train"][0]
    return EEGNet(x.shape[1], x.shape[2], args.classes, sampling_rate=64)


def train(data: MOABBDataModule, inner_steps: int, args: argparse.Namespace) -> nn.Module:
    """Meta-train (inner_steps >= 1) or jointly train (inner_steps = 0) EEGNet."""
    pl.seed_everything(args.seed, verbose=False)
    net = make_net(data, args)
    module = MAMLModule(
        net,
        loss="cross_entropy",
        inner_lr=args.inner_lr,
        inner_steps=inner_steps,
        meta_lr=args.meta_lr,
    )
    batches_per_epoch = -(-data.episodes_per_epoch // data.meta_batch_size)
    trainer = cpu_trainer(args.meta_steps, batches_per_epoch, progress_bar=not args.no_progress_bar)
    trainer.fit(module, data)
    return net.eval()


def accuracies(net: nn.Module, episodes: Episode, lr: float, steps: int) -> list[float]:
    """Query accuracy of each episode after ``steps`` SGD steps on its support set."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    with torch.enable_grad():
        out = meta_loss(
            net,
            "cross_entropy",
            *episodes,
            inner_lr=lr,
            inner_steps=steps,
            algorithm="fomaml",
            params=params,
            track_initial_loss=False,
        )
    correct = out.query_predictions.argmax(-1) == episodes.query_y
    return correct.float().mean(1).tolist()


def main(args: argparse.Namespace) -> None:
    quiet_lightning_info()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mne.set_log_level("error")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"loading {args.subjects} synthetic subjects through MOABB ...", flush=True)
    data = make_data(args)
    data.prepare_data()
    data.setup("fit")
    load_seconds = time.perf_counter() - start
    models = {"MAML": train(data, args.inner_steps, args), "joint": train(data, 0, args)}
    torch.manual_seed(args.seed + 1)
    models["scratch"] = make_net(data, args).eval()
    train_seconds = time.perf_counter() - start - load_seconds

    rows = []
    chunk = 8  # test episodes per call: the progress bar moves every few seconds
    chunks = math.ceil(args.episodes / chunk)
    progress = tqdm(
        total=len(args.k_shots) * len(models) * chunks,
        desc="evaluating",
        disable=args.no_progress_bar,
    )
    for k in args.k_shots:
        test = data.episodes("test", args.episodes, seed=10_000 + k, k_shot=k)
        episodes = Episode(*(torch.stack(parts) for parts in zip(*test)))
        for name, net in models.items():
            lr, steps = (
                (args.scratch_lr, args.scratch_steps)
                if name == "scratch"
                else (args.inner_lr, args.eval_steps)
            )
            progress.set_postfix_str(f"K={k}, {name}")
            tic = time.perf_counter()
            per_episode = []
            for start_index in range(0, args.episodes, chunk):
                part = Episode(*(t[start_index : start_index + chunk] for t in episodes))
                per_episode += accuracies(net, part, lr, steps)
                progress.update()
            accuracy, ci = mean_and_ci95(per_episode)
            seconds = time.perf_counter() - tic
            rows.append({"model": name, "K": k, "accuracy": accuracy, "ci95": ci, "s": seconds})
    progress.close()
    total = time.perf_counter() - start

    chance = 1 / args.classes
    print(
        f"\nHeld-out subjects {data.splits['test']}: {args.classes}-way query accuracy "
        f"(chance {chance:.2f}), mean ± 95% CI over {args.episodes} episodes of "
        f"{args.query} query trials per class, after {args.meta_steps} meta-training steps:\n"
    )
    print("| model | " + " | ".join(f"K={k}" for k in args.k_shots) + " |")
    print("|---" * (len(args.k_shots) + 1) + "|")
    for name in models:
        cells = [f"{r['accuracy']:.3f} ± {r['ci95']:.3f}" for r in rows if r["model"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")

    figure = out / "eeg_accuracy.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in models:
        points = [r for r in rows if r["model"] == name]
        ax.errorbar(
            [r["K"] for r in points],
            [r["accuracy"] for r in points],
            yerr=[r["ci95"] for r in points],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.axhline(chance, color="grey", ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(args.k_shots, [str(k) for k in args.k_shots])
    ax.set_xlabel("K (labelled trials per class of the new subject)")
    ax.set_ylabel("query accuracy")
    ax.set_title(f"EEGNet, synthetic motor imagery, {args.classes}-way, held-out subjects")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    print(
        f"\ndata {load_seconds:.1f} s, training {train_seconds:.0f} s, total {total:.0f} s; "
        f"figure: {figure}"
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "test_subjects": data.splits["test"],
                "rows": rows,
                "load_seconds": load_seconds,
                "train_seconds": train_seconds,
                "total_seconds": total,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(ARGS)
