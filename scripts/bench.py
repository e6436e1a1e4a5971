"""Meta-training throughput and memory: engine (vmap, loop), MAML wrapper loop, Trainer.fit.

For each workload, one meta-iteration is: zero grads, meta-gradient of a batch of tasks, Adam step.
Variants, all on the same batch and checked to give the same gradient (to 1e-5) before timing:

- ``autograd loop``: learn2learn's algorithm in plain autograd, written here from its description
  -- per task, the parameters cloned as non-leaf tensors, ``torch.autograd.grad(...,
  create_graph=True)`` for each inner step, the query loss's ``.backward()`` before the next task
  -- the baseline of the ratio column;
- ``autograd loop, layered net`` (EEGNet only): the same loop on ``EEGNet(fused=False)``, the
  standard layer-by-layer computation of the same function (what learn2learn's algorithm costs on
  the EEGNet of other libraries);
- ``wrapper loop``: the same loop through ``lightning_maml.MAML`` (clone, adapt, backward);
- ``engine loop`` / ``engine vmap``: ``lightning_maml.functional.meta_loss`` with the tasks in a
  Python loop (each task's gradient taken before the next runs) / under ``torch.func.vmap``;
- ``engine compiled``: the same with ``compile=True`` (``torch.compile`` of the whole
  meta-gradient; compile time is spent in the untimed first call);
- ``Trainer.fit`` / ``Trainer.fit compiled``: ``MAMLModule`` (``compile=False`` / ``True``)
  meta-trained by Lightning (progress bar, logger and checkpoints off), data from the DataModule
  included: wall time over 300 steps (20 for EEGNet, at least ``--iterations``) divided by the
  steps, so Lightning's logging steps (every 50) count; warm-up steps (compilation included) are
  not timed.

Compiled variants run on the workloads named by ``--compile`` (default: the sinusoid ones; EEGNet
compiles take minutes on a CPU).

Reported: median seconds per meta-iteration (after warm-up), iterations per second, peak memory of
one iteration and the speed ratio to the autograd loop measured in the same run. Peak memory is
``max_memory_allocated`` on CUDA; on the CPU it is the rise of the process's resident-memory high
water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over one iteration, so it includes
the allocator's behaviour and reads near 0 when an iteration's tensors fit in memory the process
already holds. It is measured after all timings, in a child process started with glibc's mmap
threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that large freed blocks go back to the system; that
setting slows large allocations, so no timing runs under it. A second table gives EEGNet's time
and peak memory of one second-order meta-gradient against the number of inner steps for the
autograd loop, the engine's loop, its vmap path and its loop with ``checkpoint_inner_steps`` (time
in this process, memory in the child).

    python scripts/bench.py [--device cuda] [--iterations 20] [--json outputs/bench.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from benchtools import (
    median,
    print_table,
    quiet_lightning_info,
    rss_peak_rise_mib,
    time_call,
    write_json,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from lightning_maml import MAML, Episode, MAMLModule
from lightning_maml.datamodules import SinusoidDataModule, sample_sinusoid_tasks
from lightning_maml.datamodules.sinusoid import TaskSet
from lightning_maml.functional import (
    COMPILE_MODES,
    meta_loss,
    resolve_loss,
    task_batch_norm,
    vmap_pays_off,
)
from lightning_maml.models import MLP
from lightning_maml.models.eegnet import EEGNet


@dataclass
class Workload:
    name: str
    make_net: Callable[[], nn.Module]
    loss: str
    batch: Episode
    inner_steps: int
    algorithm: str
    datamodule: Callable[[], pl.LightningDataModule | DataLoader]
    warmup: int = 3
    fit_steps: int = 300  # timed Trainer.fit steps: enough to include its logging steps
    #: the same network computed layer by layer (EEGNet(fused=False)), for a row of the autograd
    #: loop on it: what learn2learn's algorithm costs on the standard formulation
    make_layered: Callable[[], nn.Module] | None = None


def sinusoid_workload(steps: int, algorithm: str) -> Workload:
    batch = sample_sinusoid_tasks(25, 10, 10, generator=torch.Generator().manual_seed(0))
    return Workload(
        f"sinusoid MLP, 25 tasks, {steps} step{'s' * (steps > 1)}, {algorithm}",
        MLP,
        "mse",
        batch,
        steps,
        algorithm,
        lambda: SinusoidDataModule(meta_batch_size=25, batches_per_epoch=10_000),
    )


def eegnet_batch(n_tasks: int = 4, n_way: int = 4, shots: int = 5, query: int = 5) -> Episode:
    # 22 channels x 256 samples (2 s at 128 Hz), as BNCI2014_001 resampled to 128 Hz
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(n_tasks, n_way * shots, 22, 256, generator=g)
    qx = torch.randn(n_tasks, n_way * query, 22, 256, generator=g)
    sy = torch.arange(n_way).repeat_interleave(shots).expand(n_tasks, -1).contiguous()
    qy = torch.arange(n_way).repeat_interleave(query).expand(n_tasks, -1).contiguous()
    return Episode(sx, sy, qx, qy)


def eegnet_workload(steps: int) -> Workload:
    batch = eegnet_batch()
    return Workload(
        f"EEGNet 22x256, 4-way 5+5, 4 tasks, {steps} step{'s' * (steps > 1)}, maml",
        lambda: EEGNet(22, 256, 4, sampling_rate=128, dropout=0.0),
        "cross_entropy",
        batch,
        steps,
        "maml",
        lambda: DataLoader(TaskSet(batch), batch_size=4),
        warmup=1,
        fit_steps=20,
        make_layered=lambda: EEGNet(22, 256, 4, sampling_rate=128, dropout=0.0, fused=False),
    )


def autograd_loop_meta_gradient(net: nn.Module, w: Workload, batch: Episode) -> None:
    """learn2learn's per-task algorithm in plain autograd (no code of this library but the loss
    and the BatchNorm task mode, which learn2learn users get from their network's train mode)."""
    loss_fn = resolve_loss(w.loss)
    first_order = w.algorithm == "fomaml"
    n_tasks = batch.support_x.shape[0]
    with task_batch_norm(net):
        for t in range(n_tasks):
            fast = {name: p.clone() for name, p in net.named_parameters()}
            for _ in range(w.inner_steps):
                loss = loss_fn(
                    functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t]
                )
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
                fast = {name: p - 0.01 * g for (name, p), g in zip(fast.items(), grads)}
            query = functional_call(net, fast, (batch.query_x[t],))
            (loss_fn(query, batch.query_y[t]) / n_tasks).backward()


