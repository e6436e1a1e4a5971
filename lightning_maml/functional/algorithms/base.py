"""The base of the family: :class:`Algorithm`, the context a task runs in, and the key prefix of
learned tensors."""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from lightning_maml.episode import Episode
from lightning_maml.functional.inner import Schedule, adapt_parameters
from lightning_maml.functional.losses import LossFn, scalar_loss
from lightning_maml.functional.parameters import forward

#: the key prefix of an algorithm's learned tensors among the engine's inputs
LEARNED = "@algorithm."


def split_prefixed(
    values: Mapping[str, Tensor], prefix: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(entries without prefix, entries with it, the prefix removed)``.

    Example::

        >>> split_prefixed({"w": 1, "@a.lr": 2}, "@a.")
        ({'w': 1}, {'lr': 2})
    """
    rest = {n: t for n, t in values.items() if not n.startswith(prefix)}
    prefixed = {n[len(prefix) :]: t for n, t in values.items() if n.startswith(prefix)}
    return rest, prefixed


class TaskContext(NamedTuple):
    """What one task's computation runs with besides its parameters and data: the network (run
    functionally with :func:`~lightning_maml.functional.forward`), its loss, the tensors that
    stand in for its buffers and frozen parameters, the inner loop's settings, and how the task
    runs (``vectorized``: under :func:`torch.func.vmap`; ``checkpoint``: checkpointed steps)."""

    net: nn.Module
    loss_fn: LossFn
    constants: dict[str, Tensor]
    inner_lr: float
    inner_steps: int
    first_order: bool = False
    checkpoint: bool = False
    vectorized: bool = False

    def loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The loss of the network with ``params`` on ``(x, y)``."""
        prediction = forward(self.net, params, self.constants, x, self.vectorized)
        return scalar_loss(self.loss_fn, prediction, y)

    def predict(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The network's outputs with ``params`` on ``x``."""
        return forward(self.net, params, self.constants, x, self.vectorized)


class Algorithm(nn.Module):
    """Base of the MAML family: second-order MAML unless a subclass says otherwise.

    Args:
        first_order: treat the inner gradients as constants (first-order MAML).
        adapt: names of the parameters that adapt in the inner loop, as ``fnmatch`` patterns
            (``"head.*"``); ``None`` (default) adapts every trainable parameter. The others are
            meta-learned by the outer loop only.
    """

    name: ClassVar[str] = "maml"
    #: the update is the gradient of :meth:`outer`'s objective (finite differences can check it)
    has_objective: ClassVar[bool] = True
    #: where it is not, what the update is instead (for messages)
    update_note: ClassVar[str] = ""
    #: what non-finite meta-gradients can mean for this algorithm beyond diverging data or
    #: adaptation (for the message of a non-finite training step)
    nonfinite_note: ClassVar[str] = ""

    def __init__(self, first_order: bool = False, adapt: Sequence[str] | None = None) -> None:
        super().__init__()
        if not isinstance(first_order, bool):
            raise TypeError(f"`first_order` must be True or False, got {first_order!r}")
        if adapt is not None:
            if isinstance(adapt, str) or not all(isinstance(a, str) for a in adapt) or not adapt:
                raise TypeError(
                    f"`adapt` must be None or a non-empty list of parameter-name patterns, "
                    f"got {adapt!r}"
                )
            adapt = list(adapt)
        self.first_order = first_order
        self.adapt = adapt
        self._bound: tuple[str, ...] | None = None

    # ---- set up once per network ------------------------------------------------------------
    def bind(
        self,
        params: Mapping[str, Tensor],
        inner_lr: float,
        inner_steps: int,
        net: nn.Module | None = None,
    ) -> None:
        """Set the algorithm up for a network with these trainable ``params`` (called by
        :class:`~lightning_maml.MAMLModule` at construction, and by the engine on every call,
        with the network as ``net``): checks that ``adapt`` selects something and creates
        learned tensors.

        Binding again to the same parameters, or to some of them (a layer frozen since, which then
        stays fixed), does nothing more; to parameters it was not set up for raises where the
        algorithm has learned tensors (it has none for them), and otherwise sets it up for those.
        """
        names = tuple(params)
        if self._bound is not None and not set(names) <= set(self._bound) and self.learned():
            new = [n for n in names if n not in self._bound]
            raise ValueError(
                f"{type(self).__name__} was set up for parameters {list(self._bound)}, which do "
                f"not include {new}, and has learned tensors for those only: use one algorithm "
                "object per network, and unfreeze a parameter only if it was trainable when the "
                "algorithm was set up"
            )
        if not self.adapted(params):
            frozen = "" if self._bound is None else " (the others are frozen)"
            raise ValueError(
                f"`adapt={self.adapt!r}` selects none of the trainable parameters "
                f"{list(names)}{frozen}"
            )
        if self._bound is not None and set(names) <= set(self._bound):
            return
        self._bind(params, inner_lr, inner_steps)
        self._bound = names

    def init_args(self) -> dict[str, Any]:
        """The arguments that rebuild this algorithm (``type(self)(**init_args())``), saved in
        :class:`~lightning_maml.MAMLModule`'s checkpoints: by default each ``__init__`` argument
        read from the attribute of the same name. A subclass whose arguments are stored otherwise
        overrides this; one that cannot be described raises ``TypeError``."""
        args = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name == "self":
                continue
            if not hasattr(self, name):
                raise TypeError(
                    f"{type(self).__name__}.init_args() cannot read `{name}`: override "
                    "init_args() to return the arguments that rebuild it"
                )
            args[name] = getattr(self, name)
        return args

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        """Create learned tensors (subclasses)."""

    # ---- what the engine asks -----------------------------------------------------------------
    def adapted(self, params: Mapping[str, Tensor]) -> list[str]:
        """Names of the parameters that adapt in the inner loop, in ``params``' order."""
        if self.adapt is None:
            return list(params)
        return [n for n in params if any(fnmatch.fnmatchcase(n, a) for a in self.adapt)]

    def learned(self) -> dict[str, Tensor]:
        """The algorithm's learned tensors (inner step sizes), by name."""
        return dict(self.named_parameters())

    def rates(
        self, inner_lr: float, learned: Mapping[str, Tensor], names: Sequence[str]
    ) -> Schedule:
        """Inner step sizes for the adapted ``names``, from ``learned`` (tensors standing in for
        :meth:`learned`): a number, a mapping name -> rate, or a function step -> either."""
        return inner_lr

    def step_parameters(
        self, learned: Mapping[str, Tensor]
    ) -> Callable[[int], dict[str, Tensor]] | None:
        """Tensors (from ``learned``) that stand in for some parameters that do not adapt, for
        the forward passes of each inner step (a function ``step -> {name: tensor}``; the query
        pass after the last step uses the last step's), or ``None``: the parameters themselves."""
        return None

    def is_first_order(self, epoch: int) -> bool:
        """Whether the inner gradients are constants in the given training epoch."""
        return self.first_order

    def step_weights(self, inner_steps: int, epoch: int) -> list[float] | None:
        """Weights of the query losses after each inner step in the outer objective, or ``None``
        for the query loss after the last step alone."""
        return None

    def outer(
        self, params: Mapping[str, Tensor], adapted: Mapping[str, Tensor], query_loss: Tensor
    ) -> Tensor:
        """The task's outer objective from its (weighted) query loss: the query loss itself."""
        return query_loss

    def check_support(self, params: Mapping[str, Tensor], support_y: Tensor) -> None:
        """Refuse a calibration support set (one task's ``[K, ...]`` targets) this algorithm
        cannot adapt on, before adapting (:meth:`~lightning_maml.MAMLModule.adapt`); every
        support set by default."""

    def start(
        self, context: TaskContext, params: dict[str, Tensor], support_x: Tensor, support_y: Tensor
    ) -> dict[str, Tensor]:
        """One task's parameters before the inner loop, from the meta-learned ``params`` and the
        task's support set: ``params`` themselves, unless the algorithm initialises some per task
        (a head from the support set). The query loss "before adapting" is taken here."""
        return params

    def task(
        self,
        context: TaskContext,
        params: dict[str, Tensor],
        learned: dict[str, Tensor],
        episode: Episode,
        step_weights: Tensor | None = None,
        anchor: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One task's ``(outer objective, query loss after adapting, query predictions)`` on its
        ``episode`` (one task's tensors), the objective differentiable with respect to
        ``params`` and ``learned`` (the algorithm's tensors); the engine runs it per task, under
        vmap or compiled (``context``).

        The family's common computation: :func:`adapt_parameters` on the support set from
        ``params`` with :meth:`rates`, the query loss after the last step (or the losses after
        every step weighted by ``step_weights``), then :meth:`outer`. ``anchor`` (first order
        only): ``(params, learned)`` of the point where the inner gradients are taken. An
        algorithm whose meta-gradient is computed otherwise (implicit MAML) overrides this.
        """
        names = self.adapted(params)
        start = params if self.has_objective else {n: p.detach() for n, p in params.items()}
        stand_ins = self.step_parameters(learned)
        anchor_params = anchor_lr = anchor_stand_ins = None
        if anchor is not None:
            anchor_params, anchor_learned = anchor
            anchor_lr = self.rates(context.inner_lr, anchor_learned, names)
            anchor_stand_ins = self.step_parameters(anchor_learned)
        steps = adapt_parameters(
            context.net,
            start,
            context.constants,
            context.loss_fn,
            episode.support_x,
            episode.support_y,
            self.rates(context.inner_lr, learned, names),
            context.inner_steps,
            first_order=context.first_order,
            checkpoint=context.checkpoint,
            vectorized=context.vectorized,
            adapt=names,
            anchor=anchor_params,
            anchor_lr=anchor_lr,
            trajectory=True,
            step_parameters=stand_ins,
            anchor_step_parameters=anchor_stand_ins,
        )
        adapted = steps[-1] if steps else start

        def seen_at(step: int, values: dict[str, Tensor]) -> dict[str, Tensor]:
            return values if stand_ins is None else {**values, **stand_ins(step)}

        last = max(context.inner_steps - 1, 0)
        prediction, query_loss = self.query(context, seen_at(last, adapted), episode)
        objective = query_loss
        if step_weights is not None and len(steps) > 1:
            losses = [
                context.loss(seen_at(k, p), episode.query_x, episode.query_y)
                for k, p in enumerate(steps[:-1])
            ]
            weights = step_weights.to(query_loss.dtype)
            objective = (torch.stack([*losses, query_loss]) * weights).sum()
        return self.outer(params, adapted, objective), query_loss, prediction

    def query(
        self, context: TaskContext, values: Mapping[str, Tensor], episode: Episode
    ) -> tuple[Tensor, Tensor]:
        """The task's query predictions and query loss with the parameter ``values`` (its adapted
        parameters): what every algorithm's :meth:`task` scores."""
        prediction = context.predict(values, episode.query_x)
        return prediction, scalar_loss(context.loss_fn, prediction, episode.query_y)

    def adapt_values(
        self,
        context: TaskContext,
        params: dict[str, Tensor],
        learned: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
    ) -> dict[str, Tensor]:
        """One task's parameters after its inner loop on ``support_x``/``support_y`` (one task's
        ``[K, ...]`` tensors), as values without a graph: what :meth:`task` evaluates the query
        set with, for calibrating a new task (:meth:`~lightning_maml.MAMLModule.adapt`). Run it
        with gradients enabled (the inner loop takes gradients)."""
        params = {n: p.detach() for n, p in params.items()}
        start = self.start(context, params, support_x, support_y)
        start = {n: p.detach() for n, p in start.items()}
        names = self.adapted(start)
        stand_ins = self.step_parameters(learned)
        adapted = adapt_parameters(
            context.net,
            start,
            context.constants,
            context.loss_fn,
            support_x,
            support_y,
            self.rates(context.inner_lr, learned, names),
            context.inner_steps,
            first_order=True,
            adapt=names,
            step_parameters=stand_ins,
        )
        if stand_ins is not None:  # as the query pass after the last step sees them
            adapted = {**adapted, **stand_ins(max(context.inner_steps - 1, 0))}
        return {n: t.detach() for n, t in adapted.items()}

    def with_order(self, first_order: bool) -> Algorithm:
        """This algorithm with first- or second-order inner gradients, sharing learned tensors
        (for comparing the two, e.g. in :class:`~lightning_maml.callbacks.MetaGradientLogger`)."""
        other = copy.copy(self)
        other.first_order = first_order
        other.is_first_order = lambda epoch: first_order  # type: ignore[method-assign]
        return other

    def describe(self) -> str:
        """The algorithm's name and settings, for messages."""
        return f"algorithm={self.name!r} ({type(self).__name__}: {self.extra_repr()})"

    def extra_repr(self) -> str:
        parts = [f"first_order={self.first_order}"]
        if self.adapt is not None:
            parts.append(f"adapt={self.adapt}")
        return ", ".join(parts)
