"""Few-shot digits, the example project (examples/digits): MAML vs normal training + fine-tuning.

scikit-learn's bundled digits (8x8 images, no download): digits 0-6 are seen in training, 7-9 never.
Every method is tested on the same 3-way K-shot episodes of digits 7-9 (K labelled images per
digit to adapt on, 10 other images per digit to score) and uses the example's network (an MLP
64-64-64 with a 3-way output):

- MAML: ``examples/digits/few_shot.py``'s setup, meta-trained on episodes of digits 0-6 (one
  model per K); ProtoMAML and iMAML (``lam = 1 / inner_lr``) the same with their algorithm, and
  adapted their own way (ProtoMAML from the prototype head, iMAML by its regularised steps);
- normal + fine-tuning: ``examples/digits/classifier.py``'s classifier trained on digits 0-6
  (7-way), its output layer replaced by a fresh 3-way one, every parameter fine-tuned;
- scratch: a fresh network trained on the support images alone.

Each method adapts with SGD on the support images; its step size (0.01, 0.1, 0.4 or 1.0)
and number of steps (10 or 100) are chosen, the same way for all three, as the best on 200
episodes of the training digits 0-6, never on 7-9. Reports accuracy (mean and 95% interval over
episodes), the chosen settings, a figure, JSON and the wall time.

    python scripts/digits.py      # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from benchtools import (
    adapted_accuracies,
    markdown_table,
    mean_and_ci95,
    plot_accuracy_vs_k,
    quiet_lightning_info,
)
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
from classifier import Classifier, Digits, DigitsDataModule, make_net  # noqa: E402

from lightning_maml import Episode, MAMLModule  # noqa: E402
from lightning_maml.datamodules import FewShotDataModule  # noqa: E402
from lightning_maml.functional import IMAML, ProtoMAML  # noqa: E402

SEEN, UNSEEN = list(range(7)), [7, 8, 9]
STEP_SIZES = (0.01, 0.1, 0.4, 1.0)
STEPS = (10, 100)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k-shots", default="1,5", help="labelled images per digit")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of each model")
    parser.add_argument("--episodes", type=int, default=400, help="test episodes per K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/digits")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--imaml-inner-steps",
        type=int,
        default=1,
        help="iMAML's inner steps in meta-training (its implicit meta-gradient is exact at the "
        "inner problem's solution, which more steps approach; the others take 1)",
    )
    args = parser.parse_args()
    args.k_shots = [int(k) for k in args.k_shots.split(",")]
    for name in ("epochs", "episodes", "imaml_inner_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def trainer(args: argparse.Namespace) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
        limit_val_batches=0,
    )


def episodes(
    classes: list[int], k: int, args: argparse.Namespace, seed: int, count: int | None = None
) -> Episode:
    """``count`` (default ``args.episodes``) 3-way episodes of ``classes``, K support and 10
    query images per digit."""
    data = FewShotDataModule(train=Digits(classes), n_way=3, k_shot=k, query_size=10, seed=seed)
    data.setup()
    drawn = data.episodes("train", args.episodes if count is None else count)
    return Episode(*(torch.stack(parts) for parts in zip(*(drawn[i] for i in range(len(drawn))))))


INNER_LR = 0.4  # examples/digits/few_shot.py's
#: the meta-learning methods: how each meta-trains (its algorithm) and adapts (first order)
META = {
    "MAML": (lambda: "maml", lambda: "fomaml"),
    "ProtoMAML": (ProtoMAML, lambda: ProtoMAML(first_order=True)),
    "iMAML": (lambda: IMAML(lam=1 / INNER_LR), lambda: IMAML(lam=1 / INNER_LR, first_order=True)),
}


def meta_inner_steps(name: str, args: argparse.Namespace) -> int:
    return args.imaml_inner_steps if name == "iMAML" else 1


def train_maml(
    k: int, args: argparse.Namespace, algorithm="maml", inner_steps: int = 1
) -> tuple[nn.Module, int]:
    """examples/digits/few_shot.py's model and data, meta-trained with K support images: the
    network and how many meta-steps were skipped for a non-finite meta-gradient."""
    pl.seed_everything(args.seed, verbose=False)
    classifier = Classifier(n_classes=3)
    data = FewShotDataModule(
        train=Digits(SEEN),
        n_way=3,
        k_shot=k,
        query_size=10,
        meta_batch_size=8,
        episodes_per_epoch=400,
        seed=args.seed,
    )
    module = MAMLModule(
        classifier.net,
        loss="cross_entropy",
        inner_lr=INNER_LR,
        inner_steps=inner_steps,
        algorithm=algorithm,
        optimizers_from=classifier,
        on_nonfinite="skip",  # counted and shown in the table
    )
    trainer(args).fit(module, data)
    return classifier.net, module.nonfinite_steps


def train_normally(args: argparse.Namespace) -> nn.Module:
    """examples/digits/classifier.py's classifier, trained on digits 0-6 only."""
    pl.seed_everything(args.seed, verbose=False)
    classifier = Classifier(n_classes=len(SEEN))
    trainer(args).fit(classifier, DigitsDataModule(classes=tuple(SEEN)))
    return classifier.net


