"""ProtoMAML (Triantafillou et al. 2020): each task's head from its class prototypes."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_maml.functional.algorithms.base import (
    Algorithm,
    TaskContext,
)


class ProtoMAML(Algorithm):
    """ProtoMAML (Triantafillou et al. 2020, "Meta-Dataset"): each task's output layer starts from
    the class prototypes of its support set, then the inner loop adapts.

    The network is a body followed by a linear head (``weight [n_classes, features]``, ``bias
    [n_classes]``). For a task, ``c_k`` is the mean of the body's outputs (the head's inputs) over
    the support examples of class ``k``; the head starts at weight ``2 c_k`` and bias
    ``-||c_k||^2`` (the linear form of a nearest-prototype classifier under squared Euclidean
    distance), and the inner loop adapts from there (every parameter by default). The
    meta-gradient reaches the body through the prototypes as well as through the adaptation
    (second order; ``first_order=True``: through the prototypes and the identity, fo-Proto-MAML).
    The head's own parameters are replaced in every task and get no meta-gradient; they give the
    number of classes. A class without support examples gets a zero prototype in training
    (refused by :meth:`~lightning_maml.MAMLModule.adapt`, which checks first). The head must
    compute ``x @ weight.T + bias``: one that constrains its weight (EEGNet's max-norm dense
    layer rescales ``2 c_k`` but not the bias) starts from another classifier
    (``EEGNet(dense_max_norm=None)`` has a plain one).

    Args:
        head: patterns of the head's two parameters (e.g. ``["classifier.*"]``); default: the
            parameters of the network's last module that has any, as :class:`ANIL`.
        first_order: constant inner gradients.
        adapt: which parameters adapt in the inner loop (default all, the head included).

    Raises:
        ValueError: when set up, if the head is not a weight ``[n, d]`` and a bias ``[n]``; on a
            task with floating-point support labels (ProtoMAML classifies).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_maml.functional import meta_loss
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> sx, qx = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
        >>> sy = qy = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
        >>> out = meta_loss(net, "cross_entropy", sx, sy, qx, qy, inner_lr=0.1,
        ...                 algorithm=ProtoMAML())
        >>> out.loss.backward()
        >>> bool(net[0].weight.grad.abs().sum() > 0)  # the body, also through the prototypes
        True
    """

    name = "protomaml"

    def __init__(
        self,
        head: Sequence[str] | None = None,
        first_order: bool = False,
        adapt: Sequence[str] | None = None,
    ) -> None:
        super().__init__(first_order=first_order, adapt=adapt)
        if head is not None and (isinstance(head, str) or not head):
            raise TypeError(f"`head` must be None or a non-empty list of patterns, got {head!r}")
        self.head = None if head is None else list(head)
        self._head_names: tuple[str, str] | None = None

    def _find_head(self, params: Mapping[str, Tensor]) -> tuple[str, str]:
        if self.head is None:
            module = list(params)[-1].rpartition(".")[0]
            names = [n for n in params if n.rpartition(".")[0] == module]
        else:
            names = [n for n in params if any(fnmatch.fnmatchcase(n, h) for h in self.head)]
        weight = [n for n in names if params[n].dim() == 2]
        bias = [n for n in names if params[n].dim() == 1]
        if len(names) != 2 or len(weight) != 1 or len(bias) != 1:
            raise ValueError(
                f"ProtoMAML needs a linear head of a weight [n_classes, features] and a bias "
                f"[n_classes]; head={self.head!r} selects {names} with shapes "
                f"{[tuple(params[n].shape) for n in names]}"
            )
        (w,), (b,) = weight, bias
        if params[w].shape[0] != params[b].shape[0]:
            raise ValueError(
                f"the head's weight {w} {tuple(params[w].shape)} and bias {b} "
                f"{tuple(params[b].shape)} disagree on the number of classes"
            )
        return w, b

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        if self._head_names is None:
            self._head_names = self._find_head(params)

    def check_support(self, params: Mapping[str, Tensor], support_y: Tensor) -> None:
        """A support set without some of the head's classes would give them zero prototypes:
        refused, naming them."""
        weight_name, _ = self._head_names or self._find_head(params)
        if support_y.is_floating_point():
            return  # start() names it
        classes = params[weight_name].shape[0]
        missing = sorted(set(range(classes)) - set(support_y.flatten().tolist()))
        if missing:
            raise ValueError(
                f"ProtoMAML starts each class's head from its support examples, but `support_y` "
                f"has none of classes {missing} (of the head's {classes}): give at least one "
                "trial of every class"
            )

    def start(
        self, context: TaskContext, params: dict[str, Tensor], support_x: Tensor, support_y: Tensor
    ) -> dict[str, Tensor]:
        weight_name, bias_name = self._head_names or self._find_head(params)
        if support_y.is_floating_point():
            raise ValueError(
                f"ProtoMAML classifies: its support labels must be class indices, got "
                f"{support_y.dtype} labels"
            )
        head = context.net.get_submodule(weight_name.rpartition(".")[0])
        seen: list[Tensor] = []
        handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            context.predict(params, support_x)
        finally:
            handle.remove()
        embeddings = seen[0].flatten(1)  # the head's input: [K, features]
        classes = params[weight_name].shape[0]
        onehot = nn.functional.one_hot(support_y.long(), classes).to(embeddings.dtype)
        counts = onehot.sum(0).clamp(min=1)
        prototypes = (onehot.T @ embeddings) / counts[:, None]  # [classes, features]
        return {
            **params,
            weight_name: 2 * prototypes,
            bias_name: -(prototypes**2).sum(1),
        }

    def init_args(self) -> dict[str, Any]:
        return {"head": self.head, "first_order": self.first_order, "adapt": self.adapt}

    def extra_repr(self) -> str:
        parts = [f"first_order={self.first_order}"]
        if self.head is not None:
            parts.append(f"head={self.head}")
        if self.adapt is not None:
            parts.append(f"adapt={self.adapt}")
        return ", ".join(parts)
