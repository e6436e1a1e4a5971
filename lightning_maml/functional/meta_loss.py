"""The engine's front: :func:`meta_loss` of a batch of tasks, and :func:`meta_objective`, the
value whose gradient it is (for finite differences)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_maml._checks import (
    check_checkpointing,
    check_compile,
    check_count,
    check_episode,
    check_inner_lr,
    check_inner_steps,
    check_vectorize,
)
from lightning_maml.episode import Episode
from lightning_maml.functional.algorithms import Algorithm, resolve_algorithm, task_meta_loss
from lightning_maml.functional.algorithms.base import LEARNED
from lightning_maml.functional.execution import (
    Executor,
    compute_dtype,
    executor_of,
    loop_meta_loss,
    mean_loss,
    run_tasks,
)
from lightning_maml.functional.losses import LossFn, resolve_loss
from lightning_maml.functional.parameters import split_parameters, task_batch_norm

AlgorithmName = Literal[
    "maml", "fomaml", "reptile", "anil", "metasgd", "maml++", "imaml", "protomaml"
]
Vectorize = Literal["auto", "vmap", "loop"]


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


def episode_metrics(
    out: MetaLossOutput, query_y: Tensor, classification: bool = False
) -> dict[str, Tensor]:
    """What :class:`~lightning_maml.MAMLModule` logs of a batch, from its :func:`meta_loss`
    output and query targets, as tensors to average: ``query_loss_after`` (per task),
    ``query_loss_before`` (per task, where computed) and, with ``classification``,
    ``query_acc_after`` (per query example; soft targets count their most probable class; a
    prediction that is not finite counts as wrong, never as whichever class ``argmax`` picks).
    Tasks whose adaptation ended non-finite: :func:`nonfinite_tasks`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(4, 3)
        >>> sx, qx = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
        >>> sy, qy = torch.randint(0, 3, (2, 6)), torch.randint(0, 3, (2, 6))
        >>> out = meta_loss(net, "cross_entropy", sx, sy, qx, qy, inner_lr=0.1)
        >>> {k: tuple(v.shape) for k, v in episode_metrics(out, qy, classification=True).items()}
        {'query_loss_after': (2,), 'query_loss_before': (2,), 'query_acc_after': (12,)}
    """
    values: dict[str, Tensor] = {"query_loss_after": out.query_losses}
    if out.initial_query_losses is not None:
        values["query_loss_before"] = out.initial_query_losses
    if classification:
        target = query_y
        if target.is_floating_point():  # class probabilities: the most probable class
            target = target.argmax(dim=2)
        values["query_acc_after"] = query_correct(out.query_predictions, target).float().flatten()
    return values


def query_correct(predictions: Tensor, targets: Tensor) -> Tensor:
    """Whether each prediction (``[..., classes]`` logits) names its class-index target
    (``[...]``); a prediction with NaN or inf is wrong, whatever ``argmax`` makes of it.

    Example::

        >>> import torch
        >>> logits = torch.tensor([[2.0, 1.0], [float("nan"), float("nan")]])
        >>> query_correct(logits, torch.tensor([0, 0])).tolist()
        [True, False]
    """
    finite = torch.isfinite(predictions).all(dim=-1)
    return (predictions.argmax(dim=-1) == targets) & finite


def nonfinite_tasks(out: MetaLossOutput) -> Tensor:
    """``[T]`` bool: the tasks whose query loss or query predictions after adaptation hold NaN or
    inf (their data, or a diverged adaptation); :class:`~lightning_maml.MAMLModule` counts them
    as ``{stage}/nonfinite_tasks`` and leaves them out of the loss means.

    Example::

        >>> import torch
        >>> out = MetaLossOutput(torch.tensor(0.0), torch.tensor([0.5, float("nan")]),
        ...                      torch.zeros(2, 3, 1), None, False)
        >>> nonfinite_tasks(out).tolist()
        [False, True]
    """
    predictions = out.query_predictions.reshape(len(out.query_losses), -1)
    return ~torch.isfinite(out.query_losses) | ~torch.isfinite(predictions).all(dim=1)


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
    algorithm: AlgorithmName | Algorithm = "maml",
    vectorize: Vectorize = "auto",
    params: Mapping[str, Tensor] | None = None,
    track_initial_loss: bool = True,
    compile: bool | str = False,
    checkpoint_inner_steps: bool = False,
    epoch: int = 0,
    learned: Mapping[str, Tensor] | None = None,
    executor: Executor | None = None,
) -> MetaLossOutput:
    """Meta-loss of a batch of tasks: adapt on each task's support set, evaluate its query set.

    Args:
        net: any ``nn.Module``; it is run functionally and not modified.
        loss_fn: ``"mse"``, ``"cross_entropy"`` or a callable ``(prediction, target) -> scalar``.
        support_x: ``[tasks, K, *features]`` support inputs (see :func:`check_episode`).
        support_y: ``[tasks, K, *targets]`` support targets.
        query_x: ``[tasks, Q, *features]`` query inputs.
        query_y: ``[tasks, Q, *targets]`` query targets.
        inner_lr: step size of the inner-loop SGD, > 0 (``inner_steps=0`` evaluates without
            adapting).
        inner_steps: number of inner-loop steps (0 evaluates the initial parameters).
        algorithm: a name of :data:`~lightning_maml.functional.algorithms.ALGORITHMS` or an
            :class:`~lightning_maml.functional.algorithms.Algorithm`: ``"maml"`` differentiates
            through every inner step (second order); ``"fomaml"`` treats inner gradients as
            constants (first order); ``"reptile"`` returns a surrogate whose gradient is the mean
            of ``initial - adapted`` parameters; ``"anil"`` adapts the last layer only. Algorithms
            with learned tensors (Meta-SGD, MAML++) are passed as objects, kept from call to
            call: ``.loss.backward()`` puts their meta-gradient on those tensors too.
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
            ``.backward()`` only. Ignored where the inner loop is first order (``"fomaml"``,
            ``"reptile"``), which keeps no graph through it.
        epoch: the training epoch, for algorithms whose objective or order change with it
            (MAML++'s multi-step loss and derivative-order annealing).
        learned: tensors standing in for the algorithm's learned tensors (e.g. detached ones for
            evaluation); default: the algorithm's own.
        executor: what remembers vmap decisions and compiled functions between calls (see
            :class:`~lightning_maml.functional.execution.Executor`); default: one kept for
            ``net`` as long as it lives.

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
    executor = executor_of(net) if executor is None else executor
    # a name resolves to the same object on every call, so that what is keyed by the algorithm
    # (compiled functions) is found again
    if isinstance(algorithm, str):
        if algorithm not in executor.algorithms:
            executor.algorithms[algorithm] = resolve_algorithm(algorithm)
        algo = executor.algorithms[algorithm]
    else:
        algo = resolve_algorithm(algorithm)
    vectorize = check_vectorize(vectorize)
    check_count(epoch, "epoch", minimum=0)
    check_episode(support_x, support_y, query_x, query_y)
    compile_mode = check_compile(compile)
    params, constants = split_parameters(net, params)
    if not params:
        raise ValueError(
            f"{type(net).__name__} has no parameter with requires_grad=True to adapt, and no "
            "`params` were given: unfreeze at least one parameter or pass `params`"
        )
    check_checkpointing(checkpoint_inner_steps, vectorize, compile_mode)
    algo.bind(params, inner_lr, inner_steps, net=net)
    if isinstance(algorithm, str) and algo.learned():
        raise ValueError(
            f"algorithm {algorithm!r} learns tensors of its own: create it once "
            f"({type(algo).__name__}()) and pass the object to every call"
        )
    first_order = algo.is_first_order(epoch)
    inputs = engine_inputs(algo, params, inner_steps, epoch, support_x, learned)
    # only where a graph through the inner loop would be kept
    checkpoint = (
        checkpoint_inner_steps
        and not first_order
        and inner_steps > 0
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in inputs.values())
    )
    task = partial(
        task_meta_loss,
        algo,
        net,
        loss_fn,
        inner_lr,
        inner_steps,
        first_order,
        track_initial_loss,
        checkpoint,
    )
    batch = (support_x, support_y, query_x, query_y)
    with task_batch_norm(net):
        if checkpoint or vectorize == "loop":
            vectorized = False
        elif vectorize == "vmap":
            vectorized = True
        else:
            compiled = compile_mode is not None
            key = _setting(
                net, loss_fn, algo, first_order, inner_steps, inputs, support_x, compiled
            )
            vectorized = executor.decide_vmap(net, key, task, inputs, constants, batch, compiled)
        if compile_mode:
            # every setting `task` closes over (checkpoint is off under compile)
            key = (compile_mode, loss_fn, inner_lr, inner_steps, algo, first_order, vectorized)
            key += (tuple(inputs), track_initial_loss, net.training)
            outputs = executor.run_compiled(
                key, compile_mode, task, vectorized, inputs, constants, batch
            )
        elif vectorized:
            try:
                outputs = mean_loss(run_tasks(task, True, inputs, constants, batch))
            except Exception as error:
                if vectorize != "auto":
                    raise
                # the loop tells a data error (raised from it, nothing remembered) from one vmap
                # cannot run, which sends this setting to the loop from now on
                outputs = loop_meta_loss(task, inputs, constants, batch)
                executor.decisions[key] = vectorized = False
                warnings.warn(
                    f"torch.func.vmap failed on {type(net).__name__} ({type(error).__name__}: "
                    f"{error}); running its tasks one by one for this setting. Pass "
                    f"vectorize='loop' to silence this.",
                    stacklevel=2,
                )
        else:
            outputs = loop_meta_loss(task, inputs, constants, batch)
    loss, query_losses, predictions, initial = outputs
    return MetaLossOutput(
        loss=loss,
        query_losses=query_losses,
        query_predictions=predictions,
        initial_query_losses=initial if track_initial_loss else None,
        vectorized=vectorized,
    )


