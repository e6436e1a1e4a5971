"""A drop-in replacement for ``learn2learn.algorithms.MetaSGD``: MAML with learned step sizes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_maml._checks import check_inner_lr
from lightning_maml.maml import MAML, clone_module


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017, https://arxiv.org/abs/1707.09835) with the interface of
    ``learn2learn.algorithms.MetaSGD``: every parameter has a learned step size of its own shape,
    meta-trained with the initialisation.

    ``clone()`` and the learner's semantics are :class:`~lightning_maml.MAML`'s; the learner holds
    differentiable clones of the step sizes, and ``adapt(loss)`` replaces each parameter by
    ``p - lr_p * grad`` (elementwise). Backpropagating a loss of the learner puts the
    meta-gradient on the original parameters and on :attr:`lrs`. With ``first_order=True`` the
    gradients in ``adapt`` are constants; the step sizes still get a meta-gradient.

    The same algorithm for :class:`~lightning_maml.MAMLModule` is ``algorithm="metasgd"``
    (:class:`lightning_maml.functional.MetaSGD`).

    Args:
        model: the network to meta-learn; any ``nn.Module``.
        lr: initial value of every step size (default 1.0, as learn2learn's).
        first_order: if ``True``, ``adapt`` treats gradients as constants.
        lrs: the step sizes, one tensor per parameter of ``model`` (in ``model.parameters()``
            order, of its shape); default: ``lr`` everywhere, as new parameters.

    Raises:
        TypeError, ValueError: if ``lr`` is not a finite real number, ``model`` is not a module,
            or ``lrs`` does not match the parameters.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> meta_sgd = MetaSGD(nn.Linear(1, 1), lr=0.01)
        >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
        >>> learner = meta_sgd.clone()
        >>> learner.adapt(nn.functional.mse_loss(learner(x), y))
        >>> nn.functional.mse_loss(learner(x), y).backward()
        >>> meta_sgd.lrs[0].grad.shape    # the weight's step sizes got a meta-gradient
        torch.Size([1, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Sequence[Tensor] | None = None,
    ) -> None:
        super().__init__(model, lr, first_order=first_order)
        params = list(model.parameters())
        if lrs is None:
            lrs = nn.ParameterList(
                [
                    nn.Parameter(torch.full_like(p.detach(), check_inner_lr(lr, "lr")))
                    for p in params
                ]
            )
        shapes = [tuple(t.shape) for t in lrs]
        if shapes != [tuple(p.shape) for p in params]:
            raise ValueError(
                f"`lrs` must hold one tensor per parameter of `model`, of its shape: got shapes "
                f"{shapes} for parameters of shapes {[tuple(p.shape) for p in params]}"
            )
        self.lrs = lrs

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MetaSGD:
        """Return a learner to adapt to one task (see :meth:`MAML.clone`), with differentiable
        clones of the step sizes."""
        learner = MetaSGD(
            clone_module(self.module),
            self.lr,
            first_order=self.first_order if first_order is None else first_order,
            lrs=[t.clone() for t in self.lrs],
        )
        learner.allow_unused = self.allow_unused if allow_unused is None else allow_unused
        learner.allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        learner._is_clone = True
        return learner

    def _step_size(self, index: int) -> Tensor:
        return self.lrs[index]
