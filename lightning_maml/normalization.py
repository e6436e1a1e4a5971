"""Normalisation layers written as mean/variance arithmetic, for exact derivatives under vmap.

torch 2.13 computes wrong second derivatives through its fused ``batch_norm``, ``instance_norm``
and ``layer_norm`` kernels under :func:`torch.func.vmap` (about 1% off on small float64 examples,
against finite differences and the per-task computation). The functions here compute the same
normalisations from :func:`torch.var_mean` and elementwise arithmetic, whose batching and
double-backward rules are right, and :func:`exact_normalization` routes every call of torch's
normalisation functions to them for the duration of a block, so user networks (``nn.BatchNorm2d``,
``nn.LayerNorm``, a module that calls ``F.layer_norm`` itself, ...) are not rewritten.

Inside the block running statistics are read (where a layer asks for them) but never updated: the
meta-loss normalises each task with its own statistics and leaves the network's state alone. Outside
vmap torch's fused kernels are exact and faster; ``exact_normalization(vectorized=False)`` keeps
them and only stops the running-statistics updates.

Example::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    >>> x = torch.randn(5, 3)
    >>> with exact_normalization():
    ...     y = net(x)
    >>> torch.allclose(y, net(x), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "ExactNormalization",
    "batch_norm",
    "support_statistics",
    "exact_normalization",
    "group_norm",
    "instance_norm",
    "layer_norm",
]


def _stats(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    # biased variance and mean, in float32 at least (as torch's kernels accumulate)
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    var, mean = torch.var_mean(x.float() if low_precision else x, dims, keepdim=True, correction=0)
    return var, mean


def _normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    affine_shape: Sequence[int],
) -> Tensor:
    # y = x * scale + shift with per-group scale and shift: one pass over x
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if weight is not None:
        w = weight.reshape(affine_shape)
        scale, shift = scale * w, shift * w
    if bias is not None:
        shift = shift + bias.reshape(affine_shape)
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """:func:`torch.nn.functional.batch_norm` without updating running statistics.

    With ``training=True`` (or no running statistics) the input is normalised with its own
    per-channel statistics over every dimension but the channel dimension 1; otherwise with the
    running statistics.

    Example::

        >>> import torch
        >>> x = torch.randn(6, 3, 4)
        >>> torch.allclose(batch_norm(x, None, None, training=True),
        ...                torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-6)
        True
    """
    shape = _channel_shape(input)
    if training or running_mean is None or running_var is None:
        if input.numel() // input.shape[1] <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(input.shape)}"
            )
        var, mean = _stats(input, [0, *range(2, input.dim())])
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _normalize(input, mean, var, eps, weight, bias, shape)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """:func:`torch.nn.functional.instance_norm` without updating running statistics: each
    example and channel normalised over its spatial dimensions (or with the running statistics
    where ``use_input_stats=False``).

    Example::

        >>> import torch
        >>> x = torch.randn(2, 3, 5)
        >>> torch.allclose(instance_norm(x), torch.nn.functional.instance_norm(x), atol=1e-6)
        True
    """
    shape = _channel_shape(input)
    if use_input_stats or running_mean is None or running_var is None:
        if input.dim() < 3 or input[0, 0].numel() <= 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size "
                f"{list(input.shape)}"
            )
        var, mean = _stats(input, list(range(2, input.dim())))
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _normalize(input, mean, var, eps, weight, bias, shape)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """:func:`torch.nn.functional.layer_norm`: normalised over the last
    ``len(normalized_shape)`` dimensions.

    Example::

        >>> import torch
        >>> x = torch.randn(2, 3, 4)
        >>> torch.allclose(layer_norm(x, [4]), torch.nn.functional.layer_norm(x, [4]), atol=1e-6)
        True
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    n = len(normalized_shape)
    if tuple(input.shape[input.dim() - n :]) != tuple(normalized_shape):
        raise RuntimeError(
            f"layer_norm: normalized_shape {list(normalized_shape)} does not match the trailing "
            f"dimensions of the input of size {list(input.shape)}"
        )
    var, mean = _stats(input, list(range(input.dim() - n, input.dim())))
    return _normalize(input, mean, var, eps, weight, bias, list(normalized_shape))


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """:func:`torch.nn.functional.group_norm`: each example normalised over the channels of each
    of ``num_groups`` groups and the spatial dimensions.

    Example::

        >>> import torch
        >>> x = torch.randn(2, 4, 5)
        >>> torch.allclose(group_norm(x, 2), torch.nn.functional.group_norm(x, 2), atol=1e-6)
        True
    """
    n, c = input.shape[0], input.shape[1]
    if c % num_groups:
        raise RuntimeError(
            f"group_norm: the {c} input channels are not divisible by num_groups={num_groups}"
        )
    grouped = input.reshape(n, num_groups, -1)
    var, mean = _stats(grouped, [2])
    y = _normalize(grouped, mean, var, eps, None, None, []).reshape(input.shape)
    if weight is None and bias is None:
        return y
    shape = _channel_shape(input)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


