"""What bounds a second-order meta-iteration on EEGNet on this CPU: arithmetic or operators.

The workload of ``bench.py`` (EEGNet 22x256, 4-way 5+5, 4 tasks, 1 inner step, second-order
MAML, the default fused network), one thread, for learn2learn's algorithm in plain autograd and
the engine's loop and vmap paths. For each:

- time: median seconds of a meta-gradient over ``--iterations`` interleaved runs after warm-up;
- FLOPs of one meta-gradient as ``torch.utils.flop_counter`` counts them (convolutions and
  matrix products, forward and backward; the FFTs are not counted) and the rate that time gives,
  against this CPU's rate on a large float32 matrix product on one thread measured in the same
  run (what its kernels reach when arithmetic bounds them);
- operators: the tensor operators one meta-gradient dispatches (counted below autograd, so the
  backward passes' too) and their mean time;
- where the time goes, by kernel family, from the profiler's self time of each operator.

    python scripts/bench_bound.py [--iterations 10] [--json outputs/bench_bound.json]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

import torch
from bench import autograd_loop_meta_gradient, eegnet_workload, engine_meta_gradient
from benchtools import median, print_table, time_call, write_json
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

#: kernel families by operator name, first match wins; the rest are elementwise operators,
#: reductions, copies, fills and allocations
FAMILIES = (
    ("convolution", ("conv",)),
    ("FFT", ("_fft",)),
    ("matrix product", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")),
    ("pooling", ("pool",)),
    ("normalisation", ("batch_norm",)),
)
OTHER = "elementwise, reductions, copies, fills"


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched to kernels while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def family(name: str) -> str:
    for label, patterns in FAMILIES:
        if any(p in name for p in patterns):
            return label
    return OTHER


def matmul_rate(size: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of a float32 ``size x size`` matrix product on this thread (median)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median(time_call(lambda: a @ b, warmup=1, iterations=repeats)) / 1e9


def time_shares(fn: Callable[[], None], iterations: int = 3) -> dict[str, float]:
    """Fraction of the operators' self CPU time by kernel family (profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            fn()
    totals: Counter[str] = Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            totals[family(event.key)] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {label: totals[label] / whole for label, _ in (*FAMILIES, (OTHER, ()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", default="outputs/bench_bound.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    w = eegnet_workload(1)
    torch.manual_seed(0)
    net = w.make_net()
    variants = {
        "autograd loop": lambda: autograd_loop_meta_gradient(net, w, w.batch),
        "engine loop": lambda: engine_meta_gradient(net, w, w.batch, "loop"),
        "engine vmap": lambda: engine_meta_gradient(net, w, w.batch, "vmap"),
    }
    for fn in variants.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.iterations):
        for name, fn in variants.items():
            net.zero_grad()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    peak = matmul_rate()
    rows, shares = [], {}
    for name, fn in variants.items():
        with FlopCounterMode(display=False) as flops:
            fn()
        with OperatorCount() as count:
            fn()
        seconds = median(times[name])
        gflop = flops.get_total_flops() / 1e9
        operators = sum(count.calls.values())
        rows.append(
            {
                "variant": name,
                "ms": 1e3 * seconds,
                "gflop": gflop,
                "gflops": gflop / seconds,
                "of_peak": gflop / seconds / peak,
                "operators": operators,
                "us_per_operator": 1e6 * seconds / operators,
            }
        )
        shares[name] = time_shares(fn)
    print(f"\n{w.name}, one thread, median of {args.iterations} runs")
    print(f"this CPU's float32 1024x1024 matrix product on one thread: {peak:.1f} GFLOP/s\n")
    print_table(
        rows,
        [
            ("variant", "variant", "s"),
            ("ms", "ms", ".1f"),
            ("gflop", "GFLOP", ".3f"),
            ("gflops", "GFLOP/s", ".1f"),
            ("of_peak", "of matmul rate", ".1%"),
            ("operators", "operators", "d"),
            ("us_per_operator", "us/operator", ".1f"),
        ],
    )
    print("\nshare of the operators' time, by kernel family (profiler self time)\n")
    share_rows = [
        {"family": label, **{name: shares[name][label] for name in variants}}
        for label in shares["autograd loop"]
    ]
    print_table(share_rows, [("family", "kernels", "s")] + [(n, n, ".1%") for n in variants])
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {"workload": w.name, "matmul_gflops": peak, "rows": rows, "time_shares": shares},
    )


if __name__ == "__main__":
    main()
