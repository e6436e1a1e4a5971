"""Pure meta-gradient functions: the inner-loop update and the MAML-family meta-loss.

Everything in this module is a function of a parameter dict. The network is only ever run through
:func:`torch.func.functional_call` (see :func:`forward`), so no module is copied or modified (apart
from the temporary BatchNorm mode described in :func:`task_batch_norm`). Every call of the network
runs under :func:`lightning_maml.normalization.exact_normalization`, whose normalisation arithmetic
has exact second derivatives under :func:`torch.func.vmap` (torch's fused kernels do not).

The inner-loop update is :func:`sgd_step`; it is the single definition used by the
:class:`~lightning_maml.MAML` wrapper, :class:`~lightning_maml.MAMLModule`, the callbacks and the
benchmarks.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_maml.functional import meta_loss
    >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
    >>> sx, sy, qx, qy = (torch.randn(4, 10, 1) for _ in range(4))   # 4 tasks, 10 shots each
    >>> out = meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.01, inner_steps=1)
    >>> out.loss.backward()      # meta-gradient now in net's .grad
    >>> out.query_losses.shape
    torch.Size([4])
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_maml.normalization import exact_normalization

__all__ = [
    "ALGORITHMS",
    "COMPILE_MODES",
    "VECTORIZE_MODES",
    "MetaLossOutput",
    "adapt_parameters",
    "check_checkpointing",
    "check_compile",
    "check_count",
    "check_episode",
    "check_inner_lr",
    "check_inner_steps",
    "cross_entropy_loss",
    "forward",
    "meta_loss",
    "mse_loss",
    "resolve_loss",
    "sgd_step",
    "split_parameters",
    "support_gradients",
    "task_batch_norm",
    "uses_vmap",
    "vmap_pays_off",
]

Algorithm = Literal["maml", "fomaml", "reptile"]
Vectorize = Literal["auto", "vmap", "loop"]
LossFn = Callable[[Tensor, Tensor], Tensor]
ALGORITHMS: tuple[str, ...] = ("maml", "fomaml", "reptile")
VECTORIZE_MODES: tuple[str, ...] = ("auto", "vmap", "loop")

# vectorize="auto": per network, whether vmap agreed with the per-task loop, per setting that
# changes which operations run (see _vmap_key); filled by the check on a setting's first batch
_VMAP_DECISIONS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]] = (
    weakref.WeakKeyDictionary()
)


class MetaLossOutput(NamedTuple):
    """What :func:`meta_loss` returns for a batch of ``T`` tasks.

    Attributes:
        loss: scalar; its gradient w.r.t. the initial parameters is the meta-gradient (the mean over
            tasks). For ``"reptile"`` it is a surrogate whose gradient is the mean of
            ``initial - adapted``, not a loss value.
        query_losses: ``[T]`` query loss of each task after adaptation (detached).
        query_predictions: ``[T, Q, ...]`` network outputs on the query set after adaptation
            (detached).
        initial_query_losses: ``[T]`` query loss before adaptation (detached), or ``None`` when
            not requested.
        vectorized: whether the tasks ran under :func:`torch.func.vmap`.
    """

    loss: Tensor
    query_losses: Tensor
    query_predictions: Tensor
    initial_query_losses: Tensor | None
    vectorized: bool


def sgd_step(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], lr: float | Tensor
) -> dict[str, Tensor]:
    """One inner-loop update ``p - lr * g``; a parameter whose gradient is ``None`` is unchanged.

    Example::

        >>> import torch
        >>> sgd_step({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)}, lr=0.5)
        {'w': tensor(0.)}
    """
    return {
        name: p if grads.get(name) is None else p - lr * grads[name] for name, p in params.items()
    }


def check_inner_lr(value: object, name: str = "inner_lr", positive: bool = False) -> float:
    """Return ``value`` as a float, or raise naming ``name`` if it is not a finite real number
    (``positive=True``: a finite number > 0).

    Example::

        >>> check_inner_lr(0.0, positive=True)
        Traceback (most recent call last):
        ...
        ValueError: `inner_lr` must be a finite number > 0, got 0.0
    """
    allowed = "a finite number > 0" if positive else "a finite real number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}")
    if not math.isfinite(float(value)) or (positive and value <= 0):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return float(value)


def check_inner_steps(value: object, name: str = "inner_steps") -> int:
    """Return ``value`` if it is an int >= 0, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
    return int(value)


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ``ValueError`` naming ``name``.

    Example::

        >>> check_count(0, "k_shot")
        Traceback (most recent call last):
        ...
        ValueError: `k_shot` must be an integer >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_episode(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> None:
    """Check that a batch of tasks is consistently shaped, naming the offending argument.

    Every tensor carries a leading task dimension ``T`` and then an example dimension: ``support_x``
    is ``[T, K, *features]``, ``support_y`` is ``[T, K, *targets]``, and the query set likewise with
    ``Q`` examples and the same feature and target shapes.
    """
    tensors = {
        "support_x": support_x,
        "support_y": support_y,
        "query_x": query_x,
        "query_y": query_y,
    }
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"`{name}` must have a leading task dimension and an example dimension "
                f"([tasks, examples, ...]), got shape {tuple(t.shape)}"
            )
    n_tasks = support_x.shape[0]
    for name, t in tensors.items():
        if t.shape[0] != n_tasks:
            raise ValueError(
                f"`{name}` has {t.shape[0]} tasks but `support_x` has {n_tasks}; every tensor of a "
                f"meta-batch needs the same leading task dimension"
            )
    if n_tasks < 1:
        raise ValueError("a meta-batch needs at least one task, got `support_x` with 0 tasks")
    for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
        if tensors[x].shape[1] != tensors[y].shape[1]:
            raise ValueError(
                f"`{x}` has {tensors[x].shape[1]} examples per task but `{y}` has "
                f"{tensors[y].shape[1]}; they must match"
            )
    for name in ("support_x", "query_x"):
        if tensors[name].shape[1] < 1:
            raise ValueError(
                f"`{name}` needs at least one example per task, got {tensors[name].shape[1]}"
            )
    if support_x.shape[2:] != query_x.shape[2:]:
        raise ValueError(
            f"`support_x` examples have shape {tuple(support_x.shape[2:])} but `query_x` examples "
            f"have shape {tuple(query_x.shape[2:])}; they must match"
        )
    if support_y.shape[2:] != query_y.shape[2:]:
        raise ValueError(
            f"`support_y` targets have shape {tuple(support_y.shape[2:])} but `query_y` targets "
            f"have shape {tuple(query_y.shape[2:])}; they must match"
        )


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


