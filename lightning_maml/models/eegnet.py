"""EEGNet (Lawhern et al. 2018), written for functional use inside MAML's inner loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _max_norm(weight: Tensor, max_norm: float) -> Tensor:
    # rescale each output unit's weights to an L2 norm of at most max_norm (differentiable)
    norms = weight.flatten(1).norm(dim=1).clamp(min=max_norm)
    return weight * (max_norm / norms).view(-1, *([1] * (weight.dim() - 1)))


def _fast_length(n: int) -> int:
    """The smallest ``2^a 3^b 5^c >= n``: FFT lengths pocketfft and cuFFT compute fast."""
    n = int(n)  # a size under torch.jit.trace is a tensor; the network's lengths are fixed
    best = 1 << max(n - 1, 0).bit_length()
    p2 = 1
    while p2 < best:
        p3 = p2
        while p3 < best:
            p5 = p3
            while p5 < best:
                if p5 >= n:
                    best = p5
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best


def window_moments(x: Tensor, pad_left: int, pad_right: int) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the windows a ``(1, K)`` convolution reads, in float64, no graph.

    For ``x`` of shape ``[..., T]`` zero-padded to ``xp`` by ``pad_left`` and ``pad_right``
    samples (``K = pad_left + pad_right + 1``), window ``k`` is ``xp[..., t + k]``; over every
    row and every ``t < T``, ``mean[k]`` is its mean and ``cov[k, k']`` the (biased) covariance
    of windows ``k`` and ``k'``. A temporal filter ``w`` then gives outputs of mean ``w @ mean``
    and variance ``w @ cov @ w``: the batch statistics of a convolution, without computing it.

    Computed from the lagged products: their sums over the whole signal by one FFT, minus the
    few products at the edges that a window leaves out (``O(rows * T * log T + rows * K^2)``
    instead of the ``rows * T * K^2`` of the windows' Gram matrix).

    Example::

        >>> import torch
        >>> x = torch.randn(4, 50)
        >>> mean, cov = window_moments(x, 2, 2)
        >>> windows = torch.nn.functional.pad(x, (2, 2)).unfold(1, 50, 1)  # [4, 5, 50]
        >>> torch.allclose(cov[1, 3], torch.cov(windows.transpose(0, 1).reshape(5, -1),
        ...                                     correction=0)[1, 3].double())
        True
    """
    x = x.detach().double().reshape(-1, x.shape[-1])
    rows, length = x.shape
    size = pad_left + pad_right + 1
    count = rows * length
    k = torch.arange(size, device=x.device)
    shift = k - pad_left  # window k reads x[t + shift], zero outside [0, length)
    sums = F.pad(x.sum(0).cumsum(0), (1, 0))  # sums[i]: of the columns before i
    mean = (sums[(shift + length).clamp(0, length)] - sums[shift.clamp(0, length)]) / count
    # lagged[d]: sum of x[i] x[i + d] over rows and i, for lags d < K (no wrap-around)
    n = _fast_length(length + size - 1)
    spectrum = torch.fft.rfft(x, n=n)
    power = spectrum.real.square().add_(spectrum.imag.square()).sum(0)
    lagged = torch.fft.irfft(power, n=n)[:size]
    # the lagged products a window leaves out: i < shift (at most pad_right of them) and
    # i >= shift + length (from length - pad_left on)
    padded = F.pad(x, (size, 2 * size))
    lag = k[:, None]

    def products(first: int, width: int) -> Tensor:  # [lag, i]: x[first + i] x[first + i + d]
        i = torch.arange(width, device=x.device)
        at = padded[:, size + first : size + first + width]
        gram = at.T @ padded[:, size + first : size + first + width + size]
        return gram[i[None, :], i[None, :] + lag]

    head = F.pad(products(0, pad_right).cumsum(1), (1, 0))  # [d, s]: i < s
    tail = products(length - pad_left, pad_left).flip(1).cumsum(1).flip(1)
    tail = F.pad(tail, (0, 1))  # [d, k]: i >= length - pad_left + k
    kept = lagged[:, None] - head[:, shift.clamp(0, pad_right)] - tail[:, k.clamp(max=pad_left)]
    # kept[d, k] is the sum for windows k and k + d
    band = (k[None] - k[:, None]).abs() * size + torch.minimum(k[None], k[:, None])
    second = kept.reshape(-1)[band.flatten()].view(size, size) / count
    return mean, second - torch.outer(mean, mean)


