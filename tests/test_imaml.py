"""Implicit MAML: its meta-gradient against the unrolled regularised problem and the exact
minimiser, its settings, and what the engine's paths around it do."""

import pytest
import torch
import torch.nn.functional as F
from reference import (
    implicit_meta_gradient,
    regularised_newton,
    unrolled_regularised_meta_gradient,
)
from tasks import regression_tasks, tanh_mlp

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
