"""A drop-in replacement for ``learn2learn.algorithms.MAML``, implemented functionally."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_maml.functional import check_inner_lr, sgd_step


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning wrapper with the interface of ``learn2learn.algorithms.MAML``.

    Finn, Abbeel, Levine 2017, https://arxiv.org/abs/1703.03400.

    ``clone()`` returns a learner that shares the wrapped module's structure and holds its own
    parameter tensors (a differentiable function of the originals) and its own copy of the buffers.
    ``adapt(loss)`` takes one SGD step on those tensors; calling the learner runs the module with
    them through :func:`torch.func.functional_call`. Backpropagating a loss of the learner puts the
    meta-gradient on the original module's parameters. No module is deep-copied.

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
        # set on clones only: the learner's own parameter tensors and buffers
        self._fast_params: dict[str, Tensor] | None = None
        self._fast_buffers: dict[str, Tensor] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._fast_params is None:
            return self.module(*args, **kwargs)
        return functional_call(self.module, (self._fast_params, self._fast_buffers), args, kwargs)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        if self._fast_params is None:
            yield from super().named_parameters(prefix, recurse, remove_duplicate)
            return
        base = prefix + ("." if prefix else "") + "module."
        for name, p in self._fast_params.items():
            yield base + name, p

    def parameters(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self._fast_params is not None:
            return self._fast_params, self._fast_buffers
        return dict(self.module.named_parameters()), dict(self.module.named_buffers())

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MAML:
        """Return a learner to adapt to one task; ``None`` arguments inherit from this object.

        The learner's parameters start equal to (and differentiable w.r.t.) this object's; its
        buffers (e.g. BatchNorm running statistics) are copies, so what one task's forward passes
        write to them stays with that learner.
        """
        params, buffers = self._state()
        learner = MAML(
            self.module,
            self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )
        learner._fast_params = dict(params)
        learner._fast_buffers = {name: b.clone() for name, b in buffers.items()}
        return learner

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """Take one gradient step of size ``lr`` on ``loss`` (a scalar computed with this learner).

        Raises:
            ValueError: if ``loss`` is not a scalar tensor, if a parameter is frozen and
                ``allow_nograd`` is ``False``, or a parameter is unused and ``allow_unused`` is
                ``False``.
            RuntimeError: if called on the wrapper itself rather than on a clone.
        """
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`loss` must be a scalar tensor, got {shape}")
        if self._fast_params is None:
            raise RuntimeError(
                "adapt() updates a learner returned by clone(); call `learner = maml.clone()` and "
                "adapt the learner, so the meta-parameters stay untouched"
            )
        params = self._fast_params
        frozen = [name for name, p in params.items() if not p.requires_grad]
        if frozen and not allow_nograd:
            raise ValueError(
                f"parameters {frozen} do not require grad; pass allow_nograd=True to leave them "
                f"unchanged during adaptation"
            )
        names = [name for name, p in params.items() if p.requires_grad]
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
        self._fast_params = sgd_step(params, dict(zip(names, grads)), self.lr)

    def extra_repr(self) -> str:
        return f"lr={self.lr}, first_order={self.first_order}"
