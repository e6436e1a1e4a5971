"""Meta-training steps per second against torch's intra-op thread count, on a quiet machine and
with one other CPU-bound process on it (a busy loop this script starts and stops).

Workloads: second-order meta-gradient + Adam step with ``meta_loss`` (vectorize="auto"):
sinusoid MLP (25 tasks, K=10) and EEGNet (22 x 256, 4-way 5+5, 4 tasks). Each cell is the median of
``--runs`` timed runs after 3 warm-up steps; the baseline of each row is 1 thread, quiet.

    python scripts/bench_threads.py [--threads 1,2] [--runs 3] [--json outputs/bench_threads.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from benchtools import median, print_table, write_json

from lightning_maml.datamodules import sample_sinusoid_tasks
from lightning_maml.functional import meta_loss
from lightning_maml.models import MLP, EEGNet


def sinusoid_step() -> tuple[Callable[[], None], int]:
    net = MLP()
    batch = sample_sinusoid_tasks(25, 10, 10, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        meta_loss(net, "mse", *batch, inner_lr=0.01).loss.backward()
        optimizer.step()

    return step, 200


def eegnet_step() -> tuple[Callable[[], None], int]:
    net = EEGNet(22, 256, 4, sampling_rate=128)
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(4, 20, 22, 256, generator=g)
    qx = torch.randn(4, 20, 22, 256, generator=g)
    labels = torch.arange(4).repeat_interleave(5).expand(4, -1).contiguous()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        meta_loss(net, "cross_entropy", sx, labels, qx, labels, inner_lr=0.01).loss.backward()
        optimizer.step()

    return step, 8


WORKLOADS = {"sinusoid MLP, 25 tasks": sinusoid_step, "EEGNet 22x256, 4 tasks": eegnet_step}


def steps_per_second(make: Callable, threads: int, runs: int) -> float:
    torch.set_num_threads(threads)
    step, n = make()
    for _ in range(3):
        step()
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(n):
            step()
        rates.append(n / (time.perf_counter() - start))
    return median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts to measure")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default="outputs/bench_threads.json")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    results: dict[str, dict[str, float]] = {name: {} for name in WORKLOADS}
    for shared in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if shared else None
        try:
            for name, make in WORKLOADS.items():
                for threads in counts:
                    column = (
                        f"{threads} thread{'s' * (threads > 1)}, {'shared' if shared else 'quiet'}"
                    )
                    results[name][column] = steps_per_second(make, threads, args.runs)
                    print(
                        f"done: {name}, {column}: {results[name][column]:.1f} steps/s", flush=True
                    )
        finally:
            if busy is not None:
                busy.kill()
    columns = list(next(iter(results.values())))
    rows = [
        {"workload": name, **{c: f"{v[c]:.1f}" for c in columns}} for name, v in results.items()
    ]
    print(f"\nsteps/s, median of {args.runs} runs (shared: one other CPU-bound process)\n")
    print_table(rows, [("workload", "workload", "s")] + [(c, c, "s") for c in columns])
    write_json(args.json, {"runs": args.runs, "steps_per_second": results})


if __name__ == "__main__":
    main()
