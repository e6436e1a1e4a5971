"""A chart of ``scripts/bench.py``'s JSON: each variant's speed against learn2learn's algorithm
(the plain-autograd per-task loop, 1x), per workload, on a log scale.

    python scripts/bench_chart.py docs/bench/bench_cpu.json --out docs/bench_speed.png
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a JSON file written by scripts/bench.py")
    parser.add_argument("--out", default="outputs/bench_speed.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    report = json.loads(Path(args.json).read_text())
    rows = report["rows"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    speed = {(r["workload"], r["variant"]): r["speedup"] for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [speed.get((w, variant), np.nan) for w in workloads]
        positions = np.arange(len(workloads)) + (i - len(variants) / 2 + 0.5) * width
        ax.bar(positions, values, width, label=variant)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(workloads)), ["\n".join(textwrap.wrap(w, 20)) for w in workloads])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("meta-iterations/s vs the autograd loop (1x)")
    ax.set_title(
        f"second-order meta-iteration, {report.get('device', '')}, torch {report.get('torch', '')}"
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