# torch.* forms, as torch's own functional layers and user code call them
def _torch_batch_norm(
    input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True
):
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(
    input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled
):
    return instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return group_norm(input, num_groups, weight, bias, eps)


ROUTES: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    torch.batch_norm: _torch_batch_norm,
    torch.instance_norm: _torch_instance_norm,
    torch.layer_norm: _torch_layer_norm,
    torch.group_norm: _torch_group_norm,
}


def _fused_batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    if training:  # batch statistics, and no running statistics to update
        running_mean = running_var = None
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _fused_instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    if use_input_stats:
        running_mean = running_var = None
    return F.instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )


def _torch_fused_batch_norm(
    input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True
):
    return _fused_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


def _torch_fused_instance_norm(
    input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled
):
    return _fused_instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )


# outside vmap: torch's kernels, minus the running-statistics updates
FUSED_ROUTES: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.batch_norm: _fused_batch_norm,
    F.instance_norm: _fused_instance_norm,
    torch.batch_norm: _torch_fused_batch_norm,
    torch.instance_norm: _torch_fused_instance_norm,
}


class ExactNormalization(TorchFunctionMode):
    """A :class:`~torch.overrides.TorchFunctionMode` that computes every normalisation function of
    :data:`ROUTES` (``F.batch_norm``, ``F.instance_norm``, ``F.layer_norm``, ``F.group_norm`` and
    their ``torch.*`` forms) with this module's arithmetic and runs every other function
    unchanged; with ``vectorized=False``, torch's own kernels without running-statistics updates
    (:data:`FUSED_ROUTES`). Use it through :func:`exact_normalization`."""

    def __init__(self, vectorized: bool = True) -> None:
        super().__init__()
        self.routes = ROUTES if vectorized else FUSED_ROUTES

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.routes.get(func, func)(*args, **(kwargs or {}))


def exact_normalization(vectorized: bool = True) -> ExactNormalization:
    """Within the ``with`` block, torch's normalisation functions never update running statistics,
    and (``vectorized=True``, for code that runs under :func:`torch.func.vmap`) run as this
    module's mean/variance arithmetic, whose second derivatives are exact under vmap. The engine's
    meta-loss runs every network call inside it."""
    return ExactNormalization(vectorized)


def support_statistics(net: torch.nn.Module, support_x: Tensor) -> None:
    """Make every BatchNorm layer of ``net`` normalise, in eval mode, with the statistics of
    ``support_x`` (one batch through ``net``): its running mean and variance become that batch's
    (the variance unbiased, as torch keeps it), whatever they were and whether or not the layer
    tracked any. Dropout and other layers stay in eval mode meanwhile; ``net`` is left in eval mode.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False))
        >>> support = torch.randn(8, 2)
        >>> support_statistics(net, support)
        >>> hidden = net[0](support)
        >>> torch.allclose(net[1].running_mean, hidden.mean(0).detach())
        True
        >>> torch.allclose(net(support[:1]), net(support)[:1])  # one trial or many: the same
        True
    """
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    net.eval()
    if not norms:
        return
    momenta = []
    for norm in norms:
        reference = norm.weight if norm.weight is not None else next(net.parameters(), None)
        device = None if reference is None else reference.device
        dtype = None if reference is None else reference.dtype
        norm.track_running_stats = True
        norm.running_mean = torch.zeros(norm.num_features, device=device, dtype=dtype)
        norm.running_var = torch.ones(norm.num_features, device=device, dtype=dtype)
        norm.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)
        momenta.append(norm.momentum)
        norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
        norm.train()
    try:
        with torch.no_grad():
            net(support_x)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        net.eval()
