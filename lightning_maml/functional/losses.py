"""Losses of the inner and outer loops: ``(prediction, target) -> scalar``, checked for shape."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_maml._imports import import_by_path

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A loss: ``(predictions, targets) -> scalar``, e.g. :func:`mse_loss` or your own function."""


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
    Class indices of any integer dtype (``uint8``, ``int32``, ``bool``, ...) are read as
    ``int64``, the dtype torch's cross-entropy takes, alike under vmap and task by task.

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
    if not target.is_floating_point() and target.dtype != torch.int64:
        target = target.long()
    return F.cross_entropy(logits, target)


_LOSSES: dict[str, LossFn] = {"mse": mse_loss, "cross_entropy": cross_entropy_loss}
#: losses registered by their import paths (:func:`register_loss`): checkpoints may name them
_REGISTERED_LOSSES: dict[str, LossFn] = {}


def register_loss(loss: LossFn) -> LossFn:
    """Trust ``loss``, a function importable by its path, to be named by checkpoints: a
    checkpoint trained with it then reloads without ``loss=`` (loading never imports or calls a
    function a checkpoint names unless it is this library's, torch's or registered); a decorator.

    Example::

        >>> @register_loss
        ... def huber(prediction, target):
        ...     return F.huber_loss(prediction, target)
        >>> describe_loss(huber) in _REGISTERED_LOSSES
        True
    """
    if not callable(loss):
        raise TypeError(f"`loss` must be a callable (prediction, target) -> scalar, got {loss!r}")
    module, name = getattr(loss, "__module__", None), getattr(loss, "__qualname__", "")
    if not module or "<" in name:
        raise ValueError(
            f"`loss` {loss!r} has no import path (a lambda or a local function): only a function "
            "defined at a module's top level can be named by a checkpoint; pass it as loss= "
            "when loading instead"
        )
    _REGISTERED_LOSSES[f"{module}.{name}"] = loss
    return loss


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Turn ``"mse"``, ``"cross_entropy"``, a callable ``(prediction, target) -> scalar`` or the
    import path of one (``"torch.nn.functional.l1_loss"``) into a loss function.

    Example::

        >>> resolve_loss("torch.nn.functional.l1_loss") is F.l1_loss
        True
    """
    if isinstance(loss, str):
        if loss in _LOSSES:
            return _LOSSES[loss]
        imported = _import_callable(loss)
        if imported is None:
            raise ValueError(
                f"`loss` must be one of {sorted(_LOSSES)}, the import path of a loss function or "
                f"a callable, got {loss!r}"
            )
        return imported
    if not callable(loss):
        raise TypeError(f"`loss` must be one of {sorted(_LOSSES)} or a callable, got {loss!r}")
    return loss


def _import_callable(path: str) -> LossFn | None:
    value = import_by_path(path)
    return value if callable(value) else None


def describe_loss(loss: str | LossFn) -> str | None:
    """What rebuilds ``loss`` with :func:`resolve_loss`: its name, or the import path of a
    function that can be imported by it; ``None`` for other callables (a lambda, a closure, an
    object).

    Example::

        >>> describe_loss("mse"), describe_loss(F.l1_loss), describe_loss(lambda p, t: p.sum())
        ('mse', 'torch.nn.functional.l1_loss', None)
    """
    if isinstance(loss, str):
        return loss
    module, name = getattr(loss, "__module__", None), getattr(loss, "__qualname__", "")
    if not module or "<" in name or not isinstance(loss, type(describe_loss)):
        return None
    path = f"{module}.{name}"
    if _REGISTERED_LOSSES.get(path) is loss:
        return path
    return path if _import_callable(path) is loss else None


def scalar_loss(loss_fn: LossFn, prediction: Tensor, target: Tensor) -> Tensor:
    """``loss_fn(prediction, target)``, refused unless it is a scalar tensor."""
    loss = loss_fn(prediction, target)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"the loss function must return a scalar tensor (reduce over examples), got {shape}"
        )
    return loss
