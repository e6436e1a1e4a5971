"""Implicit MAML's memory and time against second-order MAML as the inner loop grows.

One meta-gradient (forward and backward) of EEGNet 22 x 256, 4-way 5+5, 4 tasks, on the engine's
per-task loop (the default for EEGNet on a CPU): second-order MAML (its graph holds every inner
step), second-order MAML with ``checkpoint_inner_steps`` (one step's graph, recomputed), and iMAML
(``lam`` = 1 / inner_lr, 5 conjugate-gradient steps: no graph through the inner steps), at 1, 5,
20 and 50 inner steps. Peak memory is the rise of the resident high-water mark over one call, in a
child process started with glibc's mmap threshold fixed so freed blocks go back to the system (as
``scripts/bench.py`` measures it); time is the median of ``--repeats`` calls in this process.

    python scripts/bench_imaml.py [--steps 1,5,20,50] [--json outputs/bench_imaml.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench import eegnet_batch
from benchtools import print_table, rss_peak_rise_mib, write_json

from lightning_maml.functional import IMAML, meta_loss
from lightning_maml.models import EEGNet

INNER_LR = 0.01
VARIANTS = ("maml", "maml checkpointed", "imaml")


def meta_gradient(net: torch.nn.Module, variant: str, steps: int) -> None:
    batch = eegnet_batch()
    algorithm = IMAML(lam=1 / INNER_LR, cg_steps=5) if variant == "imaml" else "maml"
    meta_loss(
        net,
        "cross_entropy",
        *batch,
        inner_lr=INNER_LR,
        inner_steps=steps,
        algorithm=algorithm,
        vectorize="loop",
        track_initial_loss=False,
        checkpoint_inner_steps=variant == "maml checkpointed",
    ).loss.backward()


def measure(steps_list: list[int], what: str, repeats: int) -> list[dict]:
    rows = []
    for steps in steps_list:
        row: dict = {"inner_steps": steps}
        for variant in VARIANTS:
            torch.manual_seed(0)
            net = EEGNet(22, 256, 4, sampling_rate=128, dropout=0.0)
            call = partial(meta_gradient, net, variant, steps)
            call()  # warm-up
            if what == "memory":
                row[f"{variant} MiB"] = max(rss_peak_rise_mib(call), 0.0)
                continue
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            row[f"{variant} s"] = statistics.median(times)
        rows.append(row)
        print(f"done: {steps} inner steps ({what})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,5,20,50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="outputs/bench_imaml.json")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    if args.memory_child:
        Path(args.json).write_text(json.dumps(measure(steps, "memory", 1)))
        return
    start = time.perf_counter()
    rows = measure(steps, "time", args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "memory.json"
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        command = [sys.executable, __file__, *sys.argv[1:], "--memory-child", "--json", str(out)]
        subprocess.run(command, env=env, check=True)
        for row, memory in zip(rows, json.loads(out.read_text())):
            row.update(memory)
    print(
        f"\nEEGNet 22x256, 4 tasks, one meta-gradient, {torch.get_num_threads()} thread(s): peak "
        f"MiB (rise of the resident high-water mark) and median seconds of {args.repeats}\n"
    )
    columns = [("inner_steps", "inner steps", "d")]
    for variant in VARIANTS:
        columns += [(f"{variant} MiB", f"{variant} MiB", ".1f"), (f"{variant} s", "s", ".2f")]
    print_table(rows, columns)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
