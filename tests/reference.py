"""Independent references for meta-gradient tests: plain autograd loops and finite differences.

Nothing here uses lightning_maml's engine or update rule, so the tests compare against code that
shares no lines with what they check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call


def unrolled_meta_loss(
    net: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    lr: float,
    steps: int,
    first_order: bool = False,
) -> Tensor:
    """Mean query loss after ``steps`` SGD steps per task, written as an explicit autograd loop."""
    support_x, support_y, query_x, query_y = tasks
    losses = []
    for t in range(support_x.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            loss = loss_fn(functional_call(net, fast, (support_x[t],)), support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {name: w - lr * g for (name, w), g in zip(fast.items(), grads)}
        losses.append(loss_fn(functional_call(net, fast, (query_x[t],)), query_y[t]))
    return torch.stack(losses).mean()


def finite_difference_gradient(
    fn: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], eps: float = 1e-6
) -> dict[str, Tensor]:
    """Central finite differences of a scalar function of float64 parameters, per coordinate."""
    base = {name: p.detach().clone() for name, p in params.items()}
    grads = {}
    with torch.no_grad():
        for name, p in base.items():
            g = torch.zeros_like(p)
            flat = g.view(-1)
            for i in range(p.numel()):
                plus = {k: v.clone() for k, v in base.items()}
                minus = {k: v.clone() for k, v in base.items()}
                plus[name].view(-1)[i] += eps
                minus[name].view(-1)[i] -= eps
                flat[i] = (fn(plus) - fn(minus)) / (2 * eps)
            grads[name] = g
    return grads


def max_abs_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def l2l_clone_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """learn2learn's ``clone_module`` as its source describes it: a shallow copy of every module
    (``__dict__`` copied), parameters replaced by ``param.clone()`` (one clone per storage, so tied
    parameters stay tied), submodules cloned recursively. learn2learn shares buffers that do not
    require grad with the original; that part is not reproduced here."""
    memo = {} if memo is None else memo
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = clone._parameters.copy()
    clone._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    clone._modules = clone._modules.copy()
    for key, param in module._parameters.items():
        if param is not None:
            ptr = param.data_ptr()
            if ptr not in memo:
                memo[ptr] = param.clone()
            clone._parameters[key] = memo[ptr]
    for key, child in module._modules.items():
        clone._modules[key] = l2l_clone_module(child, memo)
    return clone


def l2l_update_module(module: nn.Module, lr: float, grads: list[Tensor | None]) -> None:
    """learn2learn's ``maml_update``: ``p - lr * g`` written into ``_parameters`` of every module of
    the tree, in ``module.parameters()`` order."""
    updates = {}
    for p, g in zip(module.parameters(), grads):
        if g is not None:
            updates[id(p)] = p - lr * g
    stack = [module]
    while stack:
        m = stack.pop()
        for key, p in m._parameters.items():
            if p is not None and id(p) in updates:
                m._parameters[key] = updates[id(p)]
        stack.extend(c for c in m._modules.values() if c is not None)


def family_task_objectives(
    net: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    rate: Callable[[str, int], float | Tensor],
    *,
    adapt: list[str] | None = None,
    first_order: bool = False,
    weights: list[float] | None = None,
    anchor: tuple[dict[str, Tensor], Callable[[str, int], float | Tensor]] | None = None,
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Per task, the outer objective of a MAML-family algorithm and the adapted parameters, as an
    explicit autograd loop.

    ``rate(name, step)`` is the inner step size of a parameter at a step (a number or a tensor,
    learned or not); ``adapt`` the parameters that adapt (default all); ``weights`` the multi-step
    loss weights (default: the last step's query loss). First order: each inner gradient is taken
    (without a graph) on the trajectory from ``anchor = (params0, rate0)`` (default ``params`` and
    ``rate``) and applied to ``params`` with ``rate``.
    """
    support_x, support_y, query_x, query_y = tasks
    names = list(params) if adapt is None else adapt
    anchor_params, anchor_rate = anchor if anchor is not None else (params, rate)
    objectives, adapted = [], []
    for t in range(support_x.shape[0]):
        fast = dict(params)
        plain = {n: p.detach() for n, p in anchor_params.items()}
        query_losses = []
        for k in range(steps):
            if first_order:
                at = {n: p.detach().requires_grad_(n in names) for n, p in plain.items()}
                loss = loss_fn(functional_call(net, at, (support_x[t],)), support_y[t])
                grads = torch.autograd.grad(loss, [at[n] for n in names])
                for n, g in zip(names, grads):
                    r = anchor_rate(n, k)
                    plain[n] = plain[n] - (r.detach() if isinstance(r, Tensor) else r) * g
                    fast[n] = fast[n] - rate(n, k) * g
            else:
                loss = loss_fn(functional_call(net, fast, (support_x[t],)), support_y[t])
                grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
                fast = {**fast, **{n: fast[n] - rate(n, k) * g for n, g in zip(names, grads)}}
            if weights is not None:
                prediction = functional_call(net, fast, (query_x[t],))
                query_losses.append(loss_fn(prediction, query_y[t]))
        if weights is None:
            objective = loss_fn(functional_call(net, fast, (query_x[t],)), query_y[t])
        else:
            objective = sum(w * q for w, q in zip(weights, query_losses))
        objectives.append(objective)
        adapted.append(fast)
    return objectives, adapted


def directional_derivative(
    fn: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    direction: dict[str, Tensor],
    eps: float = 1e-6,
) -> float:
    """Central finite difference of a scalar function of float64 tensors along ``direction``."""
    # leaves that require grad: the function may differentiate inside (inner loops)
    plus = {n: (p.detach() + eps * direction[n]).requires_grad_() for n, p in params.items()}
    minus = {n: (p.detach() - eps * direction[n]).requires_grad_() for n, p in params.items()}
    return float((fn(plus).detach() - fn(minus).detach()) / (2 * eps))
