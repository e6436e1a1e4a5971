"""A study's rows summarised: means over subjects with t intervals, paired differences, a
Markdown table and figures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student t interval of ``values`` (NaN for one value).

    Example::

        >>> mean, half = t_interval([0.6, 0.7, 0.8])
        >>> round(mean, 3), round(half, 3)
        (0.7, 0.248)
    """
    from scipy import stats

    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    half = stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), float(half)


def _interval(value: float) -> str:
    return "n/a (1 subject)" if np.isnan(value) else f"± {value:.3f}"


class StudyResult:
    """The rows of a :class:`~lightning_maml.study.CalibrationStudy`: one per method, test
    subject and K, holding the query accuracy of each episode.

    Args:
        rows: ``{"method", "K", "subject", "accuracies", ...}`` each.
        k_shots: the study's K.
        seconds: per method, the seconds its (fold, method) units took when computed (stored
            ones count the time they took then).
    """

    def __init__(
        self, rows: list[dict], k_shots: Sequence[int], seconds: Mapping[str, float] | None = None
    ) -> None:
        self.rows, self.k_shots = list(rows), list(k_shots)
        self.seconds = dict(seconds or {})

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def __add__(self, other: StudyResult) -> StudyResult:
        """Both results' rows (e.g. methods scored later on the same episodes)."""
        shared = sorted(set(self.methods) & set(other.methods))
        if shared:
            raise ValueError(f"both results hold {shared}")
        seconds = {**self.seconds, **other.seconds}
        ks = list(dict.fromkeys([*self.k_shots, *other.k_shots]))
        return StudyResult(self.rows + other.rows, ks, seconds)

    def mean_accuracy(self, method: str, k_shots: Sequence[int] | None = None) -> float:
        """Mean query accuracy of ``method`` over every episode at ``k_shots`` (default all)."""
        cells = [a for r in self.rows if r["method"] == method
                 and (k_shots is None or r["K"] in k_shots) for a in r["accuracies"]]  # fmt: skip
        if not cells:
            raise ValueError(f"no rows of {method!r} at K={k_shots}")
        return float(np.mean(cells))

    def summary(self) -> list[dict]:
        """Per method and K: the mean over test subjects of each subject's mean accuracy, with
        its t interval over subjects."""
        out = []
        for method in self.methods:
            for k in self.k_shots:
                cells = sorted((r for r in self.rows if r["method"] == method and r["K"] == k),
                               key=lambda r: r["subject"])  # fmt: skip
                if not cells:
                    continue
                means = [float(np.mean(r["accuracies"])) for r in cells]
                mean, half = t_interval(means)
                out.append({"method": method, "K": k, "accuracy": mean, "ci95_subjects": half,
                            "subjects": [r["subject"] for r in cells],
                            "subject_means": means})  # fmt: skip
        return out

    def differences(self, reference: str) -> list[dict]:
        """Per K, ``reference`` minus each other method, subject by subject (over the subjects
        both were scored on): mean and t interval.

        Raises:
            ValueError: if ``reference`` has no rows.
        """
        if reference not in self.methods:
            raise ValueError(f"`reference` {reference!r} is not among {self.methods}")
        summary = self.summary()
        out = []
        for k in self.k_shots:
            mine = next((s for s in summary if s["method"] == reference and s["K"] == k), None)
            if mine is None:
                continue
            own = dict(zip(mine["subjects"], mine["subject_means"]))
            for s in summary:
                if s["K"] != k or s["method"] == reference:
                    continue
                pairs = [(own[x], m) for x, m in zip(s["subjects"], s["subject_means"]) if x in own]
                mean, half = t_interval([a - b for a, b in pairs])
                out.append({"K": k, "versus": s["method"], "difference": mean,
                            "ci95_subjects": half, "subjects": len(pairs)})  # fmt: skip
        return out

    def markdown(self, reference: str | None = None, title: str = "") -> str:
        """The accuracy table (mean over subjects ± 95% t interval) and, with ``reference``, the
        table of its paired differences."""
        columns = [f"K={k}" for k in self.k_shots]

        def rows(entries: list[dict], name: str, value: str) -> dict[str, list[str]]:
            """Per ``entry[name]``, a cell per K: ``entry[value]`` (``"+.3f"`` for differences)
            and its interval; "—" where it was not scored."""
            cells: dict[str, dict[int, str]] = {}
            for e in entries:
                number = f"{e[value]:+.3f}" if value == "difference" else f"{e[value]:.3f}"
                cells.setdefault(e[name], {})[e["K"]] = f"{number} {_interval(e['ci95_subjects'])}"
            return {n: [c.get(k, "—") for k in self.k_shots] for n, c in cells.items()}

        lines = [title, ""] if title else []
        lines += _table("method", columns, rows(self.summary(), "method", "accuracy"))
        if reference is not None:
            versus = rows(self.differences(reference), "versus", "difference")
            lines += ["", f"{reference} minus each method, subject by subject "
                      "(mean ± 95% t interval over subjects):", ""]  # fmt: skip
            lines += _table("versus", columns, versus)
        return "\n".join(lines)

    def plot_accuracy(self, path: str | Path, title: str = "", chance: float | None = None):
        """Accuracy against K, one line per method (error bars: t intervals over subjects)."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        summary = self.summary()
        for method in self.methods:
            points = [s for s in summary if s["method"] == method]
            ax.errorbar([s["K"] for s in points], [s["accuracy"] for s in points],
                        yerr=[0 if np.isnan(s["ci95_subjects"]) else s["ci95_subjects"]
                              for s in points], marker="o", capsize=3, label=method)  # fmt: skip
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", label="chance")
        ax.set_xticks(self.k_shots, [str(k) for k in self.k_shots])
        ax.set_xlabel("K (labelled trials per class of the new subject)")
        ax.set_ylabel("query accuracy (± t interval over subjects)")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def plot_subjects(self, path: str | Path, k: int, reference: str | None = None) -> None:
        """Each test subject's accuracy at ``k``, a bar per method (``reference`` outlined)."""
        plt = _pyplot()
        cells = [s for s in self.summary() if s["K"] == k]
        subjects = sorted({x for s in cells for x in s["subjects"]})
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(subjects) * len(cells) / 3), 4.2))
        width = 0.8 / len(cells)
        for i, s in enumerate(cells):
            at = [subjects.index(x) + (i - len(cells) / 2 + 0.5) * width for x in s["subjects"]]
            ax.bar(at, s["subject_means"], width, label=s["method"],
                   edgecolor="black" if s["method"] == reference else None)  # fmt: skip
        ax.set_xticks(np.arange(len(subjects)), [str(x) for x in subjects])
        ax.set_xlabel("test subject")
        ax.set_ylabel(f"query accuracy, K={k}")
        ax.set_ylim(0.2, 1.0)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def to_dict(self, reference: str | None = None) -> dict:
        """Rows, summary, differences (with ``reference``) and seconds, JSON-able."""
        out = {"k_shots": self.k_shots, "summary": self.summary(), "rows": self.rows,
               "seconds": self.seconds}  # fmt: skip
        if reference is not None:
            out.update(reference=reference, differences=self.differences(reference))
        return out


def _table(first: str, columns: Sequence[str], rows: Mapping[str, Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join([first, *columns]) + " |", "|---" * (len(columns) + 1) + "|"]
    return lines + [f"| {name} | " + " | ".join(c) + " |" for name, c in rows.items()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
