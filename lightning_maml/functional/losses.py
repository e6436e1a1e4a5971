"""Losses of the inner and outer loops: ``(prediction, target) -> scalar``, checked for shape."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error that refuses to broadcast a prediction of the wrong shape.

    Example::

        >>> import torch
        >>> mse_loss(torch.zeros(3, 1), torch.ones(3, 1))
        tensor(1.)
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"loss 'mse' needs the network output to have the target's shape: got output shape "
            f"{tuple(prediction.shape)} for target shape {tuple(target.shape)}"
        )
    return F.mse_loss(prediction, target)


def cross_entropy_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over class dimension 1 that checks the logits fit the integer targets.

    Example::

        >>> import torch
        >>> round(cross_entropy_loss(torch.zeros(2, 4), torch.tensor([0, 3])).item(), 4)
        1.3863
    """
    if target.is_floating_point():
        ok = logits.shape == target.shape
    else:
        ok = logits.dim() == target.dim() + 1 and (
            logits.shape[:1] + logits.shape[2:] == target.shape
        )
    if not ok:
        raise ValueError(
            f"loss 'cross_entropy' needs logits [N, C, ...] for class-index targets [N, ...] (or "
            f"probabilities of the logits' shape): got output shape {tuple(logits.shape)} for "
            f"target shape {tuple(target.shape)}"
        )
    return F.cross_entropy(logits, target)


_LOSSES: dict[str, LossFn] = {"mse": mse_loss, "cross_entropy": cross_entropy_loss}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Turn ``"mse"``, ``"cross_entropy"`` or a callable ``(prediction, target) -> scalar`` into a
    loss function."""
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"`loss` must be one of {sorted(_LOSSES)} or a callable, got {loss!r}")
        return _LOSSES[loss]
    if not callable(loss):
        raise TypeError(f"`loss` must be one of {sorted(_LOSSES)} or a callable, got {loss!r}")
    return loss


def scalar_loss(loss_fn: LossFn, prediction: Tensor, target: Tensor) -> Tensor:
    """``loss_fn(prediction, target)``, refused unless it is a scalar tensor."""
    loss = loss_fn(prediction, target)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"the loss function must return a scalar tensor (reduce over examples), got {shape}"
        )
    return loss
