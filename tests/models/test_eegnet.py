"""EEGNet: output shape and parameter count from the paper's formula; second-order MAML on it."""

import warnings

import pytest
import torch
from reference import finite_difference_gradient, max_abs_difference
from torch import nn

from lightning_maml.functional import meta_loss
from lightning_maml.models import EEGNet
from lightning_maml.models.eegnet import SameLengthConv2d, fft_correlate, window_moments


def test_output_shape_and_parameter_count_match_the_paper_formula():
    channels, rate, samples, classes, f1, d, f2 = 22, 250, 500, 4, 8, 2, 16
    net = EEGNet(channels, samples, classes, sampling_rate=rate)
    assert net(torch.randn(3, channels, samples)).shape == (3, classes)
    kernel = rate // 2
    expected = (
        f1 * kernel
        + 2 * f1  # temporal conv (no bias) + BatchNorm
        + f1 * d * channels
        + 2 * f1 * d  # depthwise spatial conv + BatchNorm
        + f1 * d * 16
        + f1 * d * f2
        + 2 * f2  # separable: depthwise 1x16, pointwise, BatchNorm
        + f2 * (samples // 32) * classes
        + classes  # dense
    )
    assert sum(p.numel() for p in net.parameters()) == expected == 2908


def test_max_norm_constraints_hold_for_any_weights():
    net = EEGNet(4, 64, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(100)
    spatial = net.spatial[0]
    effective = spatial.weight * (1.0 / spatial.weight.flatten(1).norm(dim=1).clamp(min=1.0)).view(
        -1, 1, 1, 1
    )
    assert effective.flatten(1).norm(dim=1).max() <= 1.0 + 1e-6


def test_second_order_maml_on_eegnet_matches_finite_differences():
    net = EEGNet(3, 32, 2, sampling_rate=8, f1=2, depth=1, dropout=0.0).double()
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(2, 4, 3, 32, generator=g, dtype=torch.float64)
    qx = torch.randn(2, 4, 3, 32, generator=g, dtype=torch.float64)
    sy = qy = torch.tensor([[0, 1, 0, 1]] * 2)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    out = meta_loss(
        net,
        "cross_entropy",
        sx,
        sy,
        qx,
        qy,
        inner_lr=0.5,
        inner_steps=2,
        params=params,
        vectorize="vmap",
    )
    assert out.vectorized  # BatchNorm under vmap, with exact normalisation
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))

    def objective(p):
        with torch.enable_grad():
            return meta_loss(
                net, "cross_entropy", sx, sy, qx, qy, inner_lr=0.5, inner_steps=2, params=p
            ).loss

    assert max_abs_difference(grads, finite_difference_gradient(objective, params)) < 1e-7


