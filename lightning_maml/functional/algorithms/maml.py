"""MAML and first-order MAML (Finn et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_maml.functional.algorithms.base import (
    Algorithm,
)


class MAML(Algorithm):
    """Second-order MAML (Finn et al. 2017): every parameter adapts with one step size, and the
    meta-gradient flows through every inner step. ``first_order=True`` is first-order MAML."""

    name = "maml"


class FOMAML(Algorithm):
    """First-order MAML (Finn et al. 2017, §5.2): the inner gradients are constants."""

    name = "fomaml"

    def __init__(self, adapt: Sequence[str] | None = None) -> None:
        super().__init__(first_order=True, adapt=adapt)
