"""Inner-loop update rules: gradient steps on one task's support set.

A step is ``p - rate * grad`` for every adapted parameter; what varies between the MAML family's
algorithms is only which parameters adapt, which rates they step with (one number; a learned
tensor per parameter as in Meta-SGD; a learned number per parameter and step as in MAML++), and
whether the step is differentiated (second order) or its gradient is a constant (first order).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import vmap

from lightning_maml.functional.losses import LossFn, resolve_loss, scalar_loss
from lightning_maml.functional.parameters import forward, split_parameters, task_batch_norm

Rate = float | Tensor
#: a step size for every parameter (a number or a tensor), or one per parameter name
Rates = Rate | Mapping[str, Rate]
#: the step sizes of every step, or a function ``step -> rates``
Schedule = Rates | Callable[[int], Rates]


def sgd_step(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], lr: Rates
) -> dict[str, Tensor]:
    """One inner-loop update ``p - lr * g``; a parameter whose gradient is ``None`` (or that
    ``grads`` leaves out) is unchanged. ``lr`` is one step size for all parameters (a number, or a
    tensor broadcast against each) or a mapping from parameter name to its own.

    Example::

        >>> import torch
        >>> sgd_step({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)}, lr=0.5)
        {'w': tensor(0.)}
        >>> sgd_step({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)}, lr={"w": 0.25})
        {'w': tensor(0.5000)}
    """
    rates = lr if isinstance(lr, Mapping) else None
    return {
        name: p
        if grads.get(name) is None
        else p - (lr if rates is None else rates[name]) * grads[name]
        for name, p in params.items()
    }


def _rates_at(schedule: Schedule, step: int) -> Rates:
    return schedule(step) if callable(schedule) else schedule


def _detached(rates: Rates) -> Rates:
    if isinstance(rates, Mapping):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in rates.items()}
    return rates.detach() if isinstance(rates, Tensor) else rates


def adapt_parameters(
    net: nn.Module,
    params: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    loss_fn: LossFn,
    support_x: Tensor,
    support_y: Tensor,
    inner_lr: Schedule,
    inner_steps: int,
    first_order: bool = False,
    checkpoint: bool = False,
    vectorized: bool = False,
    *,
    adapt: Collection[str] | None = None,
    anchor: Mapping[str, Tensor] | None = None,
    anchor_lr: Schedule | None = None,
    trajectory: bool = False,
    step_parameters: Callable[[int], Mapping[str, Tensor]] | None = None,
    anchor_step_parameters: Callable[[int], Mapping[str, Tensor]] | None = None,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """Run ``inner_steps`` of :func:`sgd_step` on one task's support set and return the adapted
    parameters (``trajectory=True``: the parameters after each step, ``inner_steps`` dicts).

    ``inner_lr`` gives the step sizes (see :func:`sgd_step`), the same for every step or, as a
    function ``step -> rates``, per step. Rates that are tensors requiring grad are learned: the
    result is differentiable with respect to them. ``adapt`` names the parameters that adapt (all
    by default); the others stay as given, and the result still depends on them through the
    adapted ones' gradients (second order).

    With ``first_order=False`` the result stays differentiable through every inner step (second
    order). With ``first_order=True`` each inner gradient is a constant, taken along the trajectory
    that starts at ``anchor`` (default: ``params``' values) and steps with ``anchor_lr`` (default:
    the values of ``inner_lr``): the adapted parameters are ``params - sum_k rate_k * g_k``,
    differentiable with respect to ``params`` (the identity) and to learned rates, not through
    the ``g_k``. An anchor apart from ``params`` and ``inner_lr`` gives the function whose
    gradient a first-order update is, for finite differences.

    With ``checkpoint=True`` (second order only) each inner step runs under
    :func:`torch.utils.checkpoint.checkpoint` (the reentrant variant, the one that composes with
    :func:`torch.func.grad`): only the parameters between steps are kept, and each step's graph is
    rebuilt during the backward pass. Memory no longer grows with the activations of every step;
    the forward work of the inner loop is done twice; gradients are the same up to float rounding.
    The result then supports ``.backward()`` only, not :func:`torch.autograd.grad`.

    ``vectorized=True`` says the call runs under :func:`torch.func.vmap` (see
    :func:`~lightning_maml.functional.forward`).

    ``step_parameters(step)`` gives tensors that stand in for some parameters that do not adapt
    during that step's forward pass (MAML++'s per-step BatchNorm weights and biases); the
    returned parameters are the adapted ones with the others as given. First order, their
    stand-ins on the anchor's trajectory are ``anchor_step_parameters`` (default: the same,
    as values).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(1, 1)
        >>> params = dict(net.named_parameters())
        >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
        >>> from lightning_maml.functional import mse_loss
        >>> adapted = adapt_parameters(net, params, {}, mse_loss, x, y, 0.1, 3)
        >>> sorted(adapted)
        ['bias', 'weight']
        >>> head_only = adapt_parameters(net, params, {}, mse_loss, x, y, 0.1, 3, adapt=["bias"])
        >>> head_only["weight"] is params["weight"]
        True
    """
    names = [n for n in params if adapt is None or n in adapt]
    fixed = {n: p for n, p in params.items() if n not in names}

    def support_loss(moving: dict[str, Tensor], still: Mapping[str, Tensor]) -> Tensor:
        prediction = forward(net, {**still, **moving}, constants, support_x, vectorized)
        return scalar_loss(loss_fn, prediction, support_y)

    def gradients(moving: dict[str, Tensor], still: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return torch.func.grad(support_loss)(moving, still)

    def at_step(step: int, values: Mapping[str, Tensor], stand_ins: Callable | None) -> dict:
        # the parameters that do not adapt, as the forward pass of ``step`` sees them
        return dict(values) if stand_ins is None else {**values, **stand_ins(step)}

    steps: list[dict[str, Tensor]] = []
    if first_order:
        start = anchor if anchor is not None else params
        fixed_values = {n: start[n].detach() for n in fixed}
        moving_anchor = {n: start[n].detach() for n in names}
        moving = {n: params[n] for n in names}
        anchor_stand_ins = anchor_step_parameters or step_parameters
        for step in range(inner_steps):
            rates = _rates_at(inner_lr, step)
            still = at_step(step, fixed_values, anchor_stand_ins)
            grads = gradients(moving_anchor, {n: t.detach() for n, t in still.items()})
            anchor_rates = rates if anchor_lr is None else _rates_at(anchor_lr, step)
            moving_anchor = sgd_step(moving_anchor, grads, _detached(anchor_rates))
            moving = sgd_step(moving, grads, rates)  # grads are values: first order
            steps.append({**fixed, **moving})
    elif checkpoint:
        fixed_names = list(fixed)
        rate_names, rate_tensors = [], []
        for step in range(inner_steps):
            rates = _rates_at(inner_lr, step)
            items = rates.items() if isinstance(rates, Mapping) else [("", rates)]
            for key, value in items:
                if isinstance(value, Tensor):
                    rate_names.append((step, key))
                    rate_tensors.append(value)
        stand_in_names, stand_in_tensors = [], []
        for step in range(inner_steps if step_parameters is not None else 0):
            for key, value in step_parameters(step).items():
                stand_in_names.append((step, key))
                stand_in_tensors.append(value)

        def step_fn(step: int, n_moving: int, *flat: Tensor) -> tuple[Tensor, ...]:
            # every tensor the step reads is an input: reentrant checkpointing differentiates
            # inputs only. BatchNorm mode is set inside, so the recomputation sees the same one
            moving = dict(zip(names, flat[:n_moving]))
            at = n_moving + len(fixed_names)
            still = dict(zip(fixed_names, flat[n_moving:at]))
            tensors = dict(zip(rate_names, flat[at : at + len(rate_tensors)]))
            stand_ins = dict(zip(stand_in_names, flat[at + len(rate_tensors) :]))
            still.update({key: t for (s, key), t in stand_ins.items() if s == step})
            rates = _rates_at(inner_lr, step)
            if isinstance(rates, Mapping):
                rates = {k: tensors.get((step, k), v) for k, v in rates.items()}
            else:
                rates = tensors.get((step, ""), rates)
            with task_batch_norm(net):
                return tuple(sgd_step(moving, gradients(moving, still), rates).values())

        flat = tuple(params[n] for n in names)
        extra = (*(fixed[n] for n in fixed_names), *rate_tensors, *stand_in_tensors)
        for step in range(inner_steps):
            flat = torch.utils.checkpoint.checkpoint(
                partial(step_fn, step, len(names)), *flat, *extra, use_reentrant=True
            )
            steps.append({**fixed, **dict(zip(names, flat))})
    else:
        moving = {n: params[n] for n in names}
        for step in range(inner_steps):
            still = at_step(step, fixed, step_parameters)
            moving = sgd_step(moving, gradients(moving, still), _rates_at(inner_lr, step))
            steps.append({**fixed, **moving})
    if trajectory:
        return steps
    return steps[-1] if steps else dict(params)


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
            return scalar_loss(loss_fn, forward(net, p, constants, x, vectorized), y)

        return torch.func.grad(support_loss)(params)

    with task_batch_norm(net), torch.enable_grad():
        try:  # first derivatives only: no check needed, the loop below raises the user's errors
            return vmap(partial(task, True), randomness="different")(support_x, support_y)
        except Exception:  # noqa: BLE001
            per_task = [task(False, support_x[i], support_y[i]) for i in range(len(support_x))]
    return {name: torch.stack([g[name] for g in per_task]) for name in params}
