"""A drop-in replacement for ``learn2learn.algorithms.MAML``, with learn2learn's clone semantics."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from lightning_maml._checks import check_inner_lr


def clone_module(module: nn.Module) -> nn.Module:
    """A module tree of its own with ``module``'s structure and settings: new module objects whose
    parameters are ``p.clone()`` of the originals (differentiable tensors, a snapshot of their
    values: a later optimizer step on the originals leaves the clone as it was) and whose buffers
    are copies. Parameters shared between submodules stay shared. Forward hooks registered so far
    are kept; hooks registered later on either tree stay with it.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> clone = clone_module(net)
        >>> clone[0].weight is net[0].weight, clone[0].weight.grad_fn is not None
        (False, True)
    """
    tensors: dict[int, Tensor] = {}
    modules: dict[int, nn.Module] = {}

    def copy(original: nn.Module) -> nn.Module:
        if id(original) in modules:  # a submodule used twice stays one module
            return modules[id(original)]
        clone = original.__class__.__new__(original.__class__)
        clone.__dict__ = original.__dict__.copy()
        modules[id(original)] = clone
        for name, value in original.__dict__.items():
            if name.endswith("hooks") and isinstance(value, OrderedDict):
                clone.__dict__[name] = OrderedDict(value)
        clone._parameters = {}
        for name, p in original._parameters.items():
            if p is not None and id(p) not in tensors:
                tensors[id(p)] = p.clone()
            clone._parameters[name] = None if p is None else tensors[id(p)]
        clone._buffers = {}
        for name, b in original._buffers.items():
            if b is not None and id(b) not in tensors:
                tensors[id(b)] = b.clone()
            clone._buffers[name] = None if b is None else tensors[id(b)]
        clone._modules = {
            name: None if child is None else copy(child)
            for name, child in original._modules.items()
        }
        return clone

    return copy(module)


def update_module(module: nn.Module, updates: dict[int, Tensor]) -> None:
    """Replace, everywhere in ``module``'s tree, each parameter tensor ``p`` with
    ``updates[id(p)]`` where given (shared parameters are replaced together)."""
    for submodule in module.modules():
        for name, p in submodule._parameters.items():
            if p is not None and id(p) in updates:
                submodule._parameters[name] = updates[id(p)]


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning wrapper with the interface of ``learn2learn.algorithms.MAML``.

    Finn, Abbeel, Levine 2017, https://arxiv.org/abs/1703.03400.

    ``clone()`` returns a learner around a module tree of its own (:func:`clone_module`), as
    learn2learn's does: its parameters are differentiable clones of the originals, its buffers
    copies. ``adapt(loss)`` takes one SGD step, replacing the learner's parameter tensors by
    ``p - lr * grad`` throughout its tree, so everything that reads the learner's modules sees the
    adapted network: ``learner(x)``, ``learner.module.features(x)``, ``learner.module.head.weight``,
    ``state_dict()``, hooks. ``.to``, ``.train()`` / ``.eval()`` act on the learner alone, and a
    learner is a snapshot: an optimizer step on the originals afterwards leaves it as it was.
    Backpropagating a loss of the learner puts the meta-gradient on the original parameters.

    Args:
        model: the network to meta-learn; any ``nn.Module``.
        lr: inner-loop (adaptation) step size; a finite real number.
        first_order: if ``True``, ``adapt`` treats gradients as constants (first-order MAML).
        allow_unused: allow parameters that the adaptation loss does not use (they stay unchanged).
            Defaults to ``allow_nograd``.
        allow_nograd: allow parameters with ``requires_grad=False`` (they stay unchanged and get no
            gradient). If ``False`` (default), such a parameter makes ``adapt`` raise.

    Raises:
        TypeError, ValueError: if ``lr`` is not a finite real number or ``model`` is not a module.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> maml = MAML(nn.Linear(1, 1), lr=0.01)
        >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
        >>> learner = maml.clone()
        >>> learner.adapt(nn.functional.mse_loss(learner(x), y))
        >>> nn.functional.mse_loss(learner(x), y).backward()   # meta-gradient on maml's parameters
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.module = model
        self.lr = check_inner_lr(lr, "lr")
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self._is_clone = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MAML:
        """Return a learner to adapt to one task; ``None`` arguments inherit from this object.

        The learner wraps :func:`clone_module` of this object's module: a module tree of its own
        whose parameters are differentiable clones of this object's (so a loss of the learner
        backpropagates into them) and whose buffers are copies (what one task's forward passes
        write to them, e.g. BatchNorm running statistics, stays with that learner).
        """
        learner = MAML(
            clone_module(self.module),
            self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )
        learner._is_clone = True
        return learner

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """Take one gradient step of size ``lr`` on ``loss`` (a scalar computed with this learner):
        every parameter tensor of the learner's module tree is replaced by ``p - lr * grad``.

        Raises:
            ValueError: if ``loss`` is not a scalar tensor, if a parameter is frozen and
                ``allow_nograd`` is ``False``, or a parameter is unused and ``allow_unused`` is
                ``False``.
            RuntimeError: if called on the wrapper itself rather than on a clone (it would
                replace the meta-parameters by their adapted values).
        """
        if not self._is_clone:
            raise RuntimeError(
                "adapt() updates a learner returned by clone(); call `learner = maml.clone()` and "
                "adapt the learner, so the meta-parameters stay untouched"
            )
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`loss` must be a scalar tensor, got {shape}")
        params = dict(self.module.named_parameters())
        frozen = [name for name, p in params.items() if not p.requires_grad]
        if params and len(frozen) == len(params):
            raise ValueError(
                "no parameter of this learner requires grad, so it has nothing to adapt: a "
                "learner cloned under torch.no_grad() or torch.inference_mode() (or from a frozen "
                "model) holds copies without a graph. Call clone() and adapt() with gradients "
                "enabled (evaluate under no_grad only after adapting; for evaluation without a "
                "meta-gradient, clone(first_order=True))"
            )
        if not loss.requires_grad:
            raise ValueError(
                "`loss` does not require grad: it was computed under torch.no_grad() or from "
                "tensors without a graph to this learner's parameters; compute the adaptation "
                "loss with gradients enabled"
            )
        if frozen and not allow_nograd:
            raise ValueError(
                f"parameters {frozen} do not require grad; pass allow_nograd=True to leave them "
                f"unchanged during adaptation"
            )
        names = [name for name, p in params.items() if p.requires_grad]
        position = {name: i for i, name in enumerate(params)}
        second_order = not first_order
        grads = torch.autograd.grad(
            loss,
            [params[name] for name in names],
            retain_graph=second_order,
            create_graph=second_order,
            allow_unused=True,
        )
        unused = [name for name, g in zip(names, grads) if g is None]
        if unused and not allow_unused:
            raise ValueError(
                f"parameters {unused} are not used by `loss`; pass allow_unused=True to leave them "
                f"unchanged during adaptation"
            )
        updates = {
            id(params[name]): params[name] - self._step_size(position[name]) * g
            for name, g in zip(names, grads)
            if g is not None
        }
        update_module(self.module, updates)

    def _step_size(self, index: int) -> float | Tensor:
        """The step size of the ``index``-th parameter (in ``module.parameters()`` order)."""
        return self.lr

    def extra_repr(self) -> str:
        return f"lr={self.lr}, first_order={self.first_order}"
