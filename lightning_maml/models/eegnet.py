"""EEGNet (Lawhern et al. 2018), written for functional use inside MAML's inner loop."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _max_norm(weight: Tensor, max_norm: float) -> Tensor:
    # rescale each output unit's weights to an L2 norm of at most max_norm (differentiable)
    norms = weight.flatten(1).norm(dim=1).clamp(min=max_norm)
    return weight * (max_norm / norms).view(-1, *([1] * (weight.dim() - 1)))


class SameLengthConv2d(nn.Conv2d):
    """``Conv2d`` with a ``(1, k)`` kernel whose output keeps the input's length in time.

    The same function as ``nn.Conv2d(..., padding="same")`` (zeros, ``(k - 1) // 2`` before and
    ``k // 2`` after), with the padding done by an explicit :func:`torch.nn.functional.pad`: torch's
    own ``"same"`` path copies the input into a padded buffer more slowly (and warns for even
    ``k``), and its convolution kernels run slower with built-in padding on the CPU (EEGNet's
    temporal convolution: 9 ms instead of 14 ms forward + backward for 20 trials of 22 x 256).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, (1, kernel), **kwargs)
        self.time_padding = ((kernel - 1) // 2, kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(F.pad(x, self.time_padding), self.weight, self.bias)


class MaxNormConv2d(nn.Conv2d):
    """``Conv2d`` whose kernel of each output channel is limited to an L2 norm of ``max_norm``."""

    def __init__(self, *args, max_norm: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_norm = max_norm

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _max_norm(self.weight, self.max_norm), self.bias)


class MaxNormLinear(nn.Linear):
    """``Linear`` whose weight row of each output unit is limited to an L2 norm of ``max_norm``."""

    def __init__(self, *args, max_norm: float = 0.25, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_norm = max_norm

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, _max_norm(self.weight, self.max_norm), self.bias)


class EEGNet(nn.Module):
    """EEGNet-F1,D (Lawhern et al. 2018, https://arxiv.org/abs/1611.08024), default EEGNet-8,2.

    Input ``[batch, channels, samples]`` (or ``[batch, 1, channels, samples]``), output logits
    ``[batch, n_classes]``. Blocks, as in the paper: temporal convolution (F1 kernels of length
    ``sampling_rate / 2``) + BatchNorm; depthwise spatial convolution (D per kernel, max-norm 1) +
    BatchNorm + ELU + average pooling 4 + dropout; separable convolution (depthwise 1x16, pointwise
    to F2) + BatchNorm + ELU + average pooling 8 + dropout; dense layer (max-norm 0.25).

    The max-norm constraints are applied as a reparametrisation in ``forward`` (weights rescaled to
    the norm bound when they exceed it) rather than by projecting after each optimizer step, so they
    hold for the adapted parameters of MAML's inner loop as well. Inside
    :class:`~lightning_maml.MAMLModule` BatchNorm uses each task's own statistics.

    Args:
        n_channels: EEG channels (C).
        n_samples: time samples per trial (T).
        n_classes: output classes.
        sampling_rate: Hz; sets the temporal kernel length to ``sampling_rate // 2`` (default 128).
        f1: temporal filters (default 8).
        depth: spatial filters per temporal filter (default 2).
        f2: pointwise filters (default ``f1 * depth``).
        dropout: rate (default 0.25, the paper's cross-subject value; 0.5 within subject).

    Raises:
        ValueError: if a size is below 1, ``n_samples`` < 32, or ``dropout`` is outside [0, 1).

    Example::

        >>> import torch
        >>> net = EEGNet(n_channels=22, n_samples=500, n_classes=4, sampling_rate=250)
        >>> net(torch.randn(3, 22, 500)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        n_channels: int,
        n_samples: int,
        n_classes: int,
        sampling_rate: int = 128,
        f1: int = 8,
        depth: int = 2,
        f2: int | None = None,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        #: the arguments that rebuild it (a checkpoint of MAMLModule records them)
        self.init_args = dict(
            n_channels=n_channels, n_samples=n_samples, n_classes=n_classes,
            sampling_rate=sampling_rate, f1=f1, depth=depth, f2=f2, dropout=dropout,
        )  # fmt: skip
        f2 = f1 * depth if f2 is None else f2
        for name, value in (
            ("n_channels", n_channels),
            ("n_classes", n_classes),
            ("sampling_rate", sampling_rate),
            ("f1", f1),
            ("depth", depth),
            ("f2", f2),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if n_samples < 32:
            raise ValueError(
                f"`n_samples` must be >= 32 (two poolings of 4 and 8), got {n_samples}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}")
        self.n_channels, self.n_samples, self.n_classes = n_channels, n_samples, n_classes
        kernel = max(sampling_rate // 2, 1)
        self.temporal = nn.Sequential(
            SameLengthConv2d(1, f1, kernel, bias=False),
            nn.BatchNorm2d(f1),
        )
        self.spatial = nn.Sequential(
            MaxNormConv2d(f1, f1 * depth, (n_channels, 1), groups=f1, bias=False, max_norm=1.0),
            nn.BatchNorm2d(f1 * depth),
            nn.ELU(),
            nn.AvgPool2d((1, 4)),
            nn.Dropout(dropout),
        )
        self.separable = nn.Sequential(
            SameLengthConv2d(f1 * depth, f1 * depth, 16, groups=f1 * depth, bias=False),
            nn.Conv2d(f1 * depth, f2, 1, bias=False),
            nn.BatchNorm2d(f2),
            nn.ELU(),
            nn.AvgPool2d((1, 8)),
            nn.Dropout(dropout),
        )
        self.classifier = MaxNormLinear(f2 * (n_samples // 32), n_classes, max_norm=0.25)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = self.separable(self.spatial(self.temporal(x)))
        return self.classifier(x.flatten(1))