def fft_correlate(signal: Tensor, kernel: Tensor, length: int) -> Tensor:
    """``out[..., t] = sum_k kernel[..., k] signal[..., t + k]`` for ``t < length``, by FFT:
    a depthwise ``conv1d`` without padding, whose CPU kernels are slow for long kernels.
    16-bit inputs are computed in float32 (torch's CPU FFT has no 16-bit kernels).

    Example::

        >>> import torch
        >>> u, w = torch.randn(2, 3, 40), torch.randn(3, 9)
        >>> direct = torch.nn.functional.conv1d(u, w[:, None], groups=3)
        >>> torch.allclose(fft_correlate(u, w, 32), direct, atol=1e-5)
        True
    """
    if torch.finfo(signal.dtype).bits < 32:
        signal = signal.float()
    if torch.finfo(kernel.dtype).bits < 32:
        kernel = kernel.float()
    n = _fast_length(signal.shape[-1])
    product = torch.fft.rfft(signal, n=n) * torch.fft.rfft(kernel, n=n).conj()
    return torch.fft.irfft(product, n=n)[..., :length]


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

    With ``fused=True`` (default) the first two blocks up to the spatial convolution are computed
    in the order that costs least, the same function: the temporal filters, their BatchNorm and
    the spatial filters are linear in the signal once the BatchNorm's statistics are known, and
    those statistics are quadratic forms of the filters (:func:`window_moments`), so each spatial
    filter mixes the channels first and its temporal filter runs on that one mixed signal (by
    FFT, :func:`fft_correlate`), never on every channel. That is F1 * D filtered signals instead
    of F1 * C, about ten times fewer operations for EEGNet-8,2 on 22 channels, and no
    ``[batch, F1, C, T]`` activations; second-order MAML on EEGNet runs about 4-5x faster on a
    CPU, whatever algorithm runs it. The BatchNorm layer's parameters, running statistics and
    their updates are those of ``temporal[1]``, as in ``fused=False``, which computes the
    layers one after another.

    Args:
        n_channels: EEG channels (C).
        n_samples: time samples per trial (T).
        n_classes: output classes.
        sampling_rate: Hz; sets the temporal kernel length to ``sampling_rate // 2`` (default 128).
        f1: temporal filters (default 8).
        depth: spatial filters per temporal filter (default 2).
        f2: pointwise filters (default ``f1 * depth``).
        dropout: rate (default 0.25, the paper's cross-subject value; 0.5 within subject).
        fused: compute the first blocks in the cheaper order above (default); ``False`` runs
            the layers one after another (same parameters, same function up to rounding).
        dense_max_norm: the dense layer's max-norm bound (default 0.25, the paper's); ``None``
            makes it a plain ``nn.Linear`` (e.g. for
            :class:`~lightning_maml.functional.ProtoMAML`, whose prototype initialisation of the
            output layer assumes one).

    Raises:
        ValueError: if a size is below 1, ``n_samples`` < 32, ``dropout`` is outside [0, 1) or
            ``dense_max_norm`` is not above 0;
            in ``forward``, if the input's channels are not ``n_channels``.

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
        fused: bool = True,
        dense_max_norm: float | None = 0.25,
    ) -> None:
        super().__init__()
        #: the arguments that rebuild it (a checkpoint of MAMLModule records them)
        self.init_args = dict(
            n_channels=n_channels, n_samples=n_samples, n_classes=n_classes,
            sampling_rate=sampling_rate, f1=f1, depth=depth, f2=f2, dropout=dropout,
            fused=fused, dense_max_norm=dense_max_norm,
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
        if not isinstance(fused, bool):
            raise TypeError(f"`fused` must be True or False, got {fused!r}")
        self.fused = fused
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
        features = f2 * (n_samples // 32)
        if dense_max_norm is None:
            self.classifier = nn.Linear(features, n_classes)
        else:
            if not dense_max_norm > 0:
                raise ValueError(f"`dense_max_norm` must be > 0 or None, got {dense_max_norm!r}")
            self.classifier = MaxNormLinear(features, n_classes, max_norm=dense_max_norm)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-2] != self.n_channels:
            raise ValueError(
                f"EEGNet was built for n_channels={self.n_channels}, got input of shape "
                f"{tuple(x.shape)} ([batch, channels, samples] or [batch, 1, channels, samples])"
            )
        if x.shape[-1] != self.n_samples:
            rate = self.init_args["sampling_rate"]
            raise ValueError(
                f"EEGNet was built for n_samples={self.n_samples} ({self.n_samples / rate:g} s at "
                f"sampling_rate={rate} Hz), got {x.shape[-1]} samples per trial (input shape "
                f"{tuple(x.shape)}): cut the trials to the window it was trained on"
            )
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if self.fused and x.shape[1] == 1:
            x = self.spatial[1:](self._temporal_spatial(x[:, 0]))
        else:
            x = self.spatial(self.temporal(x))
        return self.classifier(self.separable(x).flatten(1))

    def _temporal_spatial(self, signal: Tensor) -> Tensor:
        """``spatial[0](temporal(signal))`` for ``[batch, channels, samples]`` trials: each
        spatial filter's channel mixture, filtered by its temporal filter, scaled and shifted by
        the temporal BatchNorm (whose statistics are quadratic forms of the filters)."""
        conv, norm = self.temporal
        spatial = self.spatial[0]
        samples = signal.shape[-1]
        pad_left, pad_right = conv.time_padding
        filters = conv.weight.flatten(1)  # [F1, K]
        mixing = _max_norm(spatial.weight, spatial.max_norm).flatten(1)  # [F1 * D, C]
        depth = spatial.out_channels // conv.out_channels
        if norm.training or (norm.running_mean is None and norm.running_var is None):
            window_mean, window_cov = window_moments(signal, pad_left, pad_right)
            mean = filters @ window_mean.to(filters.dtype)
            var = ((filters @ window_cov.to(filters.dtype)) * filters).sum(1)
            if norm.training and norm.track_running_stats and norm.running_mean is not None:
                _update_running_stats(norm, mean, var, signal.numel())
        else:
            mean, var = norm.running_mean, norm.running_var
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = norm.weight * scale
        shift = -scale * mean if norm.bias is None else norm.bias - scale * mean
        mixed = F.pad(torch.einsum("nct,gc->ngt", signal, mixing), (pad_left, pad_right))
        filtered = fft_correlate(mixed, filters.repeat_interleave(depth, 0), samples)
        offset = shift.repeat_interleave(depth) * mixing.sum(1)
        out = scale.repeat_interleave(depth)[:, None] * filtered + offset[:, None]
        return out.unsqueeze(2)  # [batch, F1 * D, 1, samples]


def _update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What a training-mode ``BatchNorm`` does to its running statistics with a batch of these
    (biased) statistics over ``count`` values per channel: torch's documented update (momentum,
    or the cumulative average for ``momentum=None``; the variance unbiased)."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        norm.running_mean.mul_(1 - factor).add_(factor * mean.to(norm.running_mean.dtype))
        norm.running_var.mul_(1 - factor).add_(factor * unbiased.to(norm.running_var.dtype))
