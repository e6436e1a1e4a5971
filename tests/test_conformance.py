"""One matrix for the whole MAML family: algorithm x execution path x network family x dtype.

Each case runs the engine (``meta_loss``) and compares its meta-gradient, with respect to the
network's parameters and the algorithm's learned step sizes, with an explicit autograd loop written
without the engine (``reference.family_task_objectives``); in float64 the reference gradient is
itself checked against finite differences of the reference objective. A new algorithm or path is
covered by one entry in ``ALGORITHMS`` or ``PATHS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from reference import (
    directional_derivative,
    family_task_objectives,
    implicit_meta_gradient,
    prototype_head,
    regularised_gradient_descent,
)
from tasks import image_tasks, regression_tasks, small_bn_net, small_conv_net, tanh_mlp
from torch import Tensor, nn

from lightning_maml.functional import (
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    Algorithm,
    MAMLPlusPlus,
    MetaSGD,
    ProtoMAML,
    Reptile,
    meta_loss,
    mse_loss,
)

INNER_LR, STEPS = 0.2, 2


@dataclass
class Case:
    make: Callable[[], Algorithm]
    epoch: int = 0
    # the reference's description of the algorithm, written from its paper
    first_order: bool = False
    adapt: str = "all"  # "all" or "last": the last layer with parameters
    rates: str = "fixed"  # "fixed", "per-parameter" (Meta-SGD), "per-layer-step" (LSLR)
    weights: list[float] | None = field(default=None)
    reptile: bool = False
    implicit: float | None = None  # iMAML's lam: the implicit gradient with explicit matrices
    cg: int | None = None  # its conjugate-gradient iterations (None: the exact solve)
    prototypes: bool = False  # ProtoMAML: each task's head starts from its class prototypes
    families: tuple[str, ...] = ("mlp", "conv")
    compiled: bool = True  # also a row on the compiled path
    per_step_bn: bool = False  # MAML++'s per-step BatchNorm weights and biases


ALGORITHMS = {
    "maml": Case(MAML),
    "fomaml": Case(FOMAML, first_order=True),
    "anil": Case(ANIL, adapt="last"),
    "anil first order": Case(lambda: ANIL(first_order=True), adapt="last", first_order=True),
    "metasgd": Case(MetaSGD, rates="per-parameter"),
    "metasgd first order": Case(
        lambda: MetaSGD(first_order=True), rates="per-parameter", first_order=True
    ),
    # epoch 1 of 4 with the multi-step loss, 2 steps: weights (1/2 - 1/8, 1/2 + 1/8)
    "maml++ msl": Case(
        lambda: MAMLPlusPlus(msl_epochs=4), epoch=1, rates="per-layer-step", weights=[0.375, 0.625]
    ),
    "maml++ first-order epoch": Case(
        lambda: MAMLPlusPlus(msl_epochs=0, first_order_epochs=2),
        epoch=1,
        rates="per-layer-step",
        first_order=True,
    ),
    "maml++ second-order epoch": Case(
        lambda: MAMLPlusPlus(msl_epochs=0, first_order_epochs=2), epoch=2, rates="per-layer-step"
    ),
    "maml++ per-step bn": Case(
        lambda: MAMLPlusPlus(msl_epochs=4, per_step_bn=True),
        epoch=1,
        rates="per-layer-step",
        weights=[0.375, 0.625],
        per_step_bn=True,
        families=("bn",),
    ),
    "maml++ per-step bn first-order epoch": Case(
        lambda: MAMLPlusPlus(msl_epochs=0, first_order_epochs=2, per_step_bn=True),
        epoch=1,
        rates="per-layer-step",
        first_order=True,
        per_step_bn=True,
        families=("bn",),
        compiled=False,
    ),
    "reptile": Case(Reptile, first_order=True, reptile=True),
    # conjugate gradient to its float64 limit against the exact solve, and 5 iterations of it
    # against textbook CG on the explicit matrix (compiling 40 iterations takes over a minute);
    # lam = 8 keeps every task's I + H/lam positive definite (the MLP's first task has a support
    # Hessian eigenvalue of -2.36 at its phi for lam = 2 and of -4.34 for lam = 4: no implicit
    # gradient there)
    "imaml": Case(lambda: IMAML(lam=8.0, cg_steps=40, cg_tol=1e-14), implicit=8.0, compiled=False),
    "imaml 5 cg steps": Case(lambda: IMAML(lam=8.0, cg_steps=5, cg_tol=0), implicit=8.0, cg=5),
    "imaml head": Case(
        lambda: IMAML(lam=8.0, cg_steps=5, cg_tol=0, adapt=["4.*"]),
        implicit=8.0,
        cg=5,
        adapt="last",
        compiled=False,
    ),
    "protomaml": Case(ProtoMAML, prototypes=True, families=("conv",)),
    "protomaml first order": Case(
        lambda: ProtoMAML(first_order=True),
        prototypes=True,
        first_order=True,
        families=("conv",),
        compiled=False,
    ),
    "protomaml anil": Case(
        lambda: ProtoMAML(adapt=["4.*"]),
        prototypes=True,
        adapt="last",
        families=("conv",),
        compiled=False,
    ),
}

PATHS = {
    "vmap": dict(vectorize="vmap"),
    "loop": dict(vectorize="loop"),
    "checkpointed loop": dict(vectorize="loop", checkpoint_inner_steps=True),
    "compiled": dict(vectorize="vmap", compile=True),
}


def _network(family: str, dtype: torch.dtype) -> tuple[nn.Module, object, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    if family == "mlp":
        return tanh_mlp().to(dtype), mse_loss, regression_tasks(dtype=dtype)
    net = small_bn_net() if family == "bn" else small_conv_net()
    return net.to(dtype), nn.functional.cross_entropy, image_tasks(dtype=dtype)


def _norm_names(net: nn.Module) -> list[str]:
    # the BatchNorm weights and biases, in the network's order
    return [
        f"{prefix}.{kind}"
        for prefix, module in net.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for kind in ("weight", "bias")
    ]


def _per_step(case: Case, net: nn.Module, learned: dict[str, Tensor]):
    if not case.per_step_bn:
        return None
    tensors = {n: learned[f"bn.{i}"] for i, n in enumerate(_norm_names(net))}
    return lambda k: {n: t[min(k, STEPS - 1)] for n, t in tensors.items()}


def _setup(case: Case, family: str, dtype: torch.dtype):
    net, loss_fn, tasks = _network(family, dtype)
    algorithm = case.make().to(dtype)
    params = dict(net.named_parameters())
    algorithm.bind(params, INNER_LR, STEPS, net=net)
    with torch.no_grad():  # learned step sizes of their own, not all equal to inner_lr
        g = torch.Generator().manual_seed(3)
        for t in algorithm.parameters():
            t.mul_(1 + 0.5 * torch.rand(t.shape, generator=g, dtype=dtype))
    return net, loss_fn, tasks, algorithm


def _reference_rate(case: Case, net: nn.Module, learned: dict[str, Tensor]):
    names = _adapted(case, net)
    if case.rates == "per-parameter":
        return lambda n, k: learned[f"lrs.{names.index(n)}"]
    if case.rates == "per-layer-step":
        return lambda n, k: learned[f"lslr.{names.index(n)}"][min(k, STEPS - 1)]
    return lambda n, k: INNER_LR


def _adapted(case: Case, net: nn.Module) -> list[str]:
    if case.adapt == "last":
        last = [m for m in net.modules() if list(m.parameters(recurse=False))][-1]
        head = {id(p) for p in last.parameters(recurse=False)}
        return [n for n, p in net.named_parameters() if id(p) in head]
    norms = _norm_names(net) if case.per_step_bn else []  # meta-learned per step, not adapted
    return [n for n, _ in net.named_parameters() if n not in norms]


def _reference_objective(case, net, loss_fn, tasks, inputs, anchor=None):
    params = {n: t for n, t in inputs.items() if not n.startswith("algo:")}
    learned = {n[5:]: t for n, t in inputs.items() if n.startswith("algo:")}
    anchor_params = anchor_rate = None
    if anchor is not None:
        anchor_params = {n: t for n, t in anchor.items() if not n.startswith("algo:")}
        anchor_learned = {n[5:]: t for n, t in anchor.items() if n.startswith("algo:")}
        anchor_rate = _reference_rate(case, net, anchor_learned)
    objectives = []
    for t in range(len(tasks[0])):
        task = tuple(x[t : t + 1] for x in tasks)
        task_params, task_anchor = params, anchor_params
        if case.prototypes:
            task_params = prototype_head(net, params, tasks[0][t], tasks[1][t])
            if anchor is not None:
                task_anchor = prototype_head(net, anchor_params, tasks[0][t], tasks[1][t])
        objective, _ = family_task_objectives(
            net,
            task_params,
            loss_fn,
            task,
            STEPS,
            _reference_rate(case, net, learned),
            adapt=_adapted(case, net),
            first_order=case.first_order,
            weights=case.weights,
            anchor=None if anchor is None else (task_anchor, anchor_rate),
            per_step=_per_step(case, net, learned),
            anchor_per_step=None if anchor is None else _per_step(case, net, anchor_learned),
        )
        objectives += objective
    return torch.stack(objectives).mean()


def _reference_gradient(case, net, loss_fn, tasks, inputs):
    leaves = {n: t.detach().requires_grad_() for n, t in inputs.items()}
    if case.implicit is not None:
        solve = regularised_gradient_descent(net, loss_fn, case.implicit, INNER_LR, STEPS)
        gradient, _ = implicit_meta_gradient(
            net,
            leaves,
            loss_fn,
            tasks,
            case.implicit,
            solve,
            adapt=_adapted(case, net),
            cg_iterations=case.cg,
        )
        return gradient
    if case.reptile:  # the update: mean over tasks of initial - adapted (first order)
        params = {n: t for n, t in leaves.items() if not n.startswith("algo:")}
        _, adapted = family_task_objectives(
            net, params, loss_fn, tasks, STEPS, lambda n, k: INNER_LR, first_order=True
        )
        return {
            n: torch.stack([(p - a[n]).detach() for a in adapted]).mean(0)
            for n, p in params.items()
        }
    value = _reference_objective(case, net, loss_fn, tasks, leaves)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}


def _inputs(net: nn.Module, algorithm: Algorithm) -> dict[str, Tensor]:
    inputs = dict(net.named_parameters())
    inputs.update({"algo:" + n: t for n, t in algorithm.learned().items()})
    return inputs


def _engine_gradient(case, net, loss_fn, tasks, algorithm, path):
    inputs = _inputs(net, algorithm)
    for t in inputs.values():
        t.grad = None
    out = meta_loss(
        net,
        loss_fn,
        *tasks,
        inner_lr=INNER_LR,
        inner_steps=STEPS,
        algorithm=algorithm,
        epoch=case.epoch,
        **PATHS[path],
    )
    out.loss.backward()
    return {
        n: torch.zeros_like(t) if t.grad is None else t.grad.detach() for n, t in inputs.items()
    }


def _relative_error(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    flat_a = torch.cat([a[n].flatten() for n in b]).double()
    flat_b = torch.cat([b[n].flatten() for n in b]).double()
    return float((flat_a - flat_b).norm() / flat_b.norm())


def _cases():
    for name in ALGORITHMS:
        for path in PATHS:
            for family in ALGORITHMS[name].families:
                for dtype in (torch.float64, torch.float32):
                    marks = []
                    if path == "compiled":
                        compiled = ALGORITHMS[name].compiled
                        first = ALGORITHMS[name].families[0]  # one family: compiling is slow
                        if family != first or dtype != torch.float64 or not compiled:
                            continue  # compilation is slow: one family and dtype
                        marks.append(pytest.mark.compile)
                    if path == "checkpointed loop" and dtype == torch.float32:
                        continue
                    dtype_name = str(dtype).removeprefix("torch.")
                    yield pytest.param(
                        name,
                        path,
                        family,
                        dtype,
                        id=f"{name}-{path}-{family}-{dtype_name}",
                        marks=marks,
                    )


@pytest.mark.parametrize("name, path, family, dtype", list(_cases()))
def test_meta_gradient_matches_the_reference(name, path, family, dtype):
    case = ALGORITHMS[name]
    net, loss_fn, tasks, algorithm = _setup(case, family, dtype)
    engine = _engine_gradient(case, net, loss_fn, tasks, algorithm, path)
    reference = _reference_gradient(case, net, loss_fn, tasks, _inputs(net, algorithm))
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    assert _relative_error(engine, reference) < tolerance
    if algorithm.learned():  # the learned step sizes get a meta-gradient, and a nonzero one
        assert all(engine[n].abs().sum() > 0 for n in engine if n.startswith("algo:"))


@pytest.mark.parametrize(
    "name, family",
    [(n, f) for n, c in ALGORITHMS.items() if c.make().has_objective for f in c.families],
)
def test_the_reference_gradient_matches_finite_differences(name, family):
    case = ALGORITHMS[name]
    net, loss_fn, tasks, algorithm = _setup(case, family, torch.float64)
    inputs = {n: t.detach() for n, t in _inputs(net, algorithm).items()}
    gradient = _reference_gradient(case, net, loss_fn, tasks, inputs)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        direction = {n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in inputs.items()}
        norm = math.sqrt(sum(float((d**2).sum()) for d in direction.values()))
        direction = {n: d / norm for n, d in direction.items()}

        def objective(shifted):
            return _reference_objective(case, net, loss_fn, tasks, shifted, anchor=inputs).detach()

        fd = directional_derivative(objective, inputs, direction)
        analytic = float(sum((gradient[n] * direction[n]).sum() for n in inputs))
        assert abs(fd - analytic) <= 1e-6 * max(abs(fd), abs(analytic), 1e-8)
