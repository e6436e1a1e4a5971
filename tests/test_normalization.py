"""Exact normalisation: forward values equal torch's, and second-order meta-gradients through every
normalisation layer equal an independent per-task unroll and float64 finite differences on every
execution path (vmap, loop, checkpointed, compiled), running statistics untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import unrolled_meta_loss
from tasks import image_tasks, regression_tasks
from torch import nn

from lightning_maml.functional import meta_loss
from lightning_maml.models import EEGNet
from lightning_maml.normalization import (
    batch_norm,
    exact_normalization,
    group_norm,
    instance_norm,
    layer_norm,
)


class FunctionalLayerNorm(nn.Module):
    """A layer that calls ``F.layer_norm`` itself: no module list can know about it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, width))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias)


def _regression_net(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(1, 6), norm, nn.Tanh(), nn.Linear(6, 1))


def _image_net(norm: nn.Module, channels: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3),
        norm,
        nn.ELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 2 * 2, 3),
    )


def _eegnet_tasks():
    g = torch.Generator().manual_seed(3)
    sx = torch.randn(3, 4, 3, 32, generator=g, dtype=torch.float64)
    qx = torch.randn(3, 6, 3, 32, generator=g, dtype=torch.float64)
    sy = torch.tensor([[0, 1, 0, 1]] * 3)
    qy = torch.tensor([[0, 1, 1, 0, 1, 0]] * 3)
    return sx, sy, qx, qy


# name -> (network, loss, tasks)
NETWORKS = {
    "batchnorm": lambda: (_regression_net(nn.BatchNorm1d(6)), "mse", regression_tasks()),
    "batchnorm_no_affine": lambda: (
        _regression_net(nn.BatchNorm1d(6, affine=False)),
        "mse",
        regression_tasks(),
    ),
    "layernorm": lambda: (_regression_net(nn.LayerNorm(6)), "mse", regression_tasks()),
    "functional_layer_norm": lambda: (
        _regression_net(FunctionalLayerNorm(6)),
        "mse",
        regression_tasks(),
    ),
    "instancenorm": lambda: (
        _image_net(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
        "cross_entropy",
        image_tasks(),
    ),
    "groupnorm": lambda: (_image_net(nn.GroupNorm(2, 4)), "cross_entropy", image_tasks()),
    "eegnet": lambda: (
        EEGNet(3, 32, 2, sampling_rate=16, f1=2, depth=1, dropout=0.0),
        "cross_entropy",
        _eegnet_tasks(),
    ),
}
PATHS = {
    "vmap": {"vectorize": "vmap"},
    "auto": {},
    "loop": {"vectorize": "loop"},
    "checkpoint": {"checkpoint_inner_steps": True},
}


def _make(name):
    net, loss, tasks = NETWORKS[name]()
    net = net.double().train()
    for module in net.modules():  # running statistics that would show if they were used
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.fill_(3.0)
            module.running_var.fill_(5.0)
    return net, loss, tasks


def _reference_net(net: nn.Module) -> nn.Module:
    """A copy whose BatchNorm/InstanceNorm layers keep no running statistics: torch's own layers
    then normalise each call with its batch's statistics, the meta-loss convention."""
    ref = copy.deepcopy(net)
    for module in ref.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.track_running_stats = False
            module.running_mean = module.running_var = None
    return ref


def _loss_fn(loss):
    return F.mse_loss if loss == "mse" else F.cross_entropy


def _engine_gradient(net, loss, tasks, **kwargs):
    net.zero_grad()
    out = meta_loss(net, loss, *tasks, inner_lr=0.3, inner_steps=2, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in net.named_parameters()}


def _directional_finite_differences(fn, params, directions, eps=1e-6):
    values = []
    for v in directions:
        plus = {n: p + eps * v[n] for n, p in params.items()}
        minus = {n: p - eps * v[n] for n, p in params.items()}
        values.append(((fn(plus) - fn(minus)) / (2 * eps)).item())
    return values


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(NETWORKS))
def test_second_order_meta_gradient_through_normalization(name, path):
    net, loss, tasks = _make(name)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    out, grads = _engine_gradient(net, loss, tasks, **PATHS[path])
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules())
    assert out.vectorized == (path == "vmap" or (path == "auto" and not convolutional))
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), f"{n} changed"

    ref = _reference_net(net)
    params = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}

    def objective(p):
        return unrolled_meta_loss(ref, p, _loss_fn(loss), tasks, lr=0.3, steps=2)

    expected = torch.autograd.grad(objective(params), list(params.values()))
    scale = max(g.abs().max().item() for g in expected)
    for (n, got), want in zip(grads.items(), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * scale, msg=n)
    g = torch.Generator().manual_seed(7)
    directions = [
        {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        for _ in range(2)
    ]
    numeric = _directional_finite_differences(objective, params, directions)
    for v, fd in zip(directions, numeric):
        analytic = sum((grads[n] * v[n]).sum() for n in grads).item()
        assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("name", ["batchnorm", "functional_layer_norm"])
def test_compiled_meta_gradient_through_normalization_equals_eager(name):
    net, loss, tasks = _make(name)
    buffers = [b.clone() for b in net.buffers()]
    eager, eager_grads = _engine_gradient(net, loss, tasks)
    compiled, compiled_grads = _engine_gradient(net, loss, tasks, compile=True)
    assert compiled.vectorized and eager.vectorized
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-10, atol=1e-12)
    for a, b in zip(net.buffers(), buffers):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_exact_functions_equal_torch_forward(training):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, 6, generator=g, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    pairs = [
        (
            batch_norm(x, rm, rv, w, b, training),
            F.batch_norm(x, rm.clone(), rv.clone(), w, b, training),
        ),
        (batch_norm(x, None, None), F.batch_norm(x, None, None, training=True)),
        (
            instance_norm(x, rm, rv, w, b, use_input_stats=training),
            F.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats=training),
        ),
        (layer_norm(x, [3, 6]), F.layer_norm(x, [3, 6])),
        (layer_norm(x, 6, torch.full((6,), 2.0, dtype=torch.float64)), 2 * F.layer_norm(x, [6])),
        (group_norm(x, 2, w, b), F.group_norm(x, 2, w, b)),
        (group_norm(x, 4), F.group_norm(x, 4)),
    ]
    for i, (got, want) in enumerate(pairs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"pair {i}")


def test_the_mode_routes_module_functional_and_torch_forms_and_leaves_running_stats():
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(torch._C._is_torch_function_mode_enabled())
            return x

    net = nn.Sequential(
        nn.BatchNorm1d(4), nn.LayerNorm(4), FunctionalLayerNorm(4), nn.GroupNorm(2, 4), Spy()
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    bn = net[0]  # in training mode; its module code counts batches, the kernel updates the stats
    before = (bn.running_mean.clone(), bn.running_var.clone())
    for vectorized in (True, False):
        with exact_normalization(vectorized):
            y = net(x)
            z = torch.layer_norm(x, [4], None, None, 1e-5, True)
        torch.testing.assert_close(z, F.layer_norm(x, [4]))
        assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
        expected = net[3](net[2](net[1](F.batch_norm(x, None, None, training=True))))
        torch.testing.assert_close(y, expected)
    assert calls == [True, True]
    net(x)  # outside the block torch updates them as usual
    assert not torch.equal(bn.running_mean, before[0])


def test_batch_norm_refuses_one_value_per_channel_like_torch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), None, None, training=True)
