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
    per_step: Callable[[int], dict[str, Tensor]] | None = None,
    anchor_per_step: Callable[[int], dict[str, Tensor]] | None = None,
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Per task, the outer objective of a MAML-family algorithm and the adapted parameters, as an
    explicit autograd loop.

    ``rate(name, step)`` is the inner step size of a parameter at a step (a number or a tensor,
    learned or not); ``adapt`` the parameters that adapt (default all); ``weights`` the multi-step
    loss weights (default: the last step's query loss). First order: each inner gradient is taken
    (without a graph) on the trajectory from ``anchor = (params0, rate0)`` (default ``params`` and
    ``rate``) and applied to ``params`` with ``rate``. ``per_step(k)`` (MAML++'s per-step
    BatchNorm weights and biases): tensors replacing some parameters that do not adapt in the
    forward passes of step ``k`` and the query pass after it (``anchor_per_step`` on the anchor's
    trajectory; default the same).
    """
    support_x, support_y, query_x, query_y = tasks
    names = list(params) if adapt is None else adapt
    anchor_params, anchor_rate = anchor if anchor is not None else (params, rate)
    anchor_per_step = anchor_per_step or per_step

    def seen(values, k, replace=per_step):
        return values if replace is None else {**values, **replace(k)}

    objectives, adapted = [], []
    for t in range(support_x.shape[0]):
        fast = dict(params)
        plain = {n: p.detach() for n, p in anchor_params.items()}
        query_losses = []
        for k in range(steps):
            if first_order:
                at = seen(plain, k, anchor_per_step)
                at = {n: p.detach().requires_grad_(n in names) for n, p in at.items()}
                loss = loss_fn(functional_call(net, at, (support_x[t],)), support_y[t])
                grads = torch.autograd.grad(loss, [at[n] for n in names])
                for n, g in zip(names, grads):
                    r = anchor_rate(n, k)
                    plain[n] = plain[n] - (r.detach() if isinstance(r, Tensor) else r) * g
                    fast[n] = fast[n] - rate(n, k) * g
            else:
                loss = loss_fn(functional_call(net, seen(fast, k), (support_x[t],)), support_y[t])
                grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
                fast = {**fast, **{n: fast[n] - rate(n, k) * g for n, g in zip(names, grads)}}
            if weights is not None:
                prediction = functional_call(net, seen(fast, k), (query_x[t],))
                query_losses.append(loss_fn(prediction, query_y[t]))
        if weights is None:
            last = seen(fast, max(steps - 1, 0))
            objective = loss_fn(functional_call(net, last, (query_x[t],)), query_y[t])
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


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def _unflat(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, t in like.items():
        out[n] = vector[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out


def loss_hessian(
    net: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
) -> Tensor:
    """The Hessian of ``loss_fn(net(x), y)`` with respect to ``params``, as one explicit matrix
    over the flattened parameters (in ``params``' order)."""

    def loss(flat: Tensor) -> Tensor:
        return loss_fn(functional_call(net, _unflat(flat, params), (x,)), y)

    return torch.autograd.functional.hessian(loss, _flat(params))


def implicit_meta_gradient(
    net: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    lam: float,
    solve: Callable[[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor], dict[str, Tensor]],
    adapt: list[str] | None = None,
    cg_iterations: int | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """The implicit meta-gradient (Rajeswaran et al. 2019) of the mean query loss at ``phi``, with
    explicit matrices: ``(I + H/lam)^-1 g`` for the adapted parameters, solved with the full
    Hessian, and ``dL/dtheta_f - M^T (H + lam I)^-1 g`` for the others, ``M`` the full mixed
    derivative of the support gradient. ``solve(theta_adapted, theta_fixed, x, y)`` gives ``phi``.
    With ``cg_iterations``, ``(I + H/lam) v = g`` is solved instead by that many iterations of
    textbook conjugate gradient on the explicit matrix, from zero. Returns the gradient and the
    mean query loss."""
    names = list(params) if adapt is None else adapt
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    losses = []
    for sx, sy, qx, qy in zip(*tasks):
        theta = {n: params[n].detach() for n in names}
        fixed = {n: p.detach() for n, p in params.items() if n not in names}
        phi = solve(theta, fixed, sx, sy)

        def support(flat_phi, flat_fixed, sx=sx, sy=sy, theta=theta, fixed=fixed) -> Tensor:
            state = {**_unflat(flat_phi, theta), **_unflat(flat_fixed, fixed)}
            return loss_fn(functional_call(net, state, (sx,)), sy)

        at = {n: p.detach().requires_grad_() for n, p in {**phi, **fixed}.items()}
        query = loss_fn(functional_call(net, at, (qx,)), qy)
        grads = dict(zip(at, torch.autograd.grad(query, list(at.values()))))
        losses.append(query.detach())
        flat_phi = _flat(phi)
        if fixed:
            hessian = torch.autograd.functional.hessian(support, (flat_phi, _flat(fixed)))
            h, m = hessian[0][0], hessian[0][1]  # d2/dphi2, d2/dphi dfixed
        else:
            h = torch.autograd.functional.hessian(lambda f: support(f, torch.zeros(0)), flat_phi)
        eye = torch.eye(len(flat_phi), dtype=flat_phi.dtype)
        rhs = _flat({n: grads[n] for n in names})
        if cg_iterations is None:
            w = torch.linalg.solve(h + lam * eye, rhs)
        else:
            w = _conjugate_gradient(eye + h / lam, rhs, cg_iterations) / lam
        for n, g in _unflat(lam * w, theta).items():
            total[n] += g
        if fixed:
            for n, g in _unflat(_flat({n: grads[n] for n in fixed}) - m.T @ w, fixed).items():
                total[n] += g
    count = len(losses)
    return {n: g / count for n, g in total.items()}, torch.stack(losses).mean()


def _conjugate_gradient(matrix: Tensor, b: Tensor, iterations: int) -> Tensor:
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(iterations):
        if rr == 0:
            break
        ap = matrix @ p
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        new_rr = r @ r
        p, rr = r + (new_rr / rr) * p, new_rr
    return x


def regularised_gradient_descent(
    net: nn.Module, loss_fn: Callable, lam: float, lr: float, steps: int
) -> Callable[[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor], dict[str, Tensor]]:
    """``steps`` plain gradient steps on ``L_support(phi) + lam/2 ||phi - theta||^2`` from
    ``theta`` (values only), for :func:`implicit_meta_gradient`."""

    def solve(theta, fixed, x, y):
        phi = dict(theta)
        for _ in range(steps):
            at = {n: p.detach().requires_grad_() for n, p in phi.items()}
            loss = loss_fn(functional_call(net, {**at, **fixed}, (x,)), y)
            grads = torch.autograd.grad(loss, list(at.values()))
            phi = {
                n: (p - lr * (g + lam * (p - theta[n]))).detach()
                for (n, p), g in zip(phi.items(), grads)
            }
        return phi

    return solve


def regularised_newton(
    net: nn.Module, loss_fn: Callable, lam: float, iterations: int = 30
) -> Callable[[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor], dict[str, Tensor]]:
    """The minimiser of ``L_support(phi) + lam/2 ||phi - theta||^2`` near ``theta`` by Newton's
    method with the full Hessian (to float64 precision on a small network)."""

    def solve(theta, fixed, x, y):
        def regularised(flat_phi: Tensor) -> Tensor:
            state = {**_unflat(flat_phi, theta), **fixed}
            penalty = ((flat_phi - _flat(theta)) ** 2).sum()
            return loss_fn(functional_call(net, state, (x,)), y) + lam / 2 * penalty

        flat = _flat(theta).clone()
        for _ in range(iterations):
            g = torch.autograd.functional.jacobian(regularised, flat)
            h = torch.autograd.functional.hessian(regularised, flat)
            flat = flat - torch.linalg.solve(h, g)
        return _unflat(flat, theta)

    return solve


def unrolled_regularised_meta_gradient(
    net: nn.Module,
    params: dict[str, Tensor],
    loss_fn: Callable,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    lam: float,
    lr: float,
    steps: int,
) -> dict[str, Tensor]:
    """Second-order MAML on the regularised inner problem, unrolled: the gradient of the mean
    query loss after ``steps`` differentiated steps on ``L_support + lam/2 ||phi - theta||^2``."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    losses = []
    for sx, sy, qx, qy in zip(*tasks):
        fast = dict(leaves)
        for _ in range(steps):
            loss = loss_fn(functional_call(net, fast, (sx,)), sy)
            penalty = sum(((fast[n] - leaves[n]) ** 2).sum() for n in fast)
            grads = torch.autograd.grad(
                loss + lam / 2 * penalty, list(fast.values()), create_graph=True
            )
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads)}
        losses.append(loss_fn(functional_call(net, fast, (qx,)), qy))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(leaves.values()))
    return dict(zip(leaves, grads))


def prototype_head(
    net: nn.Sequential, params: dict[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """``params`` with the last layer of a ``Sequential`` replaced by ProtoMAML's initialisation
    (Triantafillou et al. 2020): weight ``2 c_k``, bias ``-||c_k||^2``, ``c_k`` the mean output of
    the other layers (run here as their own ``Sequential``) over the examples of class ``k``.
    The other parameters are returned as clones: the inner loop's own variables, so that an inner
    gradient with respect to them is the partial derivative (the head depends on the originals)."""
    last = str(len(net) - 1)
    body = nn.Sequential(*list(net)[:-1])
    body_params = {n: p for n, p in params.items() if not n.startswith(last + ".")}
    embeddings = functional_call(body, body_params, (x,)).flatten(1)
    classes = params[f"{last}.weight"].shape[0]
    prototypes = torch.stack(
        [
            embeddings[y == k].mean(0) if bool((y == k).any()) else embeddings[0] * 0
            for k in range(classes)
        ]
    )
    norms = torch.stack([(c * c).sum() for c in prototypes])
    clones = {n: p.clone() for n, p in params.items()}
    return {**clones, f"{last}.weight": 2 * prototypes, f"{last}.bias": -norms}
