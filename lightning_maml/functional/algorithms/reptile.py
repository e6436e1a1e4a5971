"""Reptile (Nichol et al. 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lightning_maml.functional.algorithms.base import (
    Algorithm,
)


class Reptile(Algorithm):
    """Reptile (Nichol et al. 2018): the update is ``initial - adapted``, averaged over tasks. Its
    ``loss`` is a surrogate with that gradient, not a loss value, and not the gradient of an
    objective (no finite-difference check)."""

    name = "reptile"
    has_objective = False
    update_note = "its update is the mean over tasks of initial - adapted parameters"

    def __init__(self, adapt: Sequence[str] | None = None) -> None:
        super().__init__(first_order=True, adapt=adapt)

    def outer(
        self, params: Mapping[str, Tensor], adapted: Mapping[str, Tensor], query_loss: Tensor
    ) -> Tensor:
        # gradient w.r.t. params: params - adapted (adapted as values)
        return sum((p * (p.detach() - adapted[n].detach())).sum() for n, p in params.items())