def split_parameters(
    net: nn.Module, params: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a network's state into ``(params, constants)`` for :func:`functional_call`.

    By default ``params`` are the parameters that require grad (the ones the inner loop adapts)
    and ``constants`` the frozen parameters and buffers, passed through unchanged. Given
    ``params`` (tensors standing in for some of the network's parameters), ``constants`` holds
    every other parameter and buffer.
    """
    trainable, constants = {}, {}
    for name, p in net.named_parameters():
        (trainable if p.requires_grad else constants)[name] = p
    constants.update(dict(net.named_buffers()))
    if params is None:
        return trainable, constants
    params = dict(params)
    constants = {k: v for k, v in {**trainable, **constants}.items() if k not in params}
    return params, constants


def forward(
    net: nn.Module,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    x: Tensor,
    vectorized: bool = False,
) -> Tensor:
    """``net(x)`` with ``params`` and ``constants`` standing in for its state: the one way the
    engine runs a network. Normalisation layers run under
    :func:`~lightning_maml.normalization.exact_normalization` (running statistics untouched;
    ``vectorized=True``, for a call under vmap: computed by arithmetic with exact second
    derivatives).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> zero = {"weight": torch.zeros(1, 2), "bias": torch.ones(1)}
        >>> forward(net, zero, {}, torch.randn(3, 2))
        tensor([[1.],
                [1.],
                [1.]])
    """
    state = (dict(params), dict(constants))
    with exact_normalization(vectorized):
        try:
            return functional_call(net, state, (x,))
        except RuntimeError as error:
            if vectorized:
                raise  # under vmap: the per-task run that follows names the layer
            failing = _failing_layer(net, state, x)
            if failing is None:
                raise
            raise RuntimeError(
                f"{type(net).__name__} cannot run on this task's data: {failing} ({error})"
            ) from error


def _failing_layer(
    net: nn.Module, state: tuple[dict[str, Tensor], dict[str, Tensor]], x: Tensor
) -> str | None:
    """Run ``net`` again with a pre-hook on every submodule and say which innermost one was
    entered last before the error, with the shapes of its tensor inputs."""
    entered: list[tuple[str, nn.Module, list[tuple[int, ...]]]] = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)]
            entered.append((name, module, shapes))

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in net.named_modules()
        if name and not list(module.children())
    ]
    try:
        functional_call(net, state, (x,))
    except RuntimeError:
        pass
    else:
        return None
    finally:
        for handle in handles:
            handle.remove()
    if not entered:
        return None
    name, module, shapes = entered[-1]
    shown = ", ".join(str(s) for s in shapes) or "no tensor"
    return f"layer `{name}` ({module}) failed on input of shape {shown}"


@contextmanager
def task_batch_norm(net: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm layer of ``net`` normalises with the statistics of the
    batch it is given and leaves its running statistics untouched.

    This is the convention of MAML papers (Finn et al. 2017 and its reference code): each task's
    support and query sets are normalised with their own statistics, in training and in evaluation
    alike, and no statistics leak from one task to another. The layers' flags are restored on exit.
    """
    saved = []
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            saved.append((module, module.training, module.track_running_stats))
            module.training = True
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, training, track in saved:
            module.training = training
            module.track_running_stats = track


def _scalar_loss(loss_fn: LossFn, prediction: Tensor, target: Tensor) -> Tensor:
    loss = loss_fn(prediction, target)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"the loss function must return a scalar tensor (reduce over examples), got {shape}"
        )
    return loss


def adapt_parameters(
    net: nn.Module,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    loss_fn: LossFn,
    support_x: Tensor,
    support_y: Tensor,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
    checkpoint: bool = False,
    vectorized: bool = False,
) -> dict[str, Tensor]:
    """Run ``inner_steps`` of :func:`sgd_step` on one task's support set and return the adapted
    parameters.

    With ``first_order=False`` the result stays differentiable through every inner step (second
    order). With ``first_order=True`` the inner gradients are treated as constants, so the adapted
    parameters depend on ``params`` through the identity only.

    With ``checkpoint=True`` (second order only) each inner step runs under
    :func:`torch.utils.checkpoint.checkpoint` (the reentrant variant, the one that composes with
    :func:`torch.func.grad`): only the parameters between steps are kept, and each step's graph is
    rebuilt during the backward pass. Memory no longer grows with the activations of every step;
    the forward work of the inner loop is done twice; gradients are the same up to float rounding.
    The result then supports ``.backward()`` only, not :func:`torch.autograd.grad`.

    ``vectorized=True`` says the call runs under :func:`torch.func.vmap` (see :func:`forward`).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(1, 1)
        >>> params = dict(net.named_parameters())
        >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
        >>> adapted = adapt_parameters(net, params, {}, mse_loss, x, y, 0.1, 3)
        >>> sorted(adapted)
        ['bias', 'weight']
    """

    def support_loss(p: dict[str, Tensor]) -> Tensor:
        return _scalar_loss(loss_fn, forward(net, p, constants, support_x, vectorized), support_y)

    if first_order:
        start = {name: p.detach() for name, p in params.items()}
        adapted = start
        for _ in range(inner_steps):
            adapted = sgd_step(adapted, torch.func.grad(support_loss)(adapted), inner_lr)
        # d adapted / d params is the identity: params plus a constant displacement
        return {name: p + (adapted[name] - start[name]) for name, p in params.items()}
    if checkpoint:
        names = list(params)

        def step(*flat: Tensor) -> tuple[Tensor, ...]:
            # BatchNorm mode is set inside, so the recomputation in backward sees the same one
            with task_batch_norm(net):
                p = dict(zip(names, flat))
                return tuple(sgd_step(p, torch.func.grad(support_loss)(p), inner_lr).values())

        flat = tuple(params.values())
        for _ in range(inner_steps):
            flat = torch.utils.checkpoint.checkpoint(step, *flat, use_reentrant=True)
        return dict(zip(names, flat))
    adapted = dict(params)
    for _ in range(inner_steps):
        adapted = sgd_step(adapted, torch.func.grad(support_loss)(adapted), inner_lr)
    return adapted


def support_gradients(
    net: nn.Module,
    loss_fn: str | LossFn,
    support_x: Tensor,
    support_y: Tensor,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Gradient of each task's support loss at ``params`` (the first inner-loop gradient), as a dict
    of ``[T, *param.shape]`` tensors, detached.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> x, y = torch.randn(4, 5, 3), torch.randn(4, 5, 1)
        >>> grads = support_gradients(nn.Linear(3, 1), "mse", x, y)
        >>> grads["weight"].shape
        torch.Size([4, 1, 3])
    """
    loss_fn = resolve_loss(loss_fn)
    params, constants = split_parameters(net, params)
    params = {k: v.detach() for k, v in params.items()}

    def task(vectorized: bool, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        def support_loss(p: dict[str, Tensor]) -> Tensor:
            return _scalar_loss(loss_fn, forward(net, p, constants, x, vectorized), y)

        return torch.func.grad(support_loss)(params)

    with task_batch_norm(net), torch.enable_grad():
        try:  # first derivatives only: no check needed, the loop below raises the user's errors
            return vmap(partial(task, True), randomness="different")(support_x, support_y)
        except Exception:  # noqa: BLE001
            per_task = [task(False, support_x[i], support_y[i]) for i in range(len(support_x))]
    return {name: torch.stack([g[name] for g in per_task]) for name in params}


def _task_meta_loss(
    net: nn.Module,
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int,
    algorithm: str,
    track_initial_loss: bool,
    checkpoint: bool,
    vectorized: bool,
    params: dict[str, Tensor],
    constants: dict[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if track_initial_loss:
        with torch.no_grad():
            before = forward(net, params, constants, query_x, vectorized)
            initial = _scalar_loss(loss_fn, before, query_y)
    else:
        initial = query_x.new_zeros(())
    reptile = algorithm == "reptile"
    adapted = adapt_parameters(
        net,
        {name: p.detach() for name, p in params.items()} if reptile else params,
        constants,
        loss_fn,
        support_x,
        support_y,
        inner_lr,
        inner_steps,
        first_order=algorithm != "maml",
        checkpoint=checkpoint,
        vectorized=vectorized,
    )
    prediction = forward(net, adapted, constants, query_x, vectorized)
    query_loss = _scalar_loss(loss_fn, prediction, query_y)
    if reptile:
        # gradient of this surrogate w.r.t. params is (params - adapted)
        surrogate = sum((p * (p.detach() - adapted[name])).sum() for name, p in params.items())
        return surrogate, query_loss.detach(), prediction.detach(), initial
    return query_loss, query_loss.detach(), prediction.detach(), initial


TaskFn = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]


def _run_tasks(
    task: TaskFn,
    vectorized: bool,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
    randomness: str = "different",
) -> tuple[Tensor, ...]:
    # (losses, query_losses, predictions, initial), each with a leading task dimension
    if vectorized:
        batched = vmap(partial(task, True), in_dims=(None, None, 0, 0, 0, 0), randomness=randomness)
        return batched(params, constants, *batch)
    n_tasks = len(batch[0])
    per_task = [task(False, params, constants, *(t[i] for t in batch)) for i in range(n_tasks)]
    return tuple(torch.stack(parts) for parts in zip(*per_task))


def _mean_loss(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # per-task losses -> the meta-loss, their mean
    losses, *rest = outputs
    return (losses.mean(), *rest)


class _PrecomputedGradient(torch.autograd.Function):
    """Returns ``value``; its backward hands each of ``inputs`` the matching tensor of ``grads``
    (times the incoming gradient), so a meta-gradient computed ahead (by a compiled
    ``grad_and_value``, or task by task) reaches ``.grad`` through ordinary autograd, hooks and DDP
    included. Differentiable once: ``create_graph=True`` through it raises."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradient would be a constant
            raise RuntimeError(
                "this meta-loss was differentiated ahead (compiled, or task by task on the loop "
                "path) and supports one backward, not create_graph=True; for higher-order "
                "gradients use vectorize='vmap' without compile"
            )
        return (None, None, *(grad_output * g for g in ctx.grads))


def _needs_graph(params: Mapping[str, Tensor], batch: Sequence[Tensor]) -> bool:
    tensors = (*params.values(), *batch)
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _loop_meta_loss(
    task: TaskFn,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """The meta-loss task by task, each task's graph freed before the next task runs.

    Each task's loss is backpropagated at once into leaf stand-ins for the parameters and batch
    tensors that require grad, and the summed gradient reaches the real ones through the returned
    loss's backward: peak memory is one task's graph, as in a per-task clone/adapt/backward loop.
    """
    if not _needs_graph(params, batch):
        return _mean_loss(_run_tasks(task, False, params, constants, batch))
    n_tasks = len(batch[0])
    leaves = {name: p.detach().requires_grad_() for name, p in params.items() if p.requires_grad}
    stand_in = {**params, **leaves}
    batch_grads: list[list[Tensor]] = [[] for _ in batch]
    per_task = []
    for i in range(n_tasks):
        items = [t[i].detach().requires_grad_() if t.requires_grad else t[i] for t in batch]
        loss, *rest = task(False, stand_in, constants, *items)
        if loss.requires_grad:
            # .backward(), not autograd.grad: checkpointed inner steps support only this
            (loss / n_tasks).backward()
        per_task.append((loss.detach(), *rest))
        for grads, item, t in zip(batch_grads, items, batch):
            if t.requires_grad:
                grads.append(item.grad if item.grad is not None else torch.zeros_like(item))
    losses, *rest = (torch.stack(parts) for parts in zip(*per_task))
    inputs = [params[name] for name in leaves] + [t for t in batch if t.requires_grad]
    grads = [g.grad if g.grad is not None else torch.zeros_like(g) for g in leaves.values()]
    grads += [torch.stack(g) for g, t in zip(batch_grads, batch) if t.requires_grad]
    loss = _PrecomputedGradient.apply(losses.mean(), tuple(grads), *inputs)
    return (loss, *rest)


def _compute_dtype(params: Mapping[str, Tensor], x: Tensor) -> torch.dtype:
    floating = [t.dtype for t in (*params.values(), x) if t.is_floating_point()]
    return floating[0] if floating else torch.get_default_dtype()


def _vmap_key(
    net: nn.Module,
    loss_fn: LossFn,
    algorithm: str,
    inner_steps: int,
    params: Mapping[str, Tensor],
    x: Tensor,
    compiled: bool,
) -> tuple:
    # what decides which operations a meta-loss runs (a new loss closure of the same code runs
    # the same ones)
    loss_id = getattr(loss_fn, "__code__", None) or (
        type(loss_fn) if isinstance(loss_fn, nn.Module) else loss_fn
    )
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
    dtype = _compute_dtype(params, x)
    return (algorithm, loss_id, inner_steps > 0, grad, net.training, dtype, x.device.type, compiled)


def _rng_devices(tensors: Sequence[Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _vmap_error(
    task: TaskFn,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
) -> tuple[float, str]:
    """How far the vmapped tasks are from the same tasks run one by one: the largest relative
    difference (L2 norms) over query losses, predictions, initial losses and the meta-gradient,
    with what it was measured on. Both runs draw the same random numbers (vmap with
    ``randomness="same"``, the loop restarting every task from one RNG state), so dropout is
    compared too. ``inf`` if vmap raises; if the loop raises too, its error propagates: a data
    error is the user's, not vmap's."""
    inputs = [p for p in params.values() if p.requires_grad] if torch.is_grad_enabled() else []
    tensors = [*params.values(), *batch]
    devices = _rng_devices(tensors)
    n_tasks = len(batch[0])

    def gradient(loss: Tensor) -> list[Tensor]:
        if not inputs or not loss.requires_grad:
            return []
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs)]

    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def restart_rng() -> None:
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, d)

        try:
            losses, *vmapped = _run_tasks(task, True, params, constants, batch, "same")
            vmapped.append(gradient(losses.mean()))
        except Exception as error:  # noqa: BLE001 - decided below, by whether the loop runs
            vmapped, vmap_failure = None, error
        per_task, loop_grads = [], None
        for i in range(n_tasks):
            restart_rng()
            loss, *rest = task(False, params, constants, *(t[i] for t in batch))
            per_task.append(rest)
            grads = gradient(loss / n_tasks)
            loop_grads = grads if loop_grads is None else [a + b for a, b in zip(loop_grads, grads)]
    if vmapped is None:
        return math.inf, f"vmap raised {type(vmap_failure).__name__}: {vmap_failure}"
    looped = [[torch.stack(parts)] for parts in zip(*per_task)] + [loop_grads or []]
    vmapped = [[t] for t in vmapped[:-1]] + [vmapped[-1]]
    worst, where = 0.0, "outputs"
    names = ("query losses", "query predictions", "initial query losses", "meta-gradient")
    for name, a, b in zip(names, vmapped, looped):
        if not b:
            continue
        a = torch.cat([t.detach().flatten().double() for t in a])
        b = torch.cat([t.detach().flatten().double() for t in b])
        error = (
            torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300)
        ).item()
        if not error <= worst:  # NaN counts as the worst
            worst, where = error, name
    return worst, f"relative difference {worst:.2e} in the {where}"


def vmap_pays_off(net: nn.Module, device: torch.device, compiled: bool = False) -> bool:
    """Whether vmap can be expected to run ``net``'s tasks faster than a loop on ``device``.

    Not on a CPU, uncompiled, for a network with convolution layers: once the inner loop has
    adapted them, their weights differ per task and vmap runs them as grouped convolutions, which
    torch's CPU kernels compute more slowly than one convolution per task (second-order MAML on 2
    cores, against a per-task autograd loop: EEGNet 0.72x, an Omniglot-style CNN 0.55x under vmap
    and 0.97-0.98x as a loop; an MLP runs several times faster under vmap). Compiled, vmap wins
    again (EEGNet: 106 ms vmapped, 151 ms as a loop, 146 ms for the autograd loop).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> vmap_pays_off(nn.Conv1d(1, 1, 3), torch.device("cpu"))
        False
        >>> vmap_pays_off(nn.Linear(1, 1), torch.device("cpu"))
        True
    """
    if device.type != "cpu" or compiled:
        return True
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules())