def engine_inputs(
    algorithm: Algorithm,
    params: Mapping[str, Tensor],
    inner_steps: int,
    epoch: int,
    like: Tensor,
    learned: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The tensors a task function takes: the network's parameters, the algorithm's learned
    tensors and its step weights (keys under ``LEARNED``)."""
    learned = algorithm.learned() if learned is None else dict(learned)
    inputs = {**params, **{LEARNED + n: t for n, t in learned.items()}}
    weights = algorithm.step_weights(inner_steps, epoch)
    if weights is not None:
        dtype = compute_dtype(params, like)
        inputs[LEARNED + "step_weights"] = torch.tensor(weights, dtype=dtype, device=like.device)
    return inputs


def _setting(
    net: nn.Module,
    loss_fn: LossFn,
    algorithm: Algorithm,
    first_order: bool,
    inner_steps: int,
    inputs: Mapping[str, Tensor],
    x: Tensor,
    compiled: bool,
) -> tuple:
    # what decides which operations a meta-loss runs (a new loss closure of the same code runs
    # the same ones)
    loss_id = getattr(loss_fn, "__code__", None) or (
        type(loss_fn) if isinstance(loss_fn, nn.Module) else loss_fn
    )
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs.values())
    dtype = compute_dtype(inputs, x)
    steps = (inner_steps > 0, LEARNED + "step_weights" in inputs)
    return (
        algorithm.name,
        first_order,
        loss_id,
        steps,
        grad,
        net.training,
        dtype,
        x.device.type,
        compiled,
    )


def meta_objective(
    net: nn.Module,
    loss_fn: str | LossFn,
    batch: Episode,
    *,
    inner_lr: float,
    inner_steps: int,
    algorithm: Algorithm,
    params: Mapping[str, Tensor],
    learned: Mapping[str, Tensor],
    anchor: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    epoch: int = 0,
) -> Tensor:
    """The value whose gradient :func:`meta_loss` computes for ``algorithm``: the mean over tasks
    of its outer objective at ``params`` and ``learned`` (the algorithm's tensors), computed task
    by task without vmap or compilation, values only. Where the algorithm is first order, its
    inner gradients are constants taken at ``anchor`` (``(params, learned)`` of the point the
    gradient is taken at; default: ``params`` and ``learned`` themselves), so that finite
    differences around the anchor estimate the first-order meta-gradient there.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_maml.functional.algorithms import MAML
        >>> net = nn.Linear(1, 1)
        >>> batch = Episode(*(torch.randn(2, 5, 1) for _ in range(4)))
        >>> params = dict(net.named_parameters())
        >>> value = meta_objective(net, "mse", batch, inner_lr=0.1, inner_steps=1,
        ...                        algorithm=MAML(), params=params, learned={})
        >>> out = meta_loss(net, "mse", *batch, inner_lr=0.1)
        >>> torch.allclose(value, out.loss.detach())
        True
    """
    loss_fn = resolve_loss(loss_fn)
    first_order = algorithm.is_first_order(epoch)
    params, constants = split_parameters(net, params)
    inputs = engine_inputs(algorithm, params, inner_steps, epoch, batch.support_x, learned)
    anchor_inputs = None
    if first_order:
        anchor_params, anchor_learned = anchor if anchor is not None else (params, learned)
        anchor_inputs = {
            n: t.detach()
            for n, t in engine_inputs(
                algorithm, dict(anchor_params), inner_steps, epoch, batch.support_x, anchor_learned
            ).items()
        }
    objectives = []
    with task_batch_norm(net), torch.enable_grad():
        for t in range(batch.support_x.shape[0]):
            objective, *_ = task_meta_loss(
                algorithm,
                net,
                loss_fn,
                inner_lr,
                inner_steps,
                first_order,
                False,
                False,
                False,
                inputs,
                constants,
                *(x[t] for x in batch),
                anchor=anchor_inputs,
            )
            objectives.append(objective.detach())
    return torch.stack(objectives).mean()
