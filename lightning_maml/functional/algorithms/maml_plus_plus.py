"""MAML++ (Antoniou et al. 2019): learned per-layer per-step step sizes, the multi-step
loss, per-step BatchNorm."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from lightning_maml._checks import check_count
from lightning_maml.functional.algorithms.base import (
    Algorithm,
)
from lightning_maml.functional.inner import Schedule


class MAMLPlusPlus(Algorithm):
    """MAML++ (Antoniou et al. 2019, "How to train your MAML"), its three changes to the
    objective and the inner loop:

    - LSLR: a learned step size per adapted parameter tensor (per layer) and per inner step,
      initialised to ``inner_lr``; where evaluation takes more steps than training, the later
      steps use the last step's rate.
    - MSL (``msl_epochs``): in the first ``msl_epochs`` training epochs the outer objective is a
      weighted sum of the query losses after every inner step, the weights annealed from uniform
      towards the last step (the paper's schedule: each earlier weight falls by
      ``1 / (steps * msl_epochs)`` per epoch to at least ``0.03 / steps``); later, the last step's
      query loss alone.
    - Derivative-order annealing (``first_order_epochs``): first order in the first
      ``first_order_epochs`` epochs, second order afterwards.
    - Per-step BatchNorm weights and biases (``per_step_bn=True``, BNWB): every BatchNorm layer's
      weight and bias get one learned copy per inner step (initialised from the layer's), used by
      that step's support pass and by the query pass after it (past the trained steps, the last
      step's); they are meta-learned, not adapted in the inner loop, and the layer's own weight
      and bias are then unused.

    Per-step BatchNorm running statistics (BNRS) are not kept: the paper's code and
    learn2learn's ``MetaBatchNorm`` normalise with the batch's statistics at every step, in
    training and evaluation alike, and only collect per-step running statistics; here every task
    is normalised with its own batch statistics the same way, so they would change no output.

    Args:
        msl_epochs: epochs with the multi-step loss (0: never).
        first_order_epochs: epochs of first-order training before second order (0: never).
        adapt: which parameters adapt (see :class:`Algorithm`).
        per_step_bn: per-step BatchNorm weights and biases (the network needs a BatchNorm layer
            with trainable weight and bias).
    """

    name = "maml++"

    def __init__(
        self,
        msl_epochs: int = 10,
        first_order_epochs: int = 0,
        adapt: Sequence[str] | None = None,
        per_step_bn: bool = False,
    ) -> None:
        super().__init__(first_order=False, adapt=adapt)
        self.msl_epochs = check_count(msl_epochs, "msl_epochs", minimum=0)
        self.first_order_epochs = check_count(first_order_epochs, "first_order_epochs", minimum=0)
        if not isinstance(per_step_bn, bool):
            raise TypeError(f"`per_step_bn` must be True or False, got {per_step_bn!r}")
        self.per_step_bn = per_step_bn
        #: the BatchNorm weights and biases that have per-step copies (``per_step_bn``)
        self._norm_names: list[str] = []

    def bind(
        self,
        params: Mapping[str, Tensor],
        inner_lr: float,
        inner_steps: int,
        net: nn.Module | None = None,
    ) -> None:
        if self.per_step_bn and self._bound is None:
            if net is None:
                raise ValueError(
                    "MAMLPlusPlus(per_step_bn=True) finds the BatchNorm layers in the network: "
                    "bind(params, inner_lr, inner_steps, net=<the network>)"
                )
            self._norm_names = [
                f"{prefix}.{kind}"
                for prefix, module in net.named_modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm)
                for kind in ("weight", "bias")
                if f"{prefix}.{kind}" in params
            ]
            if not self._norm_names:
                raise ValueError(
                    f"MAMLPlusPlus(per_step_bn=True): {type(net).__name__} has no BatchNorm layer "
                    "with a trainable weight or bias"
                )
        super().bind(params, inner_lr, inner_steps, net)

    def adapted(self, params: Mapping[str, Tensor]) -> list[str]:
        return [n for n in super().adapted(params) if n not in self._norm_names]

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        names = self.adapted(params)
        steps = max(inner_steps, 1)
        self.lslr = nn.ParameterList(
            [nn.Parameter(params[n].new_full((steps,), inner_lr).detach()) for n in names]
        )
        self._lr_names = names
        if self.per_step_bn:
            self.bn = nn.ParameterList(
                [
                    nn.Parameter(params[n].detach().expand(steps, *params[n].shape).clone())
                    for n in self._norm_names
                ]
            )

    def step_parameters(
        self, learned: Mapping[str, Tensor]
    ) -> Callable[[int], dict[str, Tensor]] | None:
        if not self.per_step_bn:
            return None
        per_name = [(n, learned[f"bn.{i}"]) for i, n in enumerate(self._norm_names)]
        return lambda step: {n: t[min(step, t.shape[0] - 1)] for n, t in per_name}

    def rates(
        self, inner_lr: float, learned: Mapping[str, Tensor], names: Sequence[str]
    ) -> Schedule:
        per_name = [(n, learned[f"lslr.{i}"]) for i, n in enumerate(self._lr_names)]

        def at(step: int) -> dict[str, Tensor]:
            return {n: r[min(step, r.shape[0] - 1)] for n, r in per_name}

        return at

    def is_first_order(self, epoch: int) -> bool:
        return self.first_order or epoch < self.first_order_epochs

    def step_weights(self, inner_steps: int, epoch: int) -> list[float] | None:
        if epoch >= self.msl_epochs or inner_steps < 2:
            return None
        n = inner_steps
        decay = 1.0 / n / self.msl_epochs
        floor = 0.03 / n
        weights = [max(1.0 / n - epoch * decay, floor) for _ in range(n - 1)]
        weights.append(min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor))
        return weights

    def extra_repr(self) -> str:
        return (
            f"msl_epochs={self.msl_epochs}, first_order_epochs={self.first_order_epochs}"
            + (f", adapt={self.adapt}" if self.adapt is not None else "")
            + (", per_step_bn=True" if self.per_step_bn else "")
        )