@pytest.mark.parametrize("kernel", [64, 16, 125, 1])
def test_same_length_convolution_is_torch_same_padding_without_its_warning(kernel):
    reference = nn.Conv2d(4, 4, (1, kernel), padding="same", groups=4, bias=False).double()
    conv = SameLengthConv2d(4, 4, kernel, groups=4, bias=False).double()
    conv.load_state_dict(reference.state_dict())
    x = torch.randn(3, 4, 5, 200, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = conv(x)
    with warnings.catch_warnings():  # torch's own padding="same" warns on even kernels
        warnings.simplefilter("ignore")
        expected = reference(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_eegnet_forward_warns_nothing():
    net = EEGNet(22, 256, 4, sampling_rate=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(2, 22, 256))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="`n_samples` must be >= 32"):
        EEGNet(22, 16, 4)
    with pytest.raises(ValueError, match="`dropout` must be in"):
        EEGNet(22, 64, 4, dropout=1.0)


def _pair(**kwargs):
    """A fused EEGNet and the same network computed layer by layer, in float64."""
    torch.manual_seed(0)
    kwargs = {"dropout": 0.0, **kwargs}
    fused = EEGNet(**kwargs, fused=True).double()
    with torch.no_grad():  # away from the initial values, so every parameter matters
        for p in fused.parameters():
            p.add_(0.3 * torch.randn_like(p))
    plain = EEGNet(**kwargs, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


SHAPES = [  # no dropout: both networks must see the same function
    dict(n_channels=22, n_samples=256, n_classes=4, sampling_rate=128),
    dict(n_channels=3, n_samples=37, n_classes=2, sampling_rate=16, f1=2, depth=3, f2=5),
    dict(n_channels=5, n_samples=32, n_classes=3, sampling_rate=130),  # kernel 65 > samples
    dict(n_channels=4, n_samples=40, n_classes=2, sampling_rate=2),  # kernel 1
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['n_channels']}x{s['n_samples']}")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_fused_network_computes_the_layered_function_and_running_statistics(shape, momentum):
    fused, plain = _pair(**shape)
    for net in (fused, plain):
        net.temporal[1].momentum = momentum
    x = torch.randn(6, shape["n_channels"], shape["n_samples"], dtype=torch.float64) + 0.2
    for _ in range(2):  # training: batch statistics, running statistics updated
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-10, atol=1e-12)
    for name, buffer in plain.temporal[1].named_buffers():
        torch.testing.assert_close(getattr(fused.temporal[1], name), buffer, rtol=1e-10, atol=0)
    fused.eval(), plain.eval()  # the running statistics
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-10, atol=1e-12)
    grads = [
        torch.autograd.grad(net(x).square().sum(), list(net.parameters())) for net in (fused, plain)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_second_order_maml_on_the_fused_network_equals_the_layered_one(vectorize):
    fused, plain = _pair(n_channels=5, n_samples=48, n_classes=3, sampling_rate=20)
    g = torch.Generator().manual_seed(1)
    sx, qx = (torch.randn(3, 6, 5, 48, generator=g, dtype=torch.float64) for _ in range(2))
    sy = qy = torch.tensor([[0, 1, 2, 0, 1, 2]] * 3)
    grads = []
    for net in (fused, plain):
        out = meta_loss(
            net, "cross_entropy", sx, sy, qx, qy, inner_lr=0.3, inner_steps=2, vectorize=vectorize
        )
        grads.append(torch.autograd.grad(out.loss, list(net.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("pads", [(31, 32), (3, 4), (0, 0), (0, 7), (7, 0), (20, 21)])
@pytest.mark.parametrize("length", [8, 50])
def test_window_moments_equal_the_windows_statistics(pads, length):
    x = torch.randn(3, 4, length, dtype=torch.float64) + 0.5
    mean, cov = window_moments(x, *pads)
    windows = torch.nn.functional.pad(x.reshape(-1, length), pads).unfold(1, length, 1)
    windows = windows.transpose(0, 1).reshape(sum(pads) + 1, -1)  # [K, rows * length]
    torch.testing.assert_close(mean, windows.mean(1), rtol=0, atol=1e-13)
    torch.testing.assert_close(
        cov, torch.cov(windows, correction=0).reshape(cov.shape), rtol=0, atol=1e-12
    )


def test_fft_correlation_equals_a_depthwise_convolution():
    u, w = torch.randn(2, 3, 70, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)
    direct = torch.nn.functional.conv1d(u, w[:, None], groups=3)
    torch.testing.assert_close(fft_correlate(u, w, 60), direct, rtol=0, atol=1e-12)


def test_the_fused_network_runs_under_bfloat16_autocast():
    net = EEGNet(6, 64, 2, sampling_rate=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(4, 6, 64))
    assert out.shape == (4, 2) and torch.isfinite(out).all()


def test_input_with_other_channels_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"n_channels=22, got input of shape \(2, 21, 256\)"):
        EEGNet(22, 256, 4)(torch.randn(2, 21, 256))


def test_the_dense_layer_can_be_a_plain_linear_layer():
    net = EEGNet(4, 64, 3, dense_max_norm=None)
    assert type(net.classifier) is nn.Linear and net(torch.randn(2, 4, 64)).shape == (2, 3)
    assert net.init_args["dense_max_norm"] is None
    with pytest.raises(ValueError, match="`dense_max_norm` must be > 0 or None, got 0"):
        EEGNet(4, 64, 3, dense_max_norm=0)


def test_a_trial_of_another_length_is_refused_naming_n_samples_and_the_sampling_rate():
    net = EEGNet(4, 64, 2, sampling_rate=32)
    for samples in (95, 65, 63, 40):  # longer ones used to pass silently, shorter ones crash
        with pytest.raises(ValueError, match=rf"n_samples=64 \(2 s at sampling_rate=32 Hz\), "
                           rf"got {samples} samples"):  # fmt: skip
            net(torch.randn(2, 4, samples))
