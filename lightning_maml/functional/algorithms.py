"""The MAML family as objects: what an algorithm adapts, with which steps, and what it optimises.

An :class:`Algorithm` says which parameters adapt in the inner loop (:meth:`~Algorithm.adapted`),
the inner step sizes (:meth:`~Algorithm.rates`, learned where the algorithm owns parameters),
whether the inner loop is differentiated (:meth:`~Algorithm.is_first_order`), how the query losses
make the outer objective (:meth:`~Algorithm.step_weights`, :meth:`~Algorithm.outer`), and whether
its update is the gradient of that objective (:attr:`~Algorithm.has_objective`, which decides
whether :class:`~lightning_maml.callbacks.MetaGradientCheck` applies). The engine runs every
algorithm through the same task function (:func:`task_meta_loss`), vectorised, in a loop or
compiled. An algorithm with learned tensors is an ``nn.Module``: inside a
:class:`~lightning_maml.MAMLModule` they are meta-trained with the network and saved in its
checkpoints.

Adding an algorithm is a subclass that overrides some of these methods, registered under a name
with :func:`register_algorithm`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_maml.functional import meta_loss
    >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> anil = ANIL()  # adapts the last layer with parameters: net[2]
    >>> sx, sy, qx, qy = (torch.randn(4, 5, 1) for _ in range(4))
    >>> meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, algorithm=anil).loss.backward()
    >>> anil.adapted(dict(net.named_parameters()))
    ['2.weight', '2.bias']
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from lightning_maml._checks import check_count, check_inner_lr
from lightning_maml._imports import import_by_path
from lightning_maml.episode import Episode
from lightning_maml.functional.inner import Schedule, adapt_parameters
from lightning_maml.functional.losses import LossFn, scalar_loss
from lightning_maml.functional.parameters import forward

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "IMAML",
    "MAML",
    "Algorithm",
    "MAMLPlusPlus",
    "MetaSGD",
    "ProtoMAML",
    "Reptile",
    "TaskContext",
    "describe_algorithm",
    "register_algorithm",
    "resolve_algorithm",
    "split_prefixed",
    "task_meta_loss",
]

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
        prediction = context.predict(seen_at(last, adapted), episode.query_x)
        query_loss = scalar_loss(context.loss_fn, prediction, episode.query_y)
        objective = query_loss
        if step_weights is not None and len(steps) > 1:
            losses = [
                context.loss(seen_at(k, p), episode.query_x, episode.query_y)
                for k, p in enumerate(steps[:-1])
            ]
            weights = step_weights.to(query_loss.dtype)
            objective = (torch.stack([*losses, query_loss]) * weights).sum()
        return self.outer(params, adapted, objective), query_loss, prediction

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


class MAML(Algorithm):
    """Second-order MAML (Finn et al. 2017): every parameter adapts with one step size, and the
    meta-gradient flows through every inner step. ``first_order=True`` is first-order MAML."""

    name = "maml"


class FOMAML(Algorithm):
    """First-order MAML (Finn et al. 2017, §5.2): the inner gradients are constants."""

    name = "fomaml"

    def __init__(self, adapt: Sequence[str] | None = None) -> None:
        super().__init__(first_order=True, adapt=adapt)


class Reptile(Algorithm):
    """Reptile (Nichol et al. 2018): the update is ``initial - adapted``, averaged over tasks. Its
    ``loss`` is a surrogate with that gradient, not a loss value, and not the gradient of an
    objective (no finite-difference check)."""

    name = "reptile"
    has_objective = False
    update_note = "its update is the mean over tasks of initial - adapted parameters"

    def __init__(self, adapt: Sequence[str] | None = None) -> None:
        super().__init__(first_order=True, adapt=adapt)

    def outer(
        self, params: Mapping[str, Tensor], adapted: Mapping[str, Tensor], query_loss: Tensor
    ) -> Tensor:
        # gradient w.r.t. params: params - adapted (adapted as values)
        return sum((p * (p.detach() - adapted[n].detach())).sum() for n, p in params.items())


class ANIL(Algorithm):
    """ANIL, almost no inner loop (Raghu et al. 2020): only the head adapts in the inner loop; the
    body is meta-learned by the outer loop alone.

    Args:
        head: patterns of the parameter names that adapt (e.g. ``["classifier.*"]``); default:
            the parameters of the network's last module that has any (its output layer, for a
            network whose modules are registered in the order they run).
        first_order: constant inner gradients.
    """

    name = "anil"

    def __init__(self, head: Sequence[str] | None = None, first_order: bool = False) -> None:
        super().__init__(first_order=first_order, adapt=head)
        self._default_head: str | None = None

    def adapted(self, params: Mapping[str, Tensor]) -> list[str]:
        if self.adapt is not None:
            return super().adapted(params)
        # the last module with trainable parameters when first set up: freezing it later leaves
        # nothing to adapt rather than moving the head to another layer
        last_module = self._default_head
        if last_module is None:
            last_module = list(params)[-1].rpartition(".")[0]
        return [n for n in params if n.rpartition(".")[0] == last_module]

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        if self.adapt is None and self._default_head is None:
            self._default_head = list(params)[-1].rpartition(".")[0]

    def init_args(self) -> dict[str, Any]:
        return {"head": self.adapt, "first_order": self.first_order}


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


class MetaSGD(Algorithm):
    """Meta-SGD (Li et al. 2017): every adapted parameter has a learned step size of its own
    shape (initialised to ``inner_lr``), meta-trained with the initialisation.

    The learned rates are this module's parameters, one per adapted network parameter.
    """

    name = "metasgd"

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        names = self.adapted(params)
        self.lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(params[n].detach(), inner_lr)) for n in names]
        )
        self._lr_names = names

    def rates(
        self, inner_lr: float, learned: Mapping[str, Tensor], names: Sequence[str]
    ) -> Schedule:
        return {n: learned[f"lrs.{i}"] for i, n in enumerate(self._lr_names)}


class MAMLPlusPlus(Algorithm):
    """MAML++ (Antoniou et al. 2019, "How to train your MAML"), its three changes to the
    objective and the inner loop:

    - LSLR: a learned step size per adapted parameter tensor (per layer) and per inner step,
      initialised to ``inner_lr``; where evaluation takes more steps than training, the later
      steps use the last step's rate.
    - MSL (``msl_epochs``): in the first ``msl_epochs`` training epochs the outer objective is a
      weighted sum of the query losses after every inner step, the weights annealed from uniform
      towards the last step (the paper's schedule: each earlier weight falls by
      ``1 / (steps * msl_epochs)`` per epoch to at least ``0.03 / steps``); later, the last step's
      query loss alone.
    - Derivative-order annealing (``first_order_epochs``): first order in the first
      ``first_order_epochs`` epochs, second order afterwards.
    - Per-step BatchNorm weights and biases (``per_step_bn=True``, BNWB): every BatchNorm layer's
      weight and bias get one learned copy per inner step (initialised from the layer's), used by
      that step's support pass and by the query pass after it (past the trained steps, the last
      step's); they are meta-learned, not adapted in the inner loop, and the layer's own weight
      and bias are then unused.

    Per-step BatchNorm running statistics (BNRS) are not kept: the paper's code and
    learn2learn's ``MetaBatchNorm`` normalise with the batch's statistics at every step, in
    training and evaluation alike, and only collect per-step running statistics; here every task
    is normalised with its own batch statistics the same way, so they would change no output.

    Args:
        msl_epochs: epochs with the multi-step loss (0: never).
        first_order_epochs: epochs of first-order training before second order (0: never).
        adapt: which parameters adapt (see :class:`Algorithm`).
        per_step_bn: per-step BatchNorm weights and biases (the network needs a BatchNorm layer
            with trainable weight and bias).
    """

    name = "maml++"

    def __init__(
        self,
        msl_epochs: int = 10,
        first_order_epochs: int = 0,
        adapt: Sequence[str] | None = None,
        per_step_bn: bool = False,
    ) -> None:
        super().__init__(first_order=False, adapt=adapt)
        self.msl_epochs = check_count(msl_epochs, "msl_epochs", minimum=0)
        self.first_order_epochs = check_count(first_order_epochs, "first_order_epochs", minimum=0)
        if not isinstance(per_step_bn, bool):
            raise TypeError(f"`per_step_bn` must be True or False, got {per_step_bn!r}")
        self.per_step_bn = per_step_bn
        #: the BatchNorm weights and biases that have per-step copies (``per_step_bn``)
        self._norm_names: list[str] = []

    def bind(
        self,
        params: Mapping[str, Tensor],
        inner_lr: float,
        inner_steps: int,
        net: nn.Module | None = None,
    ) -> None:
        if self.per_step_bn and self._bound is None:
            if net is None:
                raise ValueError(
                    "MAMLPlusPlus(per_step_bn=True) finds the BatchNorm layers in the network: "
                    "bind(params, inner_lr, inner_steps, net=<the network>)"
                )
            self._norm_names = [
                f"{prefix}.{kind}"
                for prefix, module in net.named_modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm)
                for kind in ("weight", "bias")
                if f"{prefix}.{kind}" in params
            ]
            if not self._norm_names:
                raise ValueError(
                    f"MAMLPlusPlus(per_step_bn=True): {type(net).__name__} has no BatchNorm layer "
                    "with a trainable weight or bias"
                )
        super().bind(params, inner_lr, inner_steps, net)

    def adapted(self, params: Mapping[str, Tensor]) -> list[str]:
        return [n for n in super().adapted(params) if n not in self._norm_names]

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        names = self.adapted(params)
        steps = max(inner_steps, 1)
        self.lslr = nn.ParameterList(
            [nn.Parameter(params[n].new_full((steps,), inner_lr).detach()) for n in names]
        )
        self._lr_names = names
        if self.per_step_bn:
            self.bn = nn.ParameterList(
                [
                    nn.Parameter(params[n].detach().expand(steps, *params[n].shape).clone())
                    for n in self._norm_names
                ]
            )

    def step_parameters(
        self, learned: Mapping[str, Tensor]
    ) -> Callable[[int], dict[str, Tensor]] | None:
        if not self.per_step_bn:
            return None
        per_name = [(n, learned[f"bn.{i}"]) for i, n in enumerate(self._norm_names)]
        return lambda step: {n: t[min(step, t.shape[0] - 1)] for n, t in per_name}

    def rates(
        self, inner_lr: float, learned: Mapping[str, Tensor], names: Sequence[str]
    ) -> Schedule:
        per_name = [(n, learned[f"lslr.{i}"]) for i, n in enumerate(self._lr_names)]

        def at(step: int) -> dict[str, Tensor]:
            return {n: r[min(step, r.shape[0] - 1)] for n, r in per_name}

        return at

    def is_first_order(self, epoch: int) -> bool:
        return self.first_order or epoch < self.first_order_epochs

    def step_weights(self, inner_steps: int, epoch: int) -> list[float] | None:
        if epoch >= self.msl_epochs or inner_steps < 2:
            return None
        n = inner_steps
        decay = 1.0 / n / self.msl_epochs
        floor = 0.03 / n
        weights = [max(1.0 / n - epoch * decay, floor) for _ in range(n - 1)]
        weights.append(min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor))
        return weights

    def extra_repr(self) -> str:
        return (
            f"msl_epochs={self.msl_epochs}, first_order_epochs={self.first_order_epochs}"
            + (f", adapt={self.adapt}" if self.adapt is not None else "")
            + (", per_step_bn=True" if self.per_step_bn else "")
        )


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def _gradient_on(
    context: TaskContext, x: Tensor, y: Tensor
) -> Callable[[dict[str, Tensor], Mapping[str, Tensor]], dict[str, Tensor]]:
    """``(moving, others) ->`` the gradient of the loss on ``(x, y)`` with respect to ``moving``
    (``others``: the rest of the parameters)."""

    def loss(moving: dict[str, Tensor], others: Mapping[str, Tensor]) -> Tensor:
        return context.loss({**others, **moving}, x, y)

    return torch.func.grad(loss)


class IMAML(Algorithm):
    """Implicit MAML (Rajeswaran et al. 2019, "Meta-Learning with Implicit Gradients").

    Each task solves a regularised inner problem, ``min_phi L_support(phi) + lam/2 ||phi -
    theta||^2``, approximately, by ``inner_steps`` gradient steps of size ``inner_lr`` from
    ``theta``, keeping no graph. The meta-gradient of the query loss at the solution ``phi*`` is
    the implicit one, ``(I + H/lam)^-1 grad L_query(phi*)`` with ``H`` the support loss's Hessian
    at ``phi*``, solved by ``cg_steps`` iterations of conjugate gradient on Hessian-vector
    products (stopping early, per task, once the residual's norm is at most ``cg_tol`` times the
    right-hand side's). Memory does not grow with ``inner_steps``: the point of it for long
    adaptations.

    Parameters that do not adapt (``adapt``) get the gradient of the query loss through
    ``phi*`` as well: ``dL/dtheta_f - (1/lam) M^T v`` with ``M`` the support gradient's
    derivative with respect to them and ``v`` the solve above.

    The update is the gradient of the query loss at the exact minimiser of the regularised
    problem; with finitely many inner steps and CG iterations it approximates it (no
    finite-difference check of the ``inner_steps``-step loss applies: the engine's ``loss`` is the
    query loss at ``phi``, its gradient the implicit one).

    That gradient exists where the regularised problem is convex at ``phi``: ``I + H/lam``
    positive definite, i.e. no Hessian eigenvalue of the support loss at or below ``-lam``.
    Where conjugate gradient meets a direction of zero or negative curvature of ``I + H/lam``,
    the system has no such solution (CG's iterates then depend on rounding and can grow without
    bound), and that task's meta-gradient, with the meta-loss, is NaN rather than a number: a
    :class:`~lightning_maml.MAMLModule` then stops (or skips the step, ``on_nonfinite="skip"``)
    and says so. A larger ``lam`` keeps the problem convex.

    Exactly when that guard holds: CG meets such a direction within its ``cg_steps`` iterations
    (those before its residual falls below ``cg_tol``) exactly when ``I + H/lam`` is not positive
    definite on the Krylov subspace those iterations span, from the query gradient. With as
    many iterations as adapted parameters (in exact arithmetic) that is whenever the problem is
    not convex; with fewer, e.g. the default 5, a non-convex task whose query gradient barely
    reaches the negative directions can get a finite meta-gradient that solves the system only
    on that subspace: not the implicit gradient, which does not exist there. The guard is a
    detector of what CG saw, not a proof of convexity; a ``lam`` above the magnitude of the most
    negative Hessian eigenvalue is what makes every task's gradient exist.

    Args:
        lam: the regularisation strength ``lam`` > 0 (larger: ``phi*`` stays nearer ``theta``);
            it must exceed the magnitude of the support loss's most negative Hessian eigenvalue
            (the default 1.0 suits losses of a classifier's scale; the sinusoid MLP's regression
            needs 100 at initialisation and more as it trains), and the inner steps converge
            for ``inner_lr * (lam + h) < 2``, ``h`` the largest eigenvalue.
        cg_steps: conjugate-gradient iterations (0: the first-order approximation, the gradient
            of the query loss at ``phi*`` itself).
        cg_tol: relative residual at which CG stops, >= 0 (0: run every iteration).
        first_order: the first-order approximation regardless of ``cg_steps``.
        adapt: which parameters adapt (see :class:`Algorithm`).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_maml.functional import meta_loss
        >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> sx, sy, qx, qy = (torch.randn(4, 5, 1) for _ in range(4))
        >>> out = meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, inner_steps=20,
        ...                 algorithm=IMAML(lam=2.0))
        >>> out.loss.backward()
    """

    name = "imaml"
    has_objective = False
    update_note = (
        "its update is the implicit gradient at the exact minimiser of the regularised inner "
        "problem, which finitely many inner steps only approach"
    )
    nonfinite_note = (
        "implicit MAML marks with NaN the meta-gradient of a task whose regularised inner problem "
        "is not convex at its adapted parameters (conjugate gradient met non-positive curvature "
        "of I + H/lam, H the support loss's Hessian): no implicit gradient exists there; a larger "
        "lam (above the magnitude of H's most negative eigenvalue) keeps it convex"
    )

    def __init__(
        self,
        lam: float = 1.0,
        cg_steps: int = 5,
        cg_tol: float = 1e-10,
        first_order: bool = False,
        adapt: Sequence[str] | None = None,
    ) -> None:
        super().__init__(first_order=first_order, adapt=adapt)
        self.lam = check_inner_lr(lam, "lam", positive=True)
        self.cg_steps = check_count(cg_steps, "cg_steps", minimum=0)
        if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not cg_tol >= 0:
            raise ValueError(f"`cg_tol` must be a number >= 0, got {cg_tol!r}")
        self.cg_tol = float(cg_tol)

    def task(
        self,
        context: TaskContext,
        params: dict[str, Tensor],
        learned: dict[str, Tensor],
        episode: Episode,
        step_weights: Tensor | None = None,
        anchor: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        names = self.adapted(params)
        theta = {n: params[n] for n in names}
        fixed = {n: p for n, p in params.items() if n not in theta}
        # first order: gradients at the anchor (finite differences around it); else at params
        at = anchor[0] if anchor is not None else params
        center = {n: at[n].detach() for n in names}
        still = {n: at[n].detach() for n in fixed}
        support_grad = _gradient_on(context, episode.support_x, episode.support_y)
        phi = self._inner_solve(support_grad, center, still, context)
        prediction = context.predict({**fixed, **phi}, episode.query_x)
        query_loss = scalar_loss(context.loss_fn, prediction, episode.query_y)
        query_grad = _gradient_on(context, episode.query_x, episode.query_y)
        rhs = {n: g.detach() for n, g in query_grad(phi, still).items()}
        if context.first_order or self.cg_steps == 0:
            v = rhs
        else:
            v = self._solve(lambda m: support_grad(m, still), phi, rhs)
        # a surrogate with the query loss's value and the implicit gradient
        objective = query_loss + sum(((theta[n] - center[n]) * v[n]).sum() for n in names)
        if not context.first_order and any(p.requires_grad for p in fixed.values()):
            cross = _dot(support_grad(phi, fixed), v)
            objective = objective - (cross - cross.detach()) / self.lam
        return objective, query_loss, prediction

    def _inner_solve(
        self,
        support_grad: Callable[..., dict[str, Tensor]],
        center: dict[str, Tensor],
        still: Mapping[str, Tensor],
        context: TaskContext,
    ) -> dict[str, Tensor]:
        """``inner_steps`` gradient steps on ``L_support(phi) + lam/2 ||phi - center||^2`` from
        ``center``, values only (``still``: the parameters that do not adapt)."""
        phi, lr = dict(center), context.inner_lr
        for _ in range(context.inner_steps):
            g = support_grad(phi, still)
            phi = {
                n: (phi[n] - lr * (g[n] + self.lam * (phi[n] - center[n]))).detach() for n in phi
            }
        return phi

    def adapt_values(
        self,
        context: TaskContext,
        params: dict[str, Tensor],
        learned: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
    ) -> dict[str, Tensor]:
        names = self.adapted(params)
        center = {n: params[n].detach() for n in names}
        still = {n: p.detach() for n, p in params.items() if n not in center}
        support_grad = _gradient_on(context, support_x, support_y)
        return {**still, **self._inner_solve(support_grad, center, still, context)}

    def _solve(
        self,
        gradient: Callable[[dict[str, Tensor]], dict[str, Tensor]],
        phi: dict[str, Tensor],
        rhs: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """``(I + H/lam)^-1 rhs`` by conjugate gradient, ``H`` the Jacobian of ``gradient`` (the
        support loss's Hessian) at ``phi``; Hessian-vector products by reverse mode twice, the
        one second derivative the engine relies on everywhere. Fixed iterations (vmap and
        compile need them); a task whose residual is small enough stops changing. A direction of
        zero or negative curvature (``p @ A p <= 0``: ``A`` not positive definite, the system
        without the solution the implicit gradient needs) makes the task's result NaN."""
        _, hvp = torch.func.vjp(gradient, phi)

        def operator(u: dict[str, Tensor]) -> dict[str, Tensor]:
            (h,) = hvp(u)
            return {n: (u[n] + h[n] / self.lam).detach() for n in u}

        x = {n: torch.zeros_like(r) for n, r in rhs.items()}
        r = dict(rhs)
        p = dict(rhs)
        rr = _dot(r, r)
        stop = rr * self.cg_tol**2
        indefinite = torch.zeros_like(rr, dtype=torch.bool)
        zero = torch.zeros_like(rr)
        for _ in range(self.cg_steps):
            active = (rr > stop) & ~indefinite
            ap = operator(p)
            curvature = _dot(p, ap)
            indefinite = indefinite | (active & ~(curvature > 0))  # NaN counts as non-positive
            active = active & ~indefinite
            alpha = torch.where(active, rr / curvature, zero)
            x = {n: x[n] + alpha * p[n] for n in x}
            r = {n: r[n] - alpha * ap[n] for n in r}
            new_rr = _dot(r, r)
            beta = torch.where(active, new_rr / rr, zero)
            p = {n: r[n] + beta * p[n] for n in p}
            rr = torch.where(active, new_rr, rr)
        undefined = torch.full_like(rr, math.nan)
        return {n: torch.where(indefinite, undefined, x[n]) for n in x}

    def extra_repr(self) -> str:
        parts = [f"lam={self.lam}", f"cg_steps={self.cg_steps}", f"cg_tol={self.cg_tol}"]
        if self.first_order:
            parts.append("first_order=True")
        if self.adapt is not None:
            parts.append(f"adapt={self.adapt}")
        return ", ".join(parts)


_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Make ``cls`` available by its ``name`` (``MAMLModule(algorithm=name)``); a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"only Algorithm subclasses can be registered, got {cls!r}")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (MAML, FOMAML, Reptile, ANIL, MetaSGD, MAMLPlusPlus, IMAML, ProtoMAML):
    register_algorithm(_cls)

ALGORITHMS: tuple[str, ...] = tuple(_REGISTRY)
"""The names ``algorithm=`` takes for the built-in algorithms (each with its default settings)."""


def describe_algorithm(algorithm: Algorithm) -> dict[str, Any]:
    """The class and arguments that rebuild ``algorithm`` with :func:`resolve_algorithm`, as
    LightningCLI writes them (``{"class_path": ..., "init_args": ...}``); its learned tensors
    are not included (they are state, saved with the module's ``state_dict``).

    Raises:
        TypeError: if the algorithm's class cannot be imported by its path or its arguments
            cannot be read (see :meth:`Algorithm.init_args`).

    Example::

        >>> describe_algorithm(ANIL(head=["fc.*"]))
        {'class_path': 'lightning_maml.functional.algorithms.ANIL', 'init_args': {'head': ['fc.*'], 'first_order': False}}
    """  # noqa: E501
    cls = type(algorithm)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if "<" in path or import_by_path(path) is not cls:
        raise TypeError(f"{cls.__name__} cannot be imported as {path!r}")
    return {"class_path": path, "init_args": algorithm.init_args()}


def resolve_algorithm(algorithm: str | Algorithm | Mapping[str, Any]) -> Algorithm:
    """An :class:`Algorithm` from a registered name (a new object with default settings), a
    description of :func:`describe_algorithm` (a new object with those settings), or the object
    itself.

    Example::

        >>> resolve_algorithm("fomaml").is_first_order(epoch=0)
        True
        >>> resolve_algorithm(describe_algorithm(ANIL(first_order=True))).first_order
        True
    """
    if isinstance(algorithm, Algorithm):
        return algorithm
    if isinstance(algorithm, str) and algorithm in _REGISTRY:
        return _REGISTRY[algorithm]()
    if isinstance(algorithm, Mapping) and set(algorithm) <= {"class_path", "init_args"}:
        cls = import_by_path(str(algorithm.get("class_path")))
        if isinstance(cls, type) and issubclass(cls, Algorithm):
            return cls(**dict(algorithm.get("init_args") or {}))
    raise ValueError(
        f"`algorithm` must be one of {tuple(_REGISTRY)}, an Algorithm object or a description "
        f"{{'class_path': <an Algorithm class>, 'init_args': {{...}}}}, got {algorithm!r}"
    )


def task_meta_loss(
    algorithm: Algorithm,
    net: nn.Module,
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int,
    first_order: bool,
    track_initial_loss: bool,
    checkpoint: bool,
    vectorized: bool,
    inputs: dict[str, Tensor],
    constants: dict[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    anchor: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One task: adapt on the support set, evaluate the query set.

    ``inputs`` holds the network's parameters and, under keys starting with ``LEARNED``, the
    algorithm's learned tensors and the multi-step loss weights (``LEARNED + "step_weights"``,
    a tensor, so that changing weights change no compiled graph). ``anchor`` (first order only):
    the values the inner gradients are taken at, see
    :func:`~lightning_maml.functional.adapt_parameters`.

    Returns ``(outer objective, query loss after the last step, its predictions, query loss
    before adapting or 0)``, the last three detached.
    """
    params, learned = split_prefixed(inputs, LEARNED)
    weights = learned.pop("step_weights", None)
    context = TaskContext(
        net, loss_fn, constants, inner_lr, inner_steps, first_order, checkpoint, vectorized
    )
    params = algorithm.start(context, params, support_x, support_y)
    anchor_pair = None
    if anchor is not None:
        anchor_params, anchor_learned = split_prefixed(anchor, LEARNED)
        anchor_learned.pop("step_weights", None)
        anchor_params = algorithm.start(context, anchor_params, support_x, support_y)
        anchor_pair = ({n: t.detach() for n, t in anchor_params.items()}, anchor_learned)
    if track_initial_loss:
        stand_ins = algorithm.step_parameters(learned)
        with torch.no_grad():
            seen = params if stand_ins is None else {**params, **stand_ins(0)}
            initial = scalar_loss(loss_fn, context.predict(seen, query_x), query_y)
    else:
        initial = query_x.new_zeros(())
    episode = Episode(support_x, support_y, query_x, query_y)
    objective, query_loss, prediction = algorithm.task(
        context, params, learned, episode, step_weights=weights, anchor=anchor_pair
    )
    return (
        objective,
        query_loss.detach(),
        prediction.detach(),
        initial,
    )
