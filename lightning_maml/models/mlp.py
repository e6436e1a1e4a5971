"""Fully connected network, e.g. the 1-40-40-1 regressor of Finn et al. 2017 §5.1."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU activations between linear layers.

    Args:
        in_features: input size (default 1, the sinusoid's x).
        hidden: sizes of the hidden layers (default ``(40, 40)`` as in the MAML paper).
        out_features: output size (default 1).

    Raises:
        ValueError: if a size is below 1.

    Example::

        >>> import torch
        >>> MLP()(torch.zeros(10, 1)).shape
        torch.Size([10, 1])
    """

    def __init__(
        self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1
    ) -> None:
        super().__init__()
        #: the arguments that rebuild it (a checkpoint of MAMLModule records them)
        self.init_args = {
            "in_features": in_features, "hidden": list(hidden), "out_features": out_features
        }  # fmt: skip
        sizes = [in_features, *hidden, out_features]
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size < 1:
                raise ValueError(f"`{name}` must be >= 1, got {size}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"`hidden` sizes must be >= 1, got {list(hidden)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