def with_new_head(body_from: nn.Module | None, seed: int) -> nn.Module:
    """The example's network with a fresh 3-way output layer on ``body_from``'s other layers
    (``None``: all fresh)."""
    torch.manual_seed(seed)
    net = make_net(3)
    if body_from is not None:
        body = {n: p for n, p in body_from.state_dict().items() if not n.startswith("4.")}
        net.load_state_dict(body, strict=False)
    return net


def best_adaptation(
    net: nn.Module, k: int, args: argparse.Namespace, algorithm="fomaml"
) -> tuple[float, int]:
    """The (step size, steps) with the best accuracy on episodes of the training digits."""
    seen = episodes(SEEN, k, args, seed=args.seed + 1, count=200)
    scores = {
        (lr, steps): sum(adapted_accuracies(net, seen, lr, steps, algorithm=algorithm))
        for lr in STEP_SIZES
        for steps in STEPS
    }
    return max(scores, key=scores.get)


def main() -> None:
    quiet_lightning_info()
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    normal = train_normally(args)
    rows = []
    progress = tqdm(
        total=(len(META) + 2) * len(args.k_shots),
        desc="choosing steps and testing",
        disable=args.no_progress_bar,
    )
    for k in args.k_shots:
        test = episodes(UNSEEN, k, args, seed=args.seed + 100 + k)
        models = {}  # name: (network, how it adapts, meta-steps skipped in its training)
        for name, (make, adapt) in META.items():
            net, skipped = train_maml(k, args, make(), meta_inner_steps(name, args))
            models[name] = (net, adapt(), skipped)
        models["normal + fine-tuning"] = (with_new_head(normal, args.seed), "fomaml", 0)
        models["scratch"] = (with_new_head(None, args.seed), "fomaml", 0)
        for name, (net, adapting, skipped) in models.items():
            lr, steps = best_adaptation(net, k, args, adapting)
            accuracies = adapted_accuracies(net, test, lr, steps, algorithm=adapting)
            accuracy, ci = mean_and_ci95(accuracies)
            rows.append(
                {
                    "method": name,
                    "K": k,
                    "accuracy": accuracy,
                    "ci95": ci,
                    "lr": lr,
                    "steps": steps,
                    "skipped_steps": skipped,
                }
            )
            progress.update()
    progress.close()
    total = time.perf_counter() - start

    cells = {
        name: [
            f"{r['accuracy']:.3f} ± {r['ci95']:.3f} ({r['steps']} steps of {r['lr']}"
            + (f"; {r['skipped_steps']} meta-steps skipped" if r["skipped_steps"] else "")
            + ")"
            for r in rows
            if r["method"] == name
        ]
        for name in dict.fromkeys(r["method"] for r in rows)
    }
    lines = [
        f"3-way accuracy on digits 7-9 (never seen in training), mean ± 95% CI over "
        f"{args.episodes} episodes of 10 query images per digit; chance 0.33:",
        "",
        *markdown_table("method", [f"K={k}" for k in args.k_shots], cells),
    ]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    figure = out / "digits_accuracy.png"
    plot_accuracy_vs_k(
        rows,
        "ci95",
        1 / 3,
        args.k_shots,
        (
            "K (labelled images per unseen digit)",
            "query accuracy",
            "Digits 7-9, 3-way, after training on 0-6",
        ),
        figure,
        (5.5, 4),
    )
    print(f"\ntotal {total:.0f} s; table: {out / 'results.md'}, figure: {figure}")
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "total_seconds": total}, indent=2)
    )


if __name__ == "__main__":
    main()
