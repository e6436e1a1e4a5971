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
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_maml._checks import check_count
from lightning_maml._imports import import_by_path
from lightning_maml.functional.inner import Schedule, adapt_parameters
from lightning_maml.functional.losses import LossFn, scalar_loss
from lightning_maml.functional.parameters import forward

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "MAML",
    "Algorithm",
    "MAMLPlusPlus",
    "MetaSGD",
    "Reptile",
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
    def bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        """Set the algorithm up for a network with these trainable ``params`` (called by
        :class:`~lightning_maml.MAMLModule` at construction, and by the engine on every call):
        checks that ``adapt`` selects something and creates learned tensors.

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

    (Its per-step batch-normalisation statistics are not included: normalisation layers here
    always use each task's own batch statistics.)

    Args:
        msl_epochs: epochs with the multi-step loss (0: never).
        first_order_epochs: epochs of first-order training before second order (0: never).
        adapt: which parameters adapt (see :class:`Algorithm`).
    """

    name = "maml++"

    def __init__(
        self, msl_epochs: int = 10, first_order_epochs: int = 0, adapt: Sequence[str] | None = None
    ) -> None:
        super().__init__(first_order=False, adapt=adapt)
        self.msl_epochs = check_count(msl_epochs, "msl_epochs", minimum=0)
        self.first_order_epochs = check_count(first_order_epochs, "first_order_epochs", minimum=0)

    def _bind(self, params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
        names = self.adapted(params)
        steps = max(inner_steps, 1)
        self.lslr = nn.ParameterList(
            [nn.Parameter(params[n].new_full((steps,), inner_lr).detach()) for n in names]
        )
        self._lr_names = names

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
        return f"msl_epochs={self.msl_epochs}, first_order_epochs={self.first_order_epochs}" + (
            f", adapt={self.adapt}" if self.adapt is not None else ""
        )


_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Make ``cls`` available by its ``name`` (``MAMLModule(algorithm=name)``); a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"only Algorithm subclasses can be registered, got {cls!r}")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (MAML, FOMAML, Reptile, ANIL, MetaSGD, MAMLPlusPlus):
    register_algorithm(_cls)

#: the names of the built-in algorithms
ALGORITHMS: tuple[str, ...] = tuple(_REGISTRY)


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
    if track_initial_loss:
        with torch.no_grad():
            before = forward(net, params, constants, query_x, vectorized)
            initial = scalar_loss(loss_fn, before, query_y)
    else:
        initial = query_x.new_zeros(())
    names = algorithm.adapted(params)
    start = params if algorithm.has_objective else {n: p.detach() for n, p in params.items()}
    anchor_params = anchor_lr = None
    if anchor is not None:
        anchor_params, anchor_learned = split_prefixed(anchor, LEARNED)
        anchor_learned.pop("step_weights", None)
        anchor_lr = algorithm.rates(inner_lr, anchor_learned, names)
    steps = adapt_parameters(
        net,
        start,
        constants,
        loss_fn,
        support_x,
        support_y,
        algorithm.rates(inner_lr, learned, names),
        inner_steps,
        first_order=first_order,
        checkpoint=checkpoint,
        vectorized=vectorized,
        adapt=names,
        anchor=anchor_params,
        anchor_lr=anchor_lr,
        trajectory=True,
    )
    adapted = steps[-1] if steps else start
    prediction = forward(net, adapted, constants, query_x, vectorized)
    query_loss = scalar_loss(loss_fn, prediction, query_y)
    objective = query_loss
    if weights is not None and len(steps) > 1:
        losses = [
            scalar_loss(loss_fn, forward(net, p, constants, query_x, vectorized), query_y)
            for p in steps[:-1]
        ]
        objective = (torch.stack([*losses, query_loss]) * weights.to(query_loss.dtype)).sum()
    return (
        algorithm.outer(params, adapted, objective),
        query_loss.detach(),
        prediction.detach(),
        initial,
    )