def _decide_vmap(
    net: nn.Module,
    key: tuple,
    task: TaskFn,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
    compiled: bool,
) -> bool:
    """vectorize="auto": vmap for this network and setting if it pays off (:func:`vmap_pays_off`)
    and agreed with the per-task loop on the first batch (checked once, see :func:`_vmap_error`);
    a disagreement warns once."""
    decisions = _VMAP_DECISIONS.setdefault(net, {})
    if key not in decisions and not vmap_pays_off(net, batch[0].device, compiled):
        decisions[key] = False
    if key not in decisions:
        error, detail = _vmap_error(task, params, constants, batch)
        tolerance = math.sqrt(torch.finfo(_compute_dtype(params, batch[0])).eps)
        decisions[key] = error <= tolerance
        if not decisions[key]:
            problem = (
                f"failed on {type(net).__name__} ({detail})"
                if math.isinf(error)
                else f"does not reproduce the per-task computation on {type(net).__name__} "
                f"({detail}, tolerance {tolerance:.1e})"
            )
            warnings.warn(
                f"torch.func.vmap {problem}; running its tasks one by one for this setting. Pass "
                f"vectorize='loop' to silence this, or vectorize='vmap' to use vmap regardless.",
                stacklevel=3,
            )
    return decisions[key]


COMPILE_MODES: tuple[str, ...] = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)


