"""Where a ``Trainer.fit`` step's time goes, against the bare engine step and learn2learn's loop.

Sinusoid MLP (1-40-40-1), 25 tasks of 10 + 10 points, 1 inner step, second order, one thread.
Each row is the median time per step over ``--steps`` steps after 50 warm-up steps (per-step
medians are robust to the machine's hiccups; means are printed beside them), the median of
``--repeats`` runs taken in turn, so every row sees the same machine:

- ``autograd loop``: learn2learn's algorithm in plain autograd (``bench.py``'s), + Adam;
- ``bare step``: ``MAMLModule.meta_forward`` + backward + Adam on one fixed batch;
- ``bare step, fresh batches``: the same, each batch drawn from ``SinusoidDataModule``'s loader;
- ``Trainer(barebones=True).fit``, a ``training_step`` that returns ``meta_forward(batch).loss``
  and nothing else: Lightning's own loop, hooks and data fetching, with every optional feature
  Lightning can switch off switched off (its floor);
- ``Trainer.fit``, the same step: the same with the Trainer's defaults (no progress bar, logger
  or checkpoints, as below);
- ``Trainer.fit, no logging, no check``: ``MAMLModule`` with ``self.log`` and the non-finite
  check switched off (a subclass): + the module's bookkeeping (metric values, running sums);
- ``+ non-finite check``: the check on, logging off;
- ``Trainer.fit`` (``+ logging``): the module as it ships;
- ``Trainer.fit compiled``: the same with ``compile=True``.

The Trainer has no progress bar, logger or checkpoints; the step values still go through
``self.log`` (Lightning computes them for any logger and for ``callback_metrics``).

A second table times Lightning alone, on a module with one 10-number parameter whose step is a
squared distance to the batch (Adam): the same step in a plain loop, under ``Trainer.fit``, and
with one and four values logged through ``self.log`` each step.

    python scripts/bench_fit.py [--steps 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from bench import autograd_loop_meta_gradient, sinusoid_workload
from benchtools import print_table, quiet_lightning_info, write_json

from lightning_maml import MAMLModule
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP

WARMUP = 50


class Unlogged(MAMLModule):
    """The shipped module with its step logging switched off."""

    def log_dict(self, *args, **kwargs) -> None:
        pass

    def log(self, *args, **kwargs) -> None:
        pass


class Unchecked(Unlogged):
    """... and its non-finite check."""

    def on_before_optimizer_step(self, optimizer) -> None:
        pass


class LossOnly(Unchecked):
    """... and its bookkeeping: the step is the meta-loss, what Lightning needs and no more."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.meta_forward(batch).loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        pass


def per_step(stamps: list[float]) -> tuple[float, float]:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps), statistics.fmean(gaps)


def data() -> SinusoidDataModule:
    return SinusoidDataModule(meta_batch_size=25, batches_per_epoch=10_000)


#: a Trainer without progress bar, logger, model summary or checkpoints
QUIET = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def timed_fit(
    module: pl.LightningModule, data: object, steps: int, **options: object
) -> tuple[float, float]:
    """Per-step (median, mean) seconds of ``Trainer.fit`` over ``steps`` steps after warm-up."""
    stamps: list[float] = []

    class Stamp(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step >= WARMUP:
                stamps.append(time.perf_counter())

    trainer = pl.Trainer(
        max_steps=WARMUP + steps + 1,
        callbacks=[Stamp()],
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        **options,
    )
    trainer.fit(module, data)
    return per_step(stamps)


def fit(
    cls: type[MAMLModule], steps: int, compile: bool = False, barebones: bool = False
) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    module = cls(MLP(), loss="mse", inner_lr=0.01, inner_steps=1, compile=compile)
    # barebones sets the quiet options itself (and refuses them); callbacks still run
    options = {"barebones": True} if barebones else QUIET
    return timed_fit(module, data(), steps, **options)


class OneParameter(pl.LightningModule):
    """The least a Lightning module can be: one parameter, a squared distance, Adam."""

    def __init__(self, logged: int = 0) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(10))
        self.logged = logged

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = ((self.p - batch[0][0]) ** 2).sum()
        for k in range(self.logged):
            self.log(f"train/value{k}", loss.detach(), batch_size=1)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.p], lr=1e-3)


def tiny_data(steps: int) -> torch.utils.data.DataLoader:
    values = torch.randn(WARMUP + steps + 1, 10, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(values), batch_size=1)


def tiny_fit(steps: int, logged: int) -> tuple[float, float]:
    return timed_fit(OneParameter(logged), tiny_data(steps), steps, **QUIET)


