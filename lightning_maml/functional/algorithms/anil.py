"""ANIL, almost no inner loop (Raghu et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_maml.functional.algorithms.base import (
    Algorithm,
)


class ANIL(Algorithm):
    """ANIL, almost no inner loop (Raghu et al. 2020): only the head adapts in the inner loop; the
    body is meta-learned by the outer loop alone.

    Args:
        head: patterns of the parameter names that adapt (e.g. ``["classifier.*"]``); default:
            the parameters of the network's last module that has any (its output layer, for a
            network whose modules are registered in the order they run).
        first_order: constant inner gradients.
    """

    name = "anil"

    def __init__(self, head: Sequence[str] | None = None, first_order: bool = False) -> None:
        super().__init__(first_order=first_order, adapt=head)
        self._default_head: str | None = None

    def adapted(self, params: Mapping[str, Tensor]) -> list[str]:
        if self.adapt is not None:
            return super().adapted(params)
        # the last module with trainable parameters when first set up: freezing it later leaves
        # nothing to adapt rather than moving the head to another layer
        last_module = self._default_head
        if last_module is None:
            last_module = list(params)[-1].rpartition(".")[0]
        return [n for n in params if n.rpartition(".")[0] == last_module]

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        if self.adapt is None and self._default_head is None:
            self._default_head = list(params)[-1].rpartition(".")[0]

    def init_args(self) -> dict[str, Any]:
        return {"head": self.adapt, "first_order": self.first_order}
