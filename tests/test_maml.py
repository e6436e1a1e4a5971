"""The learn2learn-style MAML wrapper: hand-derived values, references, flags and module kinds."""

import pytest
import torch
import torch.nn.functional as F
from reference import l2l_clone_module, l2l_update_module, unrolled_meta_loss
from tasks import image_tasks, regression_tasks, small_conv_net, tanh_mlp
from test_functional import _hand_derived_single_neuron_meta_gradient, _ones, _single_neuron
from torch import nn

from lightning_maml import MAML, meta_loss


def _wrapper_meta_gradient(net, loss_fn, tasks, lr, steps, first_order=False):
    maml = MAML(net, lr=lr, first_order=first_order)
    sx, sy, qx, qy = tasks
    net.zero_grad()
    for t in range(sx.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(sx[t]), sy[t]))
        (loss_fn(learner(qx[t]), qy[t]) / sx.shape[0]).backward()
    return [p.grad.clone() for p in net.parameters()]


def test_wrapper_single_neuron_meta_gradient_matches_hand_derivation():
    net = _single_neuron()
    maml = MAML(net, lr=1.0)
    x = _ones(1, 1)
    learner = maml.clone()
    learner.adapt(F.binary_cross_entropy_with_logits(learner(x), x))
    F.binary_cross_entropy_with_logits(learner(x), x).backward()
    expected = _hand_derived_single_neuron_meta_gradient()
    assert net.weight.grad.item() == pytest.approx(expected, abs=1e-10)
    assert net.bias.grad.item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("network", ["mlp", "conv", "batchnorm"])
def test_wrapper_equals_engine_and_unrolled_reference(network, first_order):
    if network == "mlp":
        net, loss, tasks = tanh_mlp().double(), F.mse_loss, regression_tasks()
    elif network == "conv":
        net, loss, tasks = small_conv_net().double(), F.cross_entropy, image_tasks()
    else:
        net = nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
        net, loss, tasks = net.double(), F.mse_loss, regression_tasks()
    wrapper = _wrapper_meta_gradient(net, loss, tasks, 0.3, 2, first_order)
    out = meta_loss(
        net,
        loss,
        *tasks,
        inner_lr=0.3,
        inner_steps=2,
        algorithm="fomaml" if first_order else "maml",
    )
    engine = torch.autograd.grad(out.loss, list(net.parameters()))
    for a, b in zip(wrapper, engine):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if network != "batchnorm":
        params = dict(net.named_parameters())
        ref = unrolled_meta_loss(net, params, loss, tasks, 0.3, 2, first_order=first_order)
        for a, b in zip(wrapper, torch.autograd.grad(ref, list(params.values()))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_clone_parameters_yield_the_adapted_tensors():
    net = nn.Linear(2, 1).double()
    maml = MAML(net, lr=0.5)
    learner = maml.clone()
    for a, b in zip(learner.parameters(), net.parameters()):
        assert torch.equal(a, b)
    x, y = torch.randn(4, 2, dtype=torch.double), torch.randn(4, 1, dtype=torch.double)
    loss = F.mse_loss(learner(x), y)
    gw, gb = torch.autograd.grad(loss, [net.weight, net.bias])
    learner.adapt(F.mse_loss(learner(x), y))
    names = [n for n, _ in learner.named_parameters()]
    assert names == ["module.weight", "module.bias"]
    w, b = learner.parameters()
    torch.testing.assert_close(w, net.weight - 0.5 * gw)
    torch.testing.assert_close(b, net.bias - 0.5 * gb)
    # the original module is untouched and the learner's tensors depend on it
    assert w.grad_fn is not None
    assert list(maml.parameters()) == list(net.parameters())


def test_first_order_flag_on_clone_and_adapt_overrides_constructor():
    net = tanh_mlp().double()
    tasks = regression_tasks(n_tasks=1)
    sx, sy, qx, qy = (t[0] for t in tasks)
    grads = {}
    for label, clone_kw, adapt_kw in [
        ("second", {}, {}),
        ("clone_fo", {"first_order": True}, {}),
        ("adapt_fo", {}, {"first_order": True}),
    ]:
        net.zero_grad()
        learner = MAML(net, lr=0.3).clone(**clone_kw)
        learner.adapt(F.mse_loss(learner(sx), sy), **adapt_kw)
        F.mse_loss(learner(qx), qy).backward()
        grads[label] = net[0].weight.grad.clone()
    assert torch.equal(grads["clone_fo"], grads["adapt_fo"])
    assert not torch.allclose(grads["second"], grads["clone_fo"])


def test_frozen_parameter_raises_unless_allow_nograd_and_then_stays_untouched():
    net = tanh_mlp().double()
    net[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 1, dtype=torch.double), torch.randn(5, 1, dtype=torch.double)
    learner = MAML(net, lr=0.1).clone()
    with pytest.raises(ValueError, match=r"\['0.weight'\] do not require grad.*allow_nograd=True"):
        learner.adapt(F.mse_loss(learner(x), y))
    learner = MAML(net, lr=0.1, allow_nograd=True).clone()
    learner.adapt(F.mse_loss(learner(x), y))
    adapted = dict(learner.named_parameters())
    assert torch.equal(adapted["module.0.weight"], net[0].weight)
    assert not adapted["module.0.weight"].requires_grad
    F.mse_loss(learner(x), y).backward()
    assert net[0].weight.grad is None and net[0].bias.grad is not None


def test_unused_parameter_raises_unless_allow_unused():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(1, 1), nn.Linear(1, 1)

        def forward(self, x):
            return self.used(x)

    x, y = torch.randn(5, 1), torch.randn(5, 1)
    learner = MAML(TwoHeads(), lr=0.1).clone()
    with pytest.raises(ValueError, match=r"\['unused.weight', 'unused.bias'\] are not used"):
        learner.adapt(F.mse_loss(learner(x), y))
    learner = MAML(TwoHeads(), lr=0.1, allow_unused=True).clone()
    before = dict(learner.named_parameters())["module.unused.weight"]
    learner.adapt(F.mse_loss(learner(x), y))
    assert dict(learner.named_parameters())["module.unused.weight"] is before
    # allow_unused defaults to allow_nograd, as in learn2learn
    assert MAML(TwoHeads(), lr=0.1, allow_nograd=True).allow_unused


def test_buffers_are_per_clone_and_running_stats_do_not_leak():
    net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
    maml = MAML(net, lr=0.1)
    before = net[1].running_mean.clone()
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(torch.randn(8, 1) + 5), torch.randn(8, 1)))
    assert torch.equal(net[1].running_mean, before)
    assert not torch.equal(learner.module[1].running_mean, before)
    other = maml.clone()
    assert torch.equal(other.module[1].running_mean, before)


