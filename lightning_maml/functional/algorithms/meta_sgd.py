"""Meta-SGD (Li et al. 2017): learned per-parameter inner step sizes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_maml.functional.algorithms.base import (
    Algorithm,
)
from lightning_maml.functional.inner import Schedule


class MetaSGD(Algorithm):
    """Meta-SGD (Li et al. 2017): every adapted parameter has a learned step size of its own
    shape (initialised to ``inner_lr``), meta-trained with the initialisation.

    The learned rates are this module's parameters, one per adapted network parameter.
    """

    name = "metasgd"

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        names = self.adapted(params)
        self.lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(params[n].detach(), inner_lr)) for n in names]
        )
        self._lr_names = names

    def rates(
        self, inner_lr: float, learned: Mapping[str, Tensor], names: Sequence[str]
    ) -> Schedule:
        return {n: learned[f"lrs.{i}"] for i, n in enumerate(self._lr_names)}