def wrapper_meta_gradient(net: nn.Module, w: Workload, batch: Episode) -> None:
    loss_fn = resolve_loss(w.loss)
    maml = MAML(net, lr=0.01, first_order=w.algorithm == "fomaml")
    n_tasks = batch.support_x.shape[0]
    for t in range(n_tasks):
        learner = maml.clone()
        for _ in range(w.inner_steps):
            learner.adapt(loss_fn(learner(batch.support_x[t]), batch.support_y[t]))
        (loss_fn(learner(batch.query_x[t]), batch.query_y[t]) / n_tasks).backward()


def engine_meta_gradient(
    net: nn.Module,
    w: Workload,
    batch: Episode,
    mode: str,
    compile: bool | str = False,
    checkpoint: bool = False,
) -> None:
    meta_loss(
        net,
        w.loss,
        *batch,
        inner_lr=0.01,
        inner_steps=w.inner_steps,
        algorithm=w.algorithm,
        vectorize=mode,
        track_initial_loss=False,
        compile=compile,
        checkpoint_inner_steps=checkpoint,
    ).loss.backward()


def gradients(net: nn.Module, step: Callable[[], None]) -> list[Tensor]:
    net.zero_grad()
    step()
    return [p.grad.clone() for p in net.parameters()]


def peak_memory_mib(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return rss_peak_rise_mib(fn)


def time_trainer_fit(
    w: Workload, iterations: int, device: str, compile: bool | str = False
) -> float:
    pl.seed_everything(0, verbose=False)
    module = MAMLModule(
        w.make_net(),
        loss=w.loss,
        inner_lr=0.01,
        inner_steps=w.inner_steps,
        algorithm=w.algorithm,
        compile=compile,
    )
    data = w.datamodule()
    kwargs = dict(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    warm = w.warmup + 2
    total = warm + iterations

    class Timer(pl.Callback):
        start = 0.0

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warm:
                if device == "cuda":
                    torch.cuda.synchronize()
                Timer.start = time.perf_counter()

    trainer = pl.Trainer(max_steps=total, callbacks=[Timer()], **kwargs)
    if isinstance(data, DataLoader):
        trainer.fit(module, train_dataloaders=data)  # the loader is re-iterated every epoch
    else:
        trainer.fit(module, data)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - Timer.start) / iterations


def make_variants(
    w: Workload, device: str, compile: bool | str, check: bool = True
) -> dict[str, Callable[[], None]]:
    """One meta-iteration (zero grads, meta-gradient, Adam step) per variant, all on one network
    and batch and (``check``) checked to give the autograd loop's gradient."""
    torch.manual_seed(0)
    net = w.make_net().to(device)
    batch = Episode(*(t.to(device) for t in w.batch))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps: dict[str, Callable[[], None]] = {
        "autograd loop": lambda: autograd_loop_meta_gradient(net, w, batch),
        "wrapper loop": lambda: wrapper_meta_gradient(net, w, batch),
        "engine loop": lambda: engine_meta_gradient(net, w, batch, "loop"),
        "engine vmap": lambda: engine_meta_gradient(net, w, batch, "vmap"),
    }
    if compile:
        steps["engine compiled"] = lambda: engine_meta_gradient(net, w, batch, "auto", compile)
    if w.make_layered is not None:
        layered = w.make_layered().to(device)
        layered.load_state_dict(net.state_dict())
        layered_optimizer = torch.optim.Adam(layered.parameters(), lr=1e-3)

        def layered_iteration() -> None:
            layered_optimizer.zero_grad()
            autograd_loop_meta_gradient(layered, w, batch)
            layered_optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()

        if check:
            layered.zero_grad()
            autograd_loop_meta_gradient(layered, w, batch)
            reference = gradients(net, lambda: autograd_loop_meta_gradient(net, w, batch))
            for a, b in zip(reference, (p.grad for p in layered.parameters())):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{w.name}: layered")
    if check:
        reference = gradients(net, steps["autograd loop"])
        for name, step in steps.items():  # compiled variants compile here
            for a, b in zip(reference, gradients(net, step)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{w.name}: {name}")

    def iteration(step: Callable[[], None]) -> None:
        optimizer.zero_grad()
        step()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    variants = {name: partial(iteration, step) for name, step in steps.items()}
    if w.make_layered is not None:
        variants["autograd loop, layered net"] = layered_iteration
    return variants


def bench_workload(w: Workload, iterations: int, device: str, compile: bool | str) -> list[dict]:
    """Timed rows of one workload (peak memory is filled in later)."""
    variants = make_variants(w, device, compile)
    rows = []
    for name, iteration in variants.items():
        seconds = median(time_call(iteration, warmup=w.warmup, iterations=iterations))
        rows.append({"workload": w.name, "variant": name, "s_per_it": seconds})
    for compiled in (False, compile) if compile else (False,):
        rows.append(
            {
                "workload": w.name,
                "variant": "Trainer.fit compiled" if compiled else "Trainer.fit",
                "s_per_it": time_trainer_fit(w, max(iterations, w.fit_steps), device, compiled),
            }
        )
    base = rows[0]["s_per_it"]
    for row in rows:
        row["it_per_s"] = 1 / row["s_per_it"]
        row["speedup"] = base / row["s_per_it"]
        row["peak_mib"] = math.nan
    return rows


def variant_peaks(w: Workload, device: str, compile: bool | str) -> dict[str, float]:
    """Peak memory of one meta-iteration of each variant, after an untimed first one (which
    compiles the compiled variants)."""
    variants = make_variants(w, device, compile, check=False)
    peaks = {}
    for name, iteration in variants.items():
        iteration()
        peaks[name] = peak_memory_mib(iteration, device)
    return peaks


def vmap_check_seconds(w: Workload, device: str) -> dict:
    """What vectorize='auto' spends once, on a network's first batch, checking vmap against the
    per-task loop: a fresh network's first meta-gradient minus the median of its next five (the
    median over three networks)."""
    batch = Episode(*(t.to(device) for t in w.batch))
    extra, steps = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        net = w.make_net().to(device)
        times = time_call(lambda net=net: engine_meta_gradient(net, w, batch, "auto"), 0, 6)
        later = median(times[1:])
        extra.append(times[0] - later)
        steps.append(later)
    return {"check_s": median(extra), "step_s": median(steps)}


INNER_STEP_VARIANTS = ("autograd loop", "engine loop", "engine vmap", "engine checkpoint")


def memory_table(device: str, steps_list: list[int], measure: str) -> list[dict]:
    """EEGNet second-order meta-gradient against the number of inner steps: the autograd loop,
    the engine's loop and vmap paths and its loop with ``checkpoint_inner_steps``; seconds of one
    call (``measure="time"``, gradients checked equal) or its peak memory (``"memory"``)."""
    rows = []
    batch = Episode(*(t.to(device) for t in eegnet_batch()))
    for steps in steps_list:
        row: dict = {"inner_steps": steps}
        grads = {}
        for variant in INNER_STEP_VARIANTS:
            torch.manual_seed(0)
            net = EEGNet(22, 256, 4, sampling_rate=128, dropout=0.0).to(device)
            w = Workload("", lambda net=net: net, "cross_entropy", batch, steps, "maml", list)
            if variant == "autograd loop":
                call = partial(autograd_loop_meta_gradient, net, w, batch)
            else:
                mode = "vmap" if variant == "engine vmap" else "loop"
                checkpoint = variant == "engine checkpoint"
                call = partial(engine_meta_gradient, net, w, batch, mode, False, checkpoint)
            if measure == "memory":
                row[f"{variant} MiB"] = peak_memory_mib(call, device)
                continue
            call()  # warm-up
            net.zero_grad()
            start = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            row[f"{variant} s"] = time.perf_counter() - start
            grads[variant] = [p.grad for p in net.parameters()]
        for variant in grads:
            for a, b in zip(grads["autograd loop"], grads[variant]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{variant} {steps}")
        rows.append(row)
        print(f"done: inner steps {steps} ({measure})", flush=True)
    return rows


def measure_memory(args: argparse.Namespace, workloads: list, steps: list[int]) -> dict:
    """Peak memory of every variant and of the inner-steps table. On the CPU this runs in a child
    process started with glibc's mmap threshold fixed at 64 KiB: large freed blocks then go back
    to the system, so the resident high-water mark follows live tensors (glibc otherwise raises
    the threshold as blocks are freed, keeps later ones, and peaks that reuse them go unseen).
    The fixed threshold slows large allocations, hence a separate process for it."""
    if args.device == "cpu" and not args.memory_child:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "memory.json"
            command = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--memory-child",
                "--json",
                str(out),
            ]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
            subprocess.run(command, env=env, check=True)
            return json.loads(out.read_text())
    peaks = {}
    for kind, w in workloads:
        compile = args.compile in ("all", kind) and args.compile_mode
        for name, peak in variant_peaks(w, args.device, compile).items():
            peaks[f"{w.name} | {name}"] = peak
        print(f"done: memory of {w.name}", flush=True)
    return {"peaks": peaks, "table": memory_table(args.device, steps, "memory")}


def main() -> None:
    quiet_lightning_info()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", default="outputs/bench.json")
    parser.add_argument("--workloads", default="all", choices=["all", "sinusoid", "eegnet"])
    parser.add_argument(
        "--compile",
        default="sinusoid",
        choices=["all", "sinusoid", "none"],
        help="workloads that also run the compiled variants",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=list(COMPILE_MODES),
        help="torch.compile mode of the compiled variants",
    )
    parser.add_argument(
        "--memory-steps",
        default="1,5,20",
        help="EEGNet inner steps for the memory table ('' to skip)",
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    workloads = []
    if args.workloads in ("all", "sinusoid"):
        workloads += [
            ("sinusoid", sinusoid_workload(s, a)) for s in (1, 5) for a in ("maml", "fomaml")
        ]
    if args.workloads in ("all", "eegnet"):
        workloads += [("eegnet", eegnet_workload(s)) for s in (1, 5)]
    steps = [int(s) for s in args.memory_steps.split(",") if s]
    if args.memory_child:
        write_json(args.json, measure_memory(args, workloads, steps))
        return
    rows = []
    start = time.perf_counter()
    for kind, w in workloads:
        compile = args.compile in ("all", kind) and args.compile_mode
        new_rows = bench_workload(w, args.iterations, args.device, compile)
        rows += new_rows
        summary = ", ".join(f"{r['variant']} {r['s_per_it'] * 1e3:.1f} ms" for r in new_rows)
        print(f"done: {w.name}: {summary}", flush=True)
    checks = {}
    for _, w in workloads:
        if w.inner_steps == 1 and w.algorithm == "maml":
            eager_vmap = vmap_pays_off(w.make_net(), torch.device(args.device))
            checks[w.name] = vmap_check_seconds(w, args.device) if eager_vmap else None
    memory = memory_table(args.device, steps, "time")
    measured = measure_memory(args, workloads, steps)
    for row in rows:
        row["peak_mib"] = measured["peaks"].get(f"{row['workload']} | {row['variant']}", math.nan)
        # a rise below 0 is the allocator returning memory: nothing new was needed
        peak = row["peak_mib"]
        row["peak"] = "-" if math.isnan(peak) else f"{max(peak, 0.0):.1f}"
    for row, peaks in zip(memory, measured["table"]):
        row.update(peaks)
    print(
        f"\nmeta-iteration (grads + Adam step), device {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.iterations}\n"
    )
    print_table(
        rows,
        [
            ("workload", "workload", "s"),
            ("variant", "variant", "s"),
            ("s_per_it", "s/it", ".4f"),
            ("it_per_s", "it/s", ".1f"),
            ("peak", "peak MiB", "s"),
            ("speedup", "vs autograd loop", ".2f"),
        ],
    )
    print(
        "peak MiB: rise of the resident (CPU) or allocated (CUDA) memory high-water mark over one "
        "iteration, 0.0 where it fits in memory already held; '-': not measured (Trainer.fit)"
    )
    if memory:
        print(
            "\nEEGNet second-order MAML (4 tasks), one meta-gradient vs inner steps: peak MiB "
            "and seconds of one call (gradients checked equal to 1e-5)\n"
        )
        columns = [("inner_steps", "inner steps", "d")]
        for variant in INNER_STEP_VARIANTS:
            columns += [(f"{variant} MiB", f"{variant} MiB", ".1f"), (f"{variant} s", "s", ".2f")]
        print_table(memory, columns)
    print("\nvectorize='auto' (eager), first batch of a network only: the vmap-vs-loop check")
    for name, check in checks.items():
        if check is None:
            print(f"  {name}: none, runs task by task on this device (vmap_pays_off)")
            continue
        print(
            f"  {name}: {check['check_s'] * 1e3:.1f} ms once, "
            f"{check['check_s'] / check['step_s']:.1f} steps of {check['step_s'] * 1e3:.1f} ms"
        )
    print(f"\nbench wall time {time.perf_counter() - start:.0f} s")
    payload = {"device": args.device, "rows": rows, "memory": memory, "vmap_check": checks}
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
