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
