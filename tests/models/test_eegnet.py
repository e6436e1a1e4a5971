"""EEGNet: output shape and parameter count from the paper's formula; second-order MAML on it."""

import warnings

import pytest
import torch
from reference import finite_difference_gradient, max_abs_difference
from torch import nn

from lightning_maml.functional import meta_loss
from lightning_maml.models import EEGNet
from lightning_maml.models.eegnet import SameLengthConv2d


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
