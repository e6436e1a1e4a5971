"""Sinusoid regression (Finn et al. 2017 §5.1): the MAML family vs joint training vs random.

Meta-trains each algorithm asked for (default MAML; ``--algorithms all``: MAML, first-order MAML,
Reptile, ANIL, Meta-SGD, MAML++, iMAML; ProtoMAML classifies, so it has no place here) and a
jointly trained baseline on the same task stream with
``Trainer.fit``, then adapts each (and a random initialisation) on the same held-out tasks with
K=5 and K=10 support points for 1 and 10 inner steps, and reports the mean query MSE with 95%
confidence intervals. Each algorithm adapts its own way (ANIL its last layer, Meta-SGD and MAML++
with their learned step sizes, iMAML its regularised steps, by default with
``lam = 1 / --inner-lr`` and one inner step); the baselines take plain SGD steps of
``--inner-lr``. Meta-steps whose meta-gradient is not finite (iMAML's, where a task's regularised
problem is not convex) are skipped and counted in the table. Saves a figure of the fits on one
held-out task.

    python scripts/sinusoid.py                       # about a minute and a half on 2 CPU cores
    python scripts/sinusoid.py --algorithms all      # the whole family, several minutes
    python scripts/sinusoid.py --iterations 70000    # the paper's schedule
    python scripts/sinusoid.py --compile             # torch.compile'd meta-gradient

The jointly trained baseline is the same network fitted directly to the query points of the same
tasks (``MAMLModule`` with ``inner_steps=0``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import torch
from benchtools import cpu_trainer, markdown_table, mean_and_ci95, quiet_lightning_info

from lightning_maml import MAMLModule
from lightning_maml.datamodules import SinusoidDataModule, sample_sinusoid_tasks
from lightning_maml.datamodules.sinusoid import seeded_generator
from lightning_maml.functional import ALGORITHMS, IMAML
from lightning_maml.models import MLP

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: the algorithms that apply to regression (ProtoMAML's head is a classifier's)
REGRESSION = [a for a in ALGORITHMS if a != "protomaml"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--iterations", type=int, default=15000, help="meta-iterations (paper: 70000)"
    )
    parser.add_argument("--meta-batch-size", type=int, default=25)
    parser.add_argument("--k-shot", type=int, default=10, help="support points while meta-training")
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--eval-tasks", type=int, default=600, help="held-out tasks (>= 100)")
    parser.add_argument(
        "--eval-query", type=int, default=100, help="query points per held-out task"
    )
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=["maml"],
        choices=[*REGRESSION, "all"],
        help="algorithms to meta-train and compare (default: maml)",
    )
    parser.add_argument(
        "--imaml-lam", type=float, default=100.0, help="iMAML's regularisation strength lam"
    )
    parser.add_argument(
        "--imaml-inner-steps", type=int, default=1, help="iMAML's inner steps in meta-training"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/sinusoid")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the MLP's small matrices gain nothing from more, "
        "and more collapse when another process shares the cores)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="meta-train with MAMLModule(compile=True) (torch.compile; needs a C++ compiler)",
    )
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    if args.eval_tasks < 100:
        parser.error(f"--eval-tasks must be >= 100, got {args.eval_tasks}")
    if "all" in args.algorithms:
        args.algorithms = list(REGRESSION)
    return args


NAMES = {
    "maml": "MAML",
    "fomaml": "first-order MAML",
    "reptile": "Reptile",
    "anil": "ANIL",
    "metasgd": "Meta-SGD",
    "maml++": "MAML++",
    "imaml": "iMAML",
}


def train(algorithm: str | None, args: argparse.Namespace) -> MAMLModule:
    """Meta-train with ``algorithm``, or jointly train (``None``: no inner loop), an MLP."""
    pl.seed_everything(args.seed, verbose=False)
    module = MAMLModule(
        MLP(),
        inner_lr=args.inner_lr,
        inner_steps=0
        if algorithm is None
        else args.imaml_inner_steps
        if algorithm == "imaml"
        else 1,
        algorithm=IMAML(lam=args.imaml_lam) if algorithm == "imaml" else algorithm or "maml",
        meta_lr=args.meta_lr,
        compile=args.compile,
        on_nonfinite="skip",  # counted and shown in the table
    )
    data = SinusoidDataModule(
        k_shot=args.k_shot,
        meta_batch_size=args.meta_batch_size,
        batches_per_epoch=min(args.iterations, 1000),
        seed=args.seed,
    )
    trainer = cpu_trainer(
        args.iterations, data.batches_per_epoch, progress_bar=not args.no_progress_bar
    )
    trainer.fit(module, data)
    return module


def evaluate(module: MAMLModule, k_shot: int, steps: int, args: argparse.Namespace) -> list[float]:
    """Per-task query MSE after ``steps`` inner steps (the module's algorithm, without a graph to
    the parameters) on ``k_shot`` points of each held-out task; the same tasks for every model."""
    tasks = sample_sinusoid_tasks(
        args.eval_tasks, k_shot, args.eval_query, generator=seeded_generator(args.seed, 99, k_shot)
    )
    return module.meta_forward(tasks, inner_steps=steps, train=False).query_losses.tolist()


def plot_fits(models: dict[str, MAMLModule], args: argparse.Namespace, path: Path) -> None:
    candidates, amplitude, phase = sample_sinusoid_tasks(
        50, args.k_shot, 1, generator=seeded_generator(args.seed, 98), return_parameters=True
    )
    i = int((amplitude >= 3.0).nonzero()[0])  # a task with a clearly visible shape
    episode = type(candidates)(*(t[i : i + 1] for t in candidates))
    x = torch.linspace(-5, 5, 200).view(-1, 1)
    truth = amplitude[i] * torch.sin(x - phase[i])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True)
    for ax, (name, module) in zip(axes, models.items()):
        ax.plot(x, truth, color="black", lw=2, label="ground truth")
        ax.scatter(
            episode.support_x[0],
            episode.support_y[0],
            color="red",
            zorder=5,
            label=f"{args.k_shot} support points",
        )
        with torch.enable_grad():
            for steps, style in ((0, ":"), (1, "--"), (10, "-")):
                calibrated = module.adapt(episode.support_x[0], episode.support_y[0], steps)
                with torch.no_grad():
                    prediction = calibrated(x)
                label = "before adaptation" if steps == 0 else f"after {steps} step(s)"
                ax.plot(x, prediction, style, lw=1.5, label=label)
        ax.set_title(name)
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Sinusoid regression, K={args.k_shot}, inner lr {args.inner_lr}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    quiet_lightning_info()
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = {NAMES[a]: train(a, args) for a in args.algorithms}
    models["pretrained"] = train(None, args)
    torch.manual_seed(args.seed + 1)
    models["random init"] = MAMLModule(MLP(), inner_lr=args.inner_lr)
    train_seconds = time.perf_counter() - start

    rows = []
    for name, module in models.items():
        for k_shot in (5, 10):
            for steps in (1, 10):
                losses = evaluate(module, k_shot, steps, args)
                mse, ci = mean_and_ci95(losses)
                diverged = sum(not math.isfinite(v) for v in losses)
                rows.append(
                    {
                        "model": name,
                        "K": k_shot,
                        "steps": steps,
                        "mse": mse,
                        "ci95": ci,
                        "median": statistics.median(losses) if not diverged else math.nan,
                        "diverged": diverged,
                    }
                )
    skipped = {name: module.nonfinite_steps for name, module in models.items()}
    for row in rows:
        row["skipped_steps"] = skipped[row["model"]]
    cells = {
        name
        + (
            f" ({skipped[name]} of {args.iterations} meta-steps skipped)" if skipped[name] else ""
        ): [
            f"diverges on {r['diverged']} of {args.eval_tasks} tasks"
            if r["diverged"]
            else f"{r['mse']:.3f} ± {r['ci95']:.3f}"
            for r in rows
            if r["model"] == name
        ]
        for name in models
    }
    columns = ["K=5, 1 step", "K=5, 10 steps", "K=10, 1 step", "K=10, 10 steps"]
    table = [
        f"Held-out query MSE, mean ± 95% CI over {args.eval_tasks} tasks ({args.eval_query} query "
        f"points each), after {args.iterations} meta-iterations ('diverges': some tasks' loss "
        "overflowed to inf or NaN; 'meta-steps skipped': steps whose meta-gradient was not "
        "finite, left out of training):",
        "",
        *markdown_table("model", columns, cells),
    ]
    print("\n" + "\n".join(table))
    (out / "results.md").write_text("\n".join(table) + "\n")
    figure = out / "sinusoid_fits.png"
    shown = [n for n in ("MAML", "Meta-SGD") if n in models] + ["pretrained", "random init"]
    plot_fits({n: models[n] for n in shown}, args, figure)
    total = time.perf_counter() - start
    print(
        f"\ntraining {train_seconds:.0f} s, total {total:.0f} s; table: {out / 'results.md'}, "
        f"figure: {figure}"
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "rows": rows,
                "train_seconds": train_seconds,
                "total_seconds": total,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
