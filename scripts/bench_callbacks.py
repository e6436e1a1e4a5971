"""Overhead of MetaGradientLogger and MetaGradientCheck on sinusoid meta-training (one process).

Each configuration runs the same Trainer.fit (MLP 1-40-40-1, 25 tasks, K=10+10, 1 inner step, second
order, progress bar off) for the same number of steps; the table gives steps/s and the ratio to the
run without callbacks, measured in this same run.

    python scripts/bench_callbacks.py [--steps 500] [--json outputs/bench_callbacks.json]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
from benchtools import cpu_trainer, print_table, quiet_lightning_info, write_json

from lightning_maml import MAMLModule
from lightning_maml.callbacks import MetaGradientCheck, MetaGradientLogger
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP

CONFIGS = {
    "no callbacks": lambda: [],
    "MetaGradientLogger(every_n_steps=50)": lambda: [MetaGradientLogger(every_n_steps=50)],
    "MetaGradientLogger(every_n_steps=1)": lambda: [MetaGradientLogger(every_n_steps=1)],
    "MetaGradientLogger(every_n_steps=1, cosine)": lambda: [
        MetaGradientLogger(every_n_steps=1, cosine_first_order=True)
    ],
    "MetaGradientCheck(first step only)": lambda: [MetaGradientCheck()],
    "MetaGradientCheck(every_n_steps=100)": lambda: [MetaGradientCheck(every_n_steps=100)],
    "MetaGradientCheck(every_n_steps=1)": lambda: [MetaGradientCheck(every_n_steps=1)],
}


def run(callbacks: list, steps: int) -> float:
    pl.seed_everything(0, verbose=False)
    module = MAMLModule(MLP(), inner_lr=0.01, inner_steps=1)
    data = SinusoidDataModule(meta_batch_size=25, batches_per_epoch=steps)
    trainer = cpu_trainer(steps, steps, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, data)
    return steps / (time.perf_counter() - start)


def main() -> None:
    quiet_lightning_info()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--json", default="outputs/bench_callbacks.json")
    args = parser.parse_args()
    run([], 50)  # warm-up
    rows = []
    for name, make in CONFIGS.items():
        steps = args.steps if "every_n_steps=1)" not in name else max(args.steps // 10, 20)
        rows.append({"config": name, "steps": steps, "steps_per_s": run(make(), steps)})
    base = rows[0]["steps_per_s"]
    for row in rows:
        row["ratio"] = row["steps_per_s"] / base
    print_table(
        rows,
        [
            ("config", "configuration", "s"),
            ("steps", "steps", "d"),
            ("steps_per_s", "steps/s", ".1f"),
            ("ratio", "vs no callbacks", ".3f"),
        ],
    )
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
