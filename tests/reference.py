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