def test_shared_submodules_keep_their_tying():
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, nn.Tanh(), shared).double()
    x, y = torch.randn(5, 2, dtype=torch.double), torch.randn(5, 2, dtype=torch.double)
    learner = MAML(net, lr=0.2).clone()
    assert len(list(learner.parameters())) == 2
    learner.adapt(F.mse_loss(learner(x), y))
    w, b = learner.parameters()
    manual = torch.tanh(x @ w.T + b) @ w.T + b
    torch.testing.assert_close(learner(x), manual)


def test_custom_forward_with_keyword_arguments():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    learner = MAML(Scaled(), lr=0.1).clone()
    x = torch.ones(2, 1)
    torch.testing.assert_close(learner(x, scale=2.0), 2 * learner(x))


def test_clone_of_an_adapted_learner_continues_from_it():
    net = nn.Linear(1, 1).double()
    x, y = torch.randn(4, 1, dtype=torch.double), torch.randn(4, 1, dtype=torch.double)
    learner = MAML(net, lr=0.1).clone()
    learner.adapt(F.mse_loss(learner(x), y))
    child = learner.clone()
    for a, b in zip(child.parameters(), learner.parameters()):
        assert torch.equal(a, b) and a is not b
    # still a function of the meta-parameters
    grads = torch.autograd.grad(sum(p.sum() for p in child.parameters()), list(net.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_bad_arguments_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="`lr` must be a finite real number, got nan"):
        MAML(nn.Linear(1, 1), lr=float("nan"))
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        MAML(lambda x: x, lr=0.1)
    learner = MAML(nn.Linear(1, 1), lr=0.1).clone()
    x = torch.ones(3, 1)
    with pytest.raises(ValueError, match=r"`loss` must be a scalar tensor, got \(3, 1\)"):
        learner.adapt((learner(x) - x) ** 2)
    with pytest.raises(RuntimeError, match="adapt\\(\\) updates a learner returned by clone"):
        MAML(nn.Linear(1, 1), lr=0.1).adapt(learner(x).sum())


class FeaturesAndHead(nn.Module):
    """An ANIL-style network whose users call its parts."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.features(x))


def _reference_learner(net, lr, x, y, steps=1):
    clone = l2l_clone_module(net)
    for _ in range(steps):
        loss = F.mse_loss(clone(x), y)
        grads = torch.autograd.grad(loss, list(clone.parameters()), create_graph=True)
        l2l_update_module(clone, lr, list(grads))
    return clone


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(6, d, generator=g, dtype=torch.float64) for d in (2, 1, 2, 1))


def test_submodules_of_an_adapted_clone_are_adapted_as_in_learn2learn():
    net = FeaturesAndHead().double()
    x, y, qx, qy = _data()
    learner = MAML(net, lr=0.3).clone()
    for _ in range(2):
        learner.adapt(F.mse_loss(learner(x), y))
    reference = _reference_learner(net, 0.3, x, y, steps=2)
    torch.testing.assert_close(learner.module.features(qx), reference.features(qx))
    torch.testing.assert_close(learner.module.head.weight, reference.head.weight)
    assert not torch.equal(learner.module.head.weight, net.head.weight)
    # a meta-gradient through the parts (ANIL-style code) equals the reference's
    results = []
    for model in (learner.module, reference):
        net.zero_grad()
        F.mse_loss(model.head(model.features(qx)), qy).backward(retain_graph=True)
        results.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(g.abs().sum() > 0 for g in results[0])


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_state_dict_to_and_train_eval_act_on_the_clone_as_in_learn2learn():
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    x, y, _, _ = _data()
    learner = MAML(net, lr=0.3).clone()
    learner.adapt(F.mse_loss(learner(x), y))
    reference = _reference_learner(net, 0.3, x, y)
    got, want = learner.module.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() == net.state_dict().keys()
    for k in ("0.weight", "2.bias"):
        torch.testing.assert_close(got[k], want[k])
        assert not torch.equal(got[k], net.state_dict()[k])
    learner.eval()
    assert not learner.module[1].training and net[1].training
    learner.to(torch.float32)
    assert learner.module[0].weight.dtype == torch.float32 and net[0].weight.dtype == torch.float64


def test_a_clone_is_a_snapshot_of_the_parameters_at_clone_time():
    net = FeaturesAndHead().double()
    x, y, qx, qy = _data()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    before = [p.detach().clone() for p in net.parameters()]
    learner = MAML(net, lr=0.3).clone()
    reference = l2l_clone_module(net)
    net(qx).sum().backward()
    optimizer.step()  # the originals move; the clones stay as they were
    optimizer.zero_grad()
    for a, b, r in zip(learner.parameters(), before, reference.parameters()):
        assert torch.equal(a, b) and torch.equal(r, b)
    learner.adapt(F.mse_loss(learner(x), y))
    F.mse_loss(learner(qx), qy).backward()  # no in-place modification error
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    grads = torch.autograd.grad(
        F.mse_loss(reference(x), y), list(reference.parameters()), create_graph=True
    )
    l2l_update_module(reference, 0.3, list(grads))
    F.mse_loss(reference(qx), qy).backward()
    for a, b in zip(got, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_forward_hooks_see_the_adapted_network():
    net = FeaturesAndHead().double()
    seen = []
    net.head.register_forward_hook(lambda module, args, output: seen.append(module.weight))
    x, y, _, _ = _data()
    learner = MAML(net, lr=0.3).clone()
    learner.adapt(F.mse_loss(learner(x), y))
    seen.clear()
    learner(x)
    assert len(seen) == 1 and seen[0] is learner.module.head.weight
    learner.module.head.register_forward_hook(lambda *args: seen.append("clone only"))
    net(x)
    assert "clone only" not in seen


def test_a_clone_made_under_no_grad_is_refused_with_advice_that_works():
    maml, x = MAML(nn.Linear(2, 1), lr=0.1), torch.randn(4, 2)
    with torch.no_grad():
        learner = maml.clone()
    for allow_nograd in (False, True):  # the advice is not allow_nograd, which cannot help
        with pytest.raises(ValueError, match="cloned under torch.no_grad.*Call clone\\(\\) and"):
            learner.adapt(learner(x).pow(2).mean(), allow_nograd=allow_nograd)
    learner = maml.clone()  # following the advice
    with torch.no_grad():
        loss = learner(x).pow(2).mean()
    with pytest.raises(ValueError, match="`loss` does not require grad"):
        learner.adapt(loss)
    learner.adapt(learner(x).pow(2).mean())
    learner(x).pow(2).mean().backward()
    assert maml.module.weight.grad is not None