def check_compile(value: object, name: str = "compile") -> str | None:
    """The :func:`torch.compile` mode that ``compile`` asks for (``None``: no compilation).

    ``False`` means none, ``True`` the ``"default"`` mode; a string names a mode of
    :data:`COMPILE_MODES`."""
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"`{name}` must be True, False or one of {COMPILE_MODES}, got {value!r}")


def check_checkpointing(checkpoint_inner_steps: object, vectorize: str, compile: object) -> bool:
    """Return ``checkpoint_inner_steps`` if it is a bool that can be used with these ``vectorize``
    and ``compile`` settings: checkpointed tasks run one by one and uncompiled."""
    if not isinstance(checkpoint_inner_steps, bool):
        raise TypeError(
            f"`checkpoint_inner_steps` must be True or False, got {checkpoint_inner_steps!r}"
        )
    if checkpoint_inner_steps and (vectorize == "vmap" or check_compile(compile)):
        setting = "vectorize='vmap'" if vectorize == "vmap" else f"compile={compile!r}"
        raise ValueError(
            f"`checkpoint_inner_steps=True` cannot be combined with {setting}: checkpointed "
            "tasks run one by one and uncompiled"
        )
    return checkpoint_inner_steps


# compiled meta-gradient functions, per network and per setting that shapes the graph
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Callable]] = weakref.WeakKeyDictionary()


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (same body, closure and globals)."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _compiled_meta_loss(
    key: tuple,
    mode: str,
    net: nn.Module,
    task: TaskFn,
    vectorized: bool,
    params: dict[str, Tensor],
    constants: dict[str, Tensor],
    batch: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """(loss, query_losses, predictions, initial) of ``task`` over the batch, with ``loss``
    carrying the compiled meta-gradient. ``key`` holds every setting that shapes the graph."""
    compiled = _COMPILED.setdefault(net, {}).get(key)
    if compiled is None:

        def objective(
            p: dict[str, Tensor], c: dict[str, Tensor], *episode: Tensor
        ) -> tuple[Tensor, tuple[Tensor, ...]]:
            loss, *rest = _mean_loss(_run_tasks(task, vectorized, p, c, episode))
            return loss, tuple(rest)

        def meta_gradient(
            p: dict[str, Tensor], c: dict[str, Tensor], *episode: Tensor
        ) -> tuple[dict[str, Tensor], tuple[Tensor, tuple[Tensor, ...]]]:
            return torch.func.grad_and_value(objective, has_aux=True)(p, c, *episode)

        # the whole meta-gradient (inner grads, adaptation, outer grad) is one forward graph for
        # the compiler; no backward runs through compiled code. Dynamo keeps its compiled graphs
        # per code object, at most torch._dynamo.config.recompile_limit (8) of them, and runs the
        # code eagerly past that: a code object per network and setting keeps every setting
        # compiled, however many a process uses.
        compiled = torch.compile(_own_code(meta_gradient), mode=mode, dynamic=False)
        _COMPILED[net][key] = compiled
    names = list(params)
    detached = {name: params[name].detach() for name in names}
    grads, (loss, rest) = compiled(detached, constants, *batch)
    if mode in ("reduce-overhead", "max-autotune"):
        # CUDA-graph outputs live in memory the next replay overwrites: keep copies
        grads = {name: g.clone() for name, g in grads.items()}
        loss, rest = loss.clone(), tuple(t.clone() for t in rest)
    loss = _PrecomputedGradient.apply(
        loss, tuple(grads[name] for name in names), *(params[name] for name in names)
    )
    return (loss, *rest)


