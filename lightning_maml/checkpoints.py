"""What a :class:`~lightning_maml.MAMLModule` checkpoint records of how it was trained, how a
network is described to be rebuilt from one, and the check that a module loaded from it was
built the same way. (What loading may import at all: :mod:`lightning_maml._trust`.)"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lightning_maml._imports import import_by_path
from lightning_maml.functional import Algorithm
from lightning_maml.functional.algorithms import describe_algorithm
from lightning_maml.functional.losses import describe_loss

#: the checkpoint entry that records what a checkpoint was trained with
CHECKPOINT_KEY = "lightning_maml"


def describe_or_none(algorithm: Algorithm) -> dict[str, Any] | None:
    """:func:`~lightning_maml.functional.algorithms.describe_algorithm`, or ``None`` for an
    algorithm that cannot be described (a class defined inside a function)."""
    try:
        return describe_algorithm(algorithm)
    except TypeError:
        return None


def training_record(loss_fn: Callable, algorithm: Algorithm) -> dict[str, Any]:
    # what a checkpoint records of the loss and the algorithm, to refuse a module rebuilt otherwise
    cls = type(algorithm)
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    return {
        "loss": describe_loss(loss_fn) or f"{getattr(loss_fn, '__module__', '')}.{name}",
        "algorithm": describe_or_none(algorithm)
        or {"class_path": f"{cls.__module__}.{cls.__qualname__}", "repr": algorithm.extra_repr()},
    }


def as_call(description: Mapping[str, Any]) -> str:
    """``ANIL(head=['fc.*'], first_order=True)`` from a description of :func:`training_record`."""
    name = description["class_path"].rpartition(".")[2]
    if "init_args" not in description:
        return f"{name}({description['repr']})"
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in description['init_args'].items())})"


def describe_network(net: nn.Module) -> dict[str, Any] | None:
    """The class path and arguments that rebuild ``net`` (:func:`build_network`), for a network
    that records them as ``init_args`` (this library's models do) and whose class imports by its
    path; ``None`` otherwise.

    Example::

        >>> from lightning_maml.models import MLP
        >>> describe_network(MLP(hidden=[8]))
        {'class_path': 'lightning_maml.models.mlp.MLP', 'init_args': {'in_features': 1, 'hidden': [8], 'out_features': 1}}
    """  # noqa: E501
    cls, args = type(net), getattr(net, "init_args", None)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(args, Mapping) or "<" in path or import_by_path(path) is not cls:
        return None
    return {"class_path": path, "init_args": dict(args)}


def build_network(description: Mapping[str, Any]) -> nn.Module:
    """The network a :func:`describe_network` description (or a LightningCLI config) gives."""
    cls = import_by_path(str(description.get("class_path")))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(
            f"`net` {dict(description)!r} does not name an nn.Module class by its import path"
        )
    return cls(**dict(description.get("init_args") or {}))


def check_training_record(checkpoint: Mapping[str, Any], mine: Mapping[str, Any]) -> Mapping:
    """The checkpoint's record of its training (:data:`CHECKPOINT_KEY`), refused where it is
    missing or names another algorithm or loss than ``mine`` (:func:`training_record` of the
    module loading it), naming what to pass.

    Raises:
        ValueError: naming the algorithm or loss to pass, or the missing record.
    """
    saved = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(saved, Mapping) or not {"loss", "algorithm"} <= set(saved):
        raise ValueError(
            f"this checkpoint has no {CHECKPOINT_KEY!r} entry recording the loss and the "
            "algorithm it was trained with (every checkpoint of a MAMLModule has one): it was "
            "not written by this library or was altered, and was refused"
        )
    problems = []
    if saved["algorithm"] != mine["algorithm"]:
        problems.append(
            f"algorithm {as_call(saved['algorithm'])} (this module has "
            f"{as_call(mine['algorithm'])}): pass algorithm={as_call(saved['algorithm'])}"
        )
    if saved["loss"] != mine["loss"]:
        problems.append(
            f"loss {saved['loss']} (this module has {mine['loss']}): pass that function as loss="
        )
    if problems:
        raise ValueError(
            "this checkpoint was trained with "
            + "; and with ".join(problems)
            + " (e.g. MAMLModule.load_from_checkpoint(path, net=..., algorithm=..., "
            "loss=...)); where it records them as hyper-parameters they are rebuilt without"
        )
    return saved
