"""Time one second-order meta-gradient of the sinusoid MLP: engine with vmap vs per-task loop.

Workload: MLP 1-40-40-1, 25 tasks, K=10 support + 10 query, 1 inner step, inner lr 0.01.
Both paths are checked to give the same gradient before timing.

    python scripts/bench_engine.py [--iterations 50] [--json outputs/bench_engine.json]
"""

from __future__ import annotations

import argparse

import torch
from benchtools import median, print_table, time_call, write_json

from lightning_maml.datamodules.sinusoid import sample_sinusoid_tasks
from lightning_maml.functional import meta_loss
from lightning_maml.models import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--json", default="outputs/bench_engine.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    net = MLP()
    batch = sample_sinusoid_tasks(25, 10, 10, generator=torch.Generator().manual_seed(0))
    params = list(net.parameters())

    def meta_gradient(mode: str) -> list[torch.Tensor]:
        out = meta_loss(net, "mse", *batch, inner_lr=0.01, inner_steps=1, vectorize=mode)
        return torch.autograd.grad(out.loss, params)

    for a, b in zip(meta_gradient("vmap"), meta_gradient("loop")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rows = []
    for mode in ("loop", "vmap"):
        seconds = median(time_call(lambda m=mode: meta_gradient(m), iterations=args.iterations))
        rows.append({"path": mode, "ms": seconds * 1e3})
    loop_ms = rows[0]["ms"]
    for row in rows:
        row["speedup"] = loop_ms / row["ms"]
    print(
        "second-order meta-gradient, MLP 1-40-40-1, 25 tasks, K=10+10, 1 step "
        f"(median of {args.iterations}, {torch.get_num_threads()} threads)"
    )
    print_table(
        rows,
        [
            ("path", "path", "s"),
            ("ms", "ms/meta-gradient", ".2f"),
            ("speedup", "speedup vs loop", ".1f"),
        ],
    )
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