def tiny_loop(steps: int) -> tuple[float, float]:
    module = OneParameter()
    optimizer = module.configure_optimizers()
    stamps = []
    for i, batch in enumerate(tiny_data(steps)):
        if i >= WARMUP:
            stamps.append(time.perf_counter())
        optimizer.zero_grad()
        module.training_step(batch, i).backward()
        optimizer.step()
    return per_step(stamps)


def bare(steps: int, fresh: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    module = MAMLModule(MLP(), loss="mse", inner_lr=0.01, inner_steps=1)
    optimizer = module.configure_optimizers()
    batches = iter(data().train_dataloader())
    batch = next(batches)
    stamps = []
    for i in range(WARMUP + steps + 1):
        if i >= WARMUP:
            stamps.append(time.perf_counter())
        if fresh:
            batch = next(batches)
        optimizer.zero_grad()
        module.meta_forward(batch).loss.backward()
        optimizer.step()
    return per_step(stamps)


def autograd(steps: int) -> tuple[float, float]:
    w = sinusoid_workload(1, "maml")
    torch.manual_seed(0)
    net = w.make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    stamps = []
    for i in range(10 + steps // 4 + 1):  # 14 ms a step: fewer suffice
        if i >= 10:
            stamps.append(time.perf_counter())
        optimizer.zero_grad()
        autograd_loop_meta_gradient(net, w, w.batch)
        optimizer.step()
    return per_step(stamps)


def main() -> None:
    quiet_lightning_info()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default="outputs/bench_fit.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {
        "autograd loop": lambda: autograd(args.steps),
        "bare step": lambda: bare(args.steps, fresh=False),
        "bare step, fresh batches": lambda: bare(args.steps, fresh=True),
        "Trainer(barebones=True).fit, step = meta-loss": lambda: fit(
            LossOnly, args.steps, barebones=True
        ),
        "Trainer.fit, step = meta-loss": lambda: fit(LossOnly, args.steps),
        "Trainer.fit, no logging, no check": lambda: fit(Unchecked, args.steps),
        "+ non-finite check": lambda: fit(Unlogged, args.steps),
        "Trainer.fit (+ logging)": lambda: fit(MAMLModule, args.steps),
    }
    if not args.no_compile:
        variants["Trainer.fit compiled"] = lambda: fit(MAMLModule, args.steps, compile=True)
    lightning_alone = {
        "plain loop": lambda: tiny_loop(args.steps),
        "Trainer.fit": lambda: tiny_fit(args.steps, 0),
        "+ 1 value through self.log": lambda: tiny_fit(args.steps, 1),
        "+ 4 values through self.log": lambda: tiny_fit(args.steps, 4),
    }
    start = time.perf_counter()
    every = {**variants, **lightning_alone}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in every}
    for _ in range(args.repeats):
        for name, run in every.items():
            runs[name].append(run())
    rows = []
    for name in variants:
        results = runs[name]
        rows.append(
            {
                "variant": name,
                "median_ms": 1e3 * statistics.median(r[0] for r in results),
                "mean_ms": 1e3 * statistics.median(r[1] for r in results),
            }
        )
    base = {r["variant"]: r["median_ms"] for r in rows}
    previous = None
    for row in rows:
        row["vs_autograd"] = base["autograd loop"] / row["median_ms"]
        row["vs_bare"] = row["median_ms"] / base["bare step"]
        row["added_ms"] = 0.0 if previous is None else row["median_ms"] - previous
        previous = row["median_ms"] if row["variant"] != "autograd loop" else None
    print(
        f"\nsinusoid MLP, 25 tasks, 1 step, second order, 1 thread: per-step median (mean) of "
        f"{args.steps} steps, median of {args.repeats} runs\n"
    )
    print_table(
        rows,
        [
            ("variant", "variant", "s"),
            ("median_ms", "ms/step", ".2f"),
            ("mean_ms", "mean", ".2f"),
            ("added_ms", "added vs row above", "+.2f"),
            ("vs_bare", "vs bare step", ".2f"),
            ("vs_autograd", "vs autograd loop", ".1f"),
        ],
    )
    tiny_rows = [
        {"variant": name, "median_ms": 1e3 * statistics.median(r[0] for r in runs[name])}
        for name in lightning_alone
    ]
    for row in tiny_rows:
        row["added_ms"] = row["median_ms"] - tiny_rows[0]["median_ms"]
    print("\nLightning alone: a one-parameter module, the same runs\n")
    print_table(
        tiny_rows,
        [
            ("variant", "variant", "s"),
            ("median_ms", "ms/step", ".3f"),
            ("added_ms", "added vs plain loop", "+.3f"),
        ],
    )
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {
            "rows": rows,
            "lightning_alone": tiny_rows,
            "steps": args.steps,
            "repeats": args.repeats,
        },
    )


if __name__ == "__main__":
    main()
