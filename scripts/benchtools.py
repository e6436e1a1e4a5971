"""Helpers shared by the scripts: timing (median over timed iterations after warm-up), memory,
confidence intervals, tables and JSON."""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_maml import Episode
from lightning_maml.functional import Algorithm, meta_loss


def quiet_lightning_info() -> None:
    """Leave Lightning's information lines (accelerator banners and tips, printed for every
    Trainer, 'max_steps reached') out of a script's output, torch's deprecation of ``LeafSpec``,
    raised inside Lightning, Lightning's notice that a module with a ``validation_step``
    has no validation data (these scripts train without validating), and the warning of each
    meta-step skipped for a non-finite meta-gradient (the scripts count them in their tables);
    other warnings stay.
    """
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"non-finite values at training step .*skipped")
    warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no")
    warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)


def time_call(fn: Callable[[], object], warmup: int = 5, iterations: int = 20) -> list[float]:
    """Seconds per call of ``fn`` for ``iterations`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cpu_trainer(
    max_steps: int, batches_per_epoch: int, progress_bar: bool = False, **kwargs: object
) -> pl.Trainer:
    """One-process CPU Trainer for the experiment scripts: no validation, logger or checkpoints.

    ``max_epochs`` is set to the epochs that ``max_steps`` spans, so that the progress bar reads
    "Epoch 2/9" (Lightning 2.6's rich bar prints "Epoch 2/-2" when only ``max_steps`` is set).
    """
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=math.ceil(max_steps / batches_per_epoch),
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        **kwargs,
    )


def median(times: list[float]) -> float:
    return statistics.median(times)


def mean_and_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (normal approximation)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), 1.96 * t.std().item() / math.sqrt(len(values))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_peak_rise_mib(fn: Callable[[], object]) -> float:
    """Rise of this process's resident-memory high water mark over one call of ``fn``, MiB (Linux;
    NaN where ``/proc/self/clear_refs`` cannot reset the mark). Meaningful only where freed
    large blocks go back to the system (e.g. ``MALLOC_MMAP_THRESHOLD_`` set)."""
    try:  # writing 5 resets VmHWM to the current VmRSS
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
    except (OSError, KeyError):
        return math.nan
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a fixed-width table; ``columns`` holds (key, header, format)."""
    widths = [max(len(h), *(len(format(r[k], f)) for r in rows)) for k, h, f in columns]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(format(r[k], f).ljust(w) for (k, _, f), w in zip(columns, widths)))


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"torch": torch.__version__, "threads": torch.get_num_threads(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def markdown_table(
    first: str, columns: Sequence[str], rows: Mapping[str, Sequence[str]]
) -> list[str]:
    """The lines of a Markdown table: a header (``first``, then ``columns``) and a row per key of
    ``rows`` (its name, then its cells)."""
    lines = ["| " + " | ".join([first, *columns]) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return lines


def plot_accuracy_vs_k(
    rows: list[dict],
    error: str,
    chance: float,
    k_shots: Sequence[int],
    labels: tuple[str, str, str],
    path: str | Path,
    figsize: tuple[float, float],
) -> None:
    """One line per ``row["method"]``: ``row["accuracy"]`` against ``row["K"]`` with error bars
    ``row[error]``, a dotted line at ``chance``; ``labels`` are the x label, y label and title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [r for r in rows if r["method"] == method]
        ax.errorbar(
            [r["K"] for r in points],
            [r["accuracy"] for r in points],
            yerr=[r[error] for r in points],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.axhline(chance, color="grey", ls=":", label="chance")
    ax.set_xticks(k_shots, [str(k) for k in k_shots])
    xlabel, ylabel, title = labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def adapted_accuracies(
    net: torch.nn.Module,
    batch: Episode,
    lr: float,
    steps: int,
    chunk: int | None = None,
    algorithm: str | Algorithm = "fomaml",
) -> list[float]:
    """Query accuracy per episode of ``batch`` after ``steps`` SGD steps of size ``lr`` on its
    support set, from ``net``'s parameters (first order, no graph to them); ``chunk`` episodes
    per call (``None``: all at once). ``algorithm`` (first order) adapts its own way, e.g.
    ProtoMAML from the prototype head or iMAML by its regularised steps."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    size = chunk or len(batch.support_x)
    results: list[float] = []
    for start in range(0, len(batch.support_x), size):
        part = Episode(*(t[start : start + size] for t in batch))
        with torch.enable_grad():
            out = meta_loss(
                net,
                "cross_entropy",
                *part,
                inner_lr=lr,
                inner_steps=steps,
                algorithm=algorithm,
                params=params,
                track_initial_loss=False,
            )
        correct = out.query_predictions.argmax(-1) == part.query_y
        results += correct.float().mean(1).tolist()
    return results
