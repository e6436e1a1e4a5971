"""Implicit MAML: its meta-gradient against the unrolled regularised problem and the exact
minimiser, its settings, and what the engine's paths around it do."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from reference import (
    implicit_meta_gradient,
    loss_hessian,
    regularised_gradient_descent,
    regularised_newton,
    unrolled_regularised_meta_gradient,
)
from tasks import quiet_trainer, regression_tasks, tanh_mlp
from torch.utils.data import DataLoader

from lightning_maml import Episode, MAMLModule
from lightning_maml.datamodules.sinusoid import TaskSet
from lightning_maml.functional import IMAML, meta_loss

LAM, LR = 4.0, 0.1


def _engine_gradient(net, tasks, steps, **kwargs):
    net.zero_grad()
    algorithm = IMAML(lam=LAM, cg_steps=60, cg_tol=1e-14, **kwargs)
    meta_loss(
        net, "mse", *tasks, inner_lr=LR, inner_steps=steps, algorithm=algorithm
    ).loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _relative(a, b):
    flat_a = torch.cat([a[n].flatten() for n in b])
    flat_b = torch.cat([b[n].flatten() for n in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def test_the_implicit_gradient_approaches_unrolled_maml_on_the_regularised_problem():
    torch.manual_seed(0)
    net = tanh_mlp().double()
    tasks = regression_tasks(n_tasks=2)
    params = dict(net.named_parameters())
    gaps = []
    for steps in (2, 10, 60):
        implicit = _engine_gradient(net, tasks, steps)
        unrolled = unrolled_regularised_meta_gradient(
            net, params, F.mse_loss, tasks, LAM, LR, steps
        )
        gaps.append(_relative(implicit, unrolled))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6, gaps


def test_with_enough_inner_steps_it_is_the_gradient_at_the_exact_minimiser():
    torch.manual_seed(0)
    net = tanh_mlp().double()
    tasks = regression_tasks(n_tasks=2)
    exact, _ = implicit_meta_gradient(
        net,
        dict(net.named_parameters()),
        F.mse_loss,
        tasks,
        LAM,
        regularised_newton(net, F.mse_loss, LAM),
    )
    assert _relative(_engine_gradient(net, tasks, 80), exact) < 1e-8


def test_no_conjugate_gradient_steps_or_first_order_is_the_query_gradient_at_the_solution():
    torch.manual_seed(0)
    net = tanh_mlp().double()
    tasks = regression_tasks(n_tasks=2)
    first = _engine_gradient(net, tasks, 5, first_order=True)
    net.zero_grad()
    meta_loss(
        net, "mse", *tasks, inner_lr=LR, inner_steps=5, algorithm=IMAML(lam=LAM, cg_steps=0)
    ).loss.backward()
    assert _relative({n: p.grad for n, p in net.named_parameters()}, first) < 1e-12
    assert _relative(first, _engine_gradient(net, tasks, 5)) > 1e-3  # the solve matters


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": 0}, "`lam` must be"),
        ({"lam": -1.0}, "`lam` must be"),
        ({"cg_steps": -1}, "`cg_steps` must be an integer >= 0"),
        ({"cg_tol": -1e-3}, "`cg_tol` must be a number >= 0, got -0.001"),
    ],
)
def test_bad_settings_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IMAML(**kwargs)


# ---- where the regularised problem is not convex: no implicit gradient, NaN, and a message ----

NONCONVEX_LAM, NONCONVEX_LR, NONCONVEX_STEPS = 2.0, 0.2, 2


def _min_eigenvalue_of_the_system(net, task, lam, lr, steps):
    """The smallest eigenvalue of ``I + H/lam`` at the task's ``phi`` (explicit Hessian, written
    without the engine): positive where the implicit gradient exists."""
    theta = {n: p.detach() for n, p in net.named_parameters()}
    phi = regularised_gradient_descent(net, F.mse_loss, lam, lr, steps)(theta, {}, *task[:2])
    hessian = loss_hessian(net, phi, F.mse_loss, *task[:2])
    eye = torch.eye(len(hessian), dtype=hessian.dtype)
    return float(torch.linalg.eigvalsh(eye + hessian / lam)[0])


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_a_task_whose_regularised_problem_is_not_convex_gets_nan_and_the_others_their_gradient(
    vectorize,
):
    torch.manual_seed(0)
    net = tanh_mlp().double()
    tasks = regression_tasks()  # 3 tasks; at lam = 2 the first one's I + H/lam is indefinite
    convex = [
        _min_eigenvalue_of_the_system(
            net, [t[i] for t in tasks], NONCONVEX_LAM, NONCONVEX_LR, NONCONVEX_STEPS
        )
        > 0
        for i in range(3)
    ]
    assert convex == [False, True, True]
    for i, expected in enumerate(convex):
        one = tuple(t[i : i + 1] for t in tasks)
        net.zero_grad()
        out = meta_loss(
            net, "mse", *one, inner_lr=NONCONVEX_LR, inner_steps=NONCONVEX_STEPS,
            algorithm=IMAML(lam=NONCONVEX_LAM, cg_steps=40, cg_tol=1e-14), vectorize=vectorize,
        )  # fmt: skip
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        assert finite == expected, (i, expected)
        assert bool(torch.isfinite(out.query_losses).all())  # the query loss itself is defined
        if expected:  # the exact solve with the explicit Hessian
            exact, _ = implicit_meta_gradient(
                net, dict(net.named_parameters()), F.mse_loss, one, NONCONVEX_LAM,
                regularised_gradient_descent(net, F.mse_loss, NONCONVEX_LAM, NONCONVEX_LR,
                                             NONCONVEX_STEPS),
            )  # fmt: skip
            assert _relative(grads, exact) < 1e-8


def test_a_module_training_where_the_implicit_gradient_does_not_exist_stops_saying_why():
    pl.seed_everything(0)
    torch.manual_seed(0)
    net = tanh_mlp().double()
    loader = DataLoader(TaskSet(Episode(*regression_tasks())), batch_size=3)
    module = MAMLModule(
        net, inner_lr=NONCONVEX_LR, inner_steps=NONCONVEX_STEPS,
        algorithm=IMAML(lam=NONCONVEX_LAM, cg_steps=40), vectorize="loop",
    )  # fmt: skip
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match="not convex") as info:
        quiet_trainer(max_epochs=1, limit_val_batches=0).fit(module, loader)
    assert "larger lam" in str(info.value)
    for p, q in zip(net.parameters(), before):  # nothing applied
        assert torch.equal(p.detach(), q)
    # the same network and tasks at a lam that keeps them convex train
    torch.manual_seed(0)
    module = MAMLModule(
        tanh_mlp().double(), inner_lr=NONCONVEX_LR, inner_steps=NONCONVEX_STEPS,
        algorithm=IMAML(lam=8.0, cg_steps=40), vectorize="loop",
    )  # fmt: skip
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(module, loader)
    assert module.nonfinite_steps == 0


def test_the_indefiniteness_guard_fires_exactly_when_cg_explores_a_negative_direction():
    # H with one eigenvalue below -lam: I + H/lam has eigenvalues 1.5, 2, ..., and -0.5 on the
    # last coordinate, which the right-hand side barely reaches
    lam = 2.0
    eigenvalues = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -3.0], dtype=torch.float64)
    hessian = torch.diag(eigenvalues)
    gradient = lambda phi: {"w": hessian @ phi["w"]}  # noqa: E731
    phi = {"w": torch.zeros(7, dtype=torch.float64)}
    rhs = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-3], dtype=torch.float64)}
    few = IMAML(lam=lam, cg_steps=3, cg_tol=0.0)._solve(gradient, phi, rhs)["w"]
    assert torch.isfinite(few).all()  # 3 steps stay where I + H/lam is positive definite
    enough = IMAML(lam=lam, cg_steps=7, cg_tol=0.0)._solve(gradient, phi, rhs)["w"]
    assert torch.isnan(enough).all()  # as many steps as parameters: the negative direction
    convex = IMAML(lam=4.0, cg_steps=7, cg_tol=0.0)._solve(gradient, phi, rhs)["w"]
    expected = torch.linalg.solve(torch.eye(7, dtype=torch.float64) + hessian / 4.0, rhs["w"])
    torch.testing.assert_close(convex, expected)  # lam above |-3|: the gradient exists
