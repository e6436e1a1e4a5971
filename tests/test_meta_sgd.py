"""lightning_maml.MetaSGD: learn2learn's MetaSGD interface, checked against a plain autograd loop
and against the engine's Meta-SGD."""

import pytest
import torch
from reference import family_task_objectives, max_abs_difference
from tasks import regression_tasks, tanh_mlp
from torch import nn

from lightning_maml import MetaSGD
from lightning_maml.functional import MetaSGD as MetaSGDAlgorithm
from lightning_maml.functional import meta_loss, mse_loss

STEPS = 2


def _wrapper_gradients(first_order: bool):
    torch.manual_seed(0)
    meta = MetaSGD(tanh_mlp().double(), lr=0.3, first_order=first_order)
    with torch.no_grad():  # step sizes of their own
        for i, t in enumerate(meta.lrs):
            t.mul_(1 + 0.1 * i)
    tasks = regression_tasks()
    total = 0
    for t in range(tasks[0].shape[0]):
        learner = meta.clone()
        for _ in range(STEPS):
            learner.adapt(mse_loss(learner(tasks[0][t]), tasks[1][t]))
        total = total + mse_loss(learner(tasks[2][t]), tasks[3][t])
    (total / tasks[0].shape[0]).backward()
    grads = {n: p.grad for n, p in meta.module.named_parameters()}
    grads.update({f"lrs.{i}": t.grad for i, t in enumerate(meta.lrs)})
    return meta, tasks, grads


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_the_reference_loop(first_order):
    meta, tasks, grads = _wrapper_gradients(first_order)
    params = {n: p.detach().requires_grad_() for n, p in meta.module.named_parameters()}
    lrs = {n: t.detach().requires_grad_() for n, t in zip(params, meta.lrs)}
    objectives, _ = family_task_objectives(
        meta.module, params, mse_loss, tasks, STEPS, lambda n, k: lrs[n], first_order=first_order
    )
    leaves = [*params.values(), *lrs.values()]
    reference = torch.autograd.grad(torch.stack(objectives).mean(), leaves)
    names = [*params, *(f"lrs.{i}" for i in range(len(lrs)))]
    assert max_abs_difference(grads, dict(zip(names, reference))) < 1e-12


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_the_engine_metasgd(first_order):
    meta, tasks, grads = _wrapper_gradients(first_order)
    net = meta.module
    for p in net.parameters():
        p.grad = None
    algorithm = MetaSGDAlgorithm(first_order=first_order).double()
    algorithm.bind(dict(net.named_parameters()), 0.3, STEPS)
    with torch.no_grad():
        for mine, theirs in zip(algorithm.lrs, meta.lrs):
            mine.copy_(theirs)
    meta_loss(
        net, "mse", *tasks, inner_lr=0.3, inner_steps=STEPS, algorithm=algorithm
    ).loss.backward()
    engine = {n: p.grad for n, p in net.named_parameters()}
    engine.update({f"lrs.{i}": t.grad for i, t in enumerate(algorithm.lrs)})
    assert max_abs_difference(grads, engine) < 1e-12


def test_first_order_still_learns_the_step_sizes():
    _, _, grads = _wrapper_gradients(first_order=True)
    assert all(grads[f"lrs.{i}"].abs().sum() > 0 for i in range(6))


def test_step_sizes_must_match_the_parameters():
    with pytest.raises(ValueError, match="`lrs` must hold one tensor per parameter"):
        MetaSGD(nn.Linear(2, 1), lrs=[torch.ones(1, 2)])
    with pytest.raises(ValueError, match="`lr` must be a finite real number"):
        MetaSGD(nn.Linear(2, 1), lr=float("nan"))
