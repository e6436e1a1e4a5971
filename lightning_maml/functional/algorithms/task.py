"""One task's meta-loss: the function the engine runs per task (vectorised, in a loop or
compiled)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_maml.episode import Episode
from lightning_maml.functional.algorithms.base import (
    LEARNED,
    Algorithm,
    TaskContext,
    split_prefixed,
)
from lightning_maml.functional.losses import LossFn, scalar_loss


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