def uses_vmap(net: nn.Module, algorithm: str, vectorize: str) -> bool:
    """Whether :func:`meta_loss` would run the tasks of ``net`` under vmap for this algorithm and
    mode, as far as is known before a batch: ``"vmap"`` always, ``"loop"`` never, ``"auto"``
    unless a first batch of this network and algorithm ran the loop (vmap disagreeing with the
    per-task loop, or not paying off: see :func:`meta_loss`).
    """
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"`vectorize` must be one of {VECTORIZE_MODES}, got {vectorize!r}")
    if vectorize == "auto":
        decisions = _VMAP_DECISIONS.get(net, {})
        return all(ok for key, ok in decisions.items() if key[0] == algorithm)
    return vectorize == "vmap"


def meta_loss(
    net: nn.Module,
    loss_fn: str | LossFn,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    inner_lr: float,
    inner_steps: int = 1,
    algorithm: Algorithm = "maml",
    vectorize: Vectorize = "auto",
    params: Mapping[str, Tensor] | None = None,
    track_initial_loss: bool = True,
    compile: bool | str = False,
    checkpoint_inner_steps: bool = False,
) -> MetaLossOutput:
    """Meta-loss of a batch of tasks: adapt on each task's support set, evaluate its query set.

    Args:
        net: any ``nn.Module``; it is run functionally and not modified.
        loss_fn: ``"mse"``, ``"cross_entropy"`` or a callable ``(prediction, target) -> scalar``.
        support_x, support_y, query_x, query_y: tensors with a leading task dimension (see
            :func:`check_episode`).
        inner_lr: step size of the inner-loop SGD, > 0 (``inner_steps=0`` evaluates without
            adapting).
        inner_steps: number of inner-loop steps (0 evaluates the initial parameters).
        algorithm: ``"maml"`` differentiates through every inner step (second order);
            ``"fomaml"`` treats inner gradients as constants (first order); ``"reptile"`` returns a
            surrogate whose gradient is the mean of ``initial - adapted`` parameters.
        vectorize: ``"vmap"`` runs the tasks as one batch with :func:`torch.func.vmap`,
            ``"loop"`` one after another (each task's gradient taken before the next task runs, so
            one task's graph is held at a time). ``"auto"`` (default) runs the loop where vmap does
            not pay off (:func:`vmap_pays_off`: convolution networks on a CPU, uncompiled). Else,
            on the first batch of each network and setting (algorithm, loss, train/eval, dtype,
            device, compiled), it runs the batch both ways from one RNG state and uses vmap from
            then on if the two agree to ``sqrt(eps)`` of the dtype, else warns and uses the loop.
            An error that the loop raises too (a data error) is raised and remembered nowhere.
        params: the initial parameters to adapt (defaults to the network's trainable parameters).
            Frozen parameters and buffers are passed through unchanged.
        track_initial_loss: also compute the query loss before adaptation (a forward pass).
        compile: compute the meta-gradient with :func:`torch.compile` of
            :func:`torch.func.grad_and_value` over the whole batch (inner loop included) and hand
            it to ``.loss``'s backward. The first call for a network and set of shapes compiles
            (seconds to a minute); later calls are several times faster on small networks. The
            returned ``loss`` supports one backward (no higher-order gradients through it).
            ``True`` uses torch.compile's default mode; a string picks another mode of
            :data:`COMPILE_MODES` (``"reduce-overhead"`` replays CUDA graphs on a GPU).
        checkpoint_inner_steps: for second-order ``"maml"``, trade compute for memory on long
            inner loops: each inner step is checkpointed (see :func:`adapt_parameters`), so peak
            memory stays near that of one step whatever ``inner_steps`` is. Tasks then run in the
            loop (checkpointing does not compose with vmap or ``compile``), and ``.loss`` supports
            ``.backward()`` only. Ignored by ``"fomaml"`` and ``"reptile"``, which keep no graph
            through the inner loop.

    BatchNorm layers use per-task batch statistics, see :func:`task_batch_norm`. Under vmap,
    normalisation layers are computed by
    :func:`~lightning_maml.normalization.exact_normalization`: exact second derivatives.

    Returns:
        a :class:`MetaLossOutput`; ``.loss.backward()`` puts the mean meta-gradient over tasks on
        the parameters.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(1, 1)
        >>> sx, sy, qx, qy = (torch.randn(2, 5, 1) for _ in range(4))
        >>> meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1).loss.shape
        torch.Size([])
    """
    loss_fn = resolve_loss(loss_fn)
    inner_lr = check_inner_lr(inner_lr, positive=True)
    inner_steps = check_inner_steps(inner_steps)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}")
    check_episode(support_x, support_y, query_x, query_y)
    compile_mode = check_compile(compile)
    params, constants = split_parameters(net, params)
    if not params:
        raise ValueError(
            f"{type(net).__name__} has no parameter with requires_grad=True to adapt, and no "
            "`params` were given: unfreeze at least one parameter or pass `params`"
        )
    check_checkpointing(checkpoint_inner_steps, vectorize, compile_mode)
    # only where a graph through the inner loop would be kept
    checkpoint = (
        checkpoint_inner_steps
        and algorithm == "maml"
        and inner_steps > 0
        and torch.is_grad_enabled()
        and any(p.requires_grad for p in params.values())
    )
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"`vectorize` must be one of {VECTORIZE_MODES}, got {vectorize!r}")

    def task(vectorized: bool, *args: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _task_meta_loss(
            net,
            loss_fn,
            inner_lr,
            inner_steps,
            algorithm,
            track_initial_loss,
            checkpoint,
            vectorized,
            *args,
        )

    batch = (support_x, support_y, query_x, query_y)
    with task_batch_norm(net):
        if checkpoint or vectorize == "loop":
            vectorized = False
        elif vectorize == "vmap":
            vectorized = True
        else:
            compiled = compile_mode is not None
            key = _vmap_key(net, loss_fn, algorithm, inner_steps, params, support_x, compiled)
            vectorized = _decide_vmap(net, key, task, params, constants, batch, compiled)
        if compile_mode:
            # every setting `task` closes over (checkpoint is off under compile)
            key = (compile_mode, loss_fn, inner_lr, inner_steps, algorithm, vectorized)
            key += (track_initial_loss, net.training)
            outputs = _compiled_meta_loss(
                key, compile_mode, net, task, vectorized, params, constants, batch
            )
        elif vectorized:
            try:
                outputs = _mean_loss(_run_tasks(task, True, params, constants, batch))
            except Exception as error:
                if vectorize != "auto":
                    raise
                # the loop tells a data error (raised from it, nothing remembered) from one vmap
                # cannot run, which sends this setting to the loop from now on
                outputs = _loop_meta_loss(task, params, constants, batch)
                _VMAP_DECISIONS[net][key] = vectorized = False
                warnings.warn(
                    f"torch.func.vmap failed on {type(net).__name__} ({type(error).__name__}: "
                    f"{error}); running its tasks one by one for this setting. Pass "
                    f"vectorize='loop' to silence this.",
                    stacklevel=2,
                )
        else:
            outputs = _loop_meta_loss(task, params, constants, batch)
    loss, query_losses, predictions, initial = outputs
    return MetaLossOutput(
        loss=loss,
        query_losses=query_losses,
        query_predictions=predictions,
        initial_query_losses=initial if track_initial_loss else None,
        vectorized=vectorized,
    )
