"""The meta-gradient engine vs hand-derived values, finite differences and unrolled autograd."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import finite_difference_gradient, max_abs_difference, unrolled_meta_loss
from tasks import image_tasks, regression_tasks, small_conv_net, tanh_mlp
from torch import nn
from torch.func import functional_call

from lightning_maml.functional import (
    adapt_parameters,
    check_compile,
    execution,
    meta_loss,
    mse_loss,
    sgd_step,
)
from lightning_maml.functional.execution import executor_of


def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


def _hand_derived_single_neuron_meta_gradient():
    # w=1, b=-4, x=1, y=1, inner lr 1, one step: z = w + b, z' = z - 2(sigma(z) - 1)
    z = -3.0
    z_adapted = z - 2 * (_sigmoid(z) - 1)
    return (_sigmoid(z_adapted) - 1) * (1 - 2 * _sigmoid(z) * (1 - _sigmoid(z)))


def _single_neuron():
    net = nn.Linear(1, 1).double()
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(-4.0)
    return net


def _ones(*shape):
    return torch.ones(*shape, dtype=torch.float64)


def test_hand_derived_value_is_the_documented_constant():
    assert _hand_derived_single_neuron_meta_gradient() == pytest.approx(-0.6816, abs=1e-4)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_engine_single_neuron_meta_gradient_matches_hand_derivation(vectorize):
    net = _single_neuron()
    x = _ones(1, 1, 1)
    out = meta_loss(
        net,
        F.binary_cross_entropy_with_logits,
        x,
        x,
        x,
        x,
        inner_lr=1.0,
        inner_steps=1,
        vectorize=vectorize,
    )
    out.loss.backward()
    expected = _hand_derived_single_neuron_meta_gradient()
    assert net.weight.grad.item() == pytest.approx(expected, abs=1e-10)
    assert net.bias.grad.item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_second_order_meta_gradient_matches_float64_finite_differences(network, steps):
    if network == "mlp":
        net, loss, tasks, lr = tanh_mlp().double(), mse_loss, regression_tasks(), 0.1
    else:
        net, loss, tasks, lr = small_conv_net().double(), F.cross_entropy, image_tasks(), 0.5
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    out = meta_loss(net, loss, *tasks, inner_lr=lr, inner_steps=steps, params=params)
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))

    def objective(p):
        with torch.enable_grad():
            return meta_loss(net, loss, *tasks, inner_lr=lr, inner_steps=steps, params=p).loss

    numeric = finite_difference_gradient(objective, params)
    scale = max(v.abs().max().item() for v in numeric.values())
    assert max_abs_difference(grads, numeric) < 1e-7 * max(scale, 1.0)
    # and the second-order terms matter here: the first-order gradient is measurably different
    first = meta_loss(
        net, loss, *tasks, inner_lr=lr, inner_steps=steps, params=params, algorithm="fomaml"
    )
    first_grads = dict(zip(params, torch.autograd.grad(first.loss, list(params.values()))))
    assert max_abs_difference(first_grads, numeric) > 1e-4 * scale


def test_compiled_meta_gradient_matches_float64_finite_differences():
    net, tasks = tanh_mlp().double(), regression_tasks()
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    out = meta_loss(net, "mse", *tasks, inner_lr=0.1, inner_steps=2, params=params, compile=True)
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))

    def objective(p):
        with torch.enable_grad():
            return meta_loss(net, "mse", *tasks, inner_lr=0.1, inner_steps=2, params=p).loss

    numeric = finite_difference_gradient(objective, params)
    scale = max(v.abs().max().item() for v in numeric.values())
    assert max_abs_difference(grads, numeric) < 1e-7 * max(scale, 1.0)
    assert out.loss.item() == pytest.approx(objective(params).item(), abs=1e-12)


@pytest.mark.parametrize(
    "network, algorithm, mode",
    [
        ("mlp", "fomaml", True),
        ("mlp", "reptile", True),
        ("batchnorm", "maml", True),
        ("mlp", "maml", "reduce-overhead"),  # outputs copied out of CUDA-graph memory
    ],
)
def test_compiled_meta_loss_equals_eager(network, algorithm, mode):
    if network == "mlp":
        net = tanh_mlp().double()
    else:  # second order through BatchNorm: vmapped with exact normalisation, compiled
        net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        net = net.double()
    tasks = regression_tasks()
    buffers = [b.clone() for b in net.buffers()]
    results = []
    for compile in (False, mode):
        net.zero_grad()
        out = meta_loss(
            net, "mse", *tasks, inner_lr=0.1, inner_steps=2, algorithm=algorithm, compile=compile
        )
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in net.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert compiled.vectorized and eager.vectorized
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in ("query_losses", "query_predictions", "initial_query_losses"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name))
    for a, b in zip(net.buffers(), buffers):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [1, 3])
def test_engine_equals_unrolled_autograd_reference(steps):
    net = small_conv_net().double()
    tasks = image_tasks()
    params = dict(net.named_parameters())
    engine = meta_loss(net, F.cross_entropy, *tasks, inner_lr=0.4, inner_steps=steps).loss
    reference = unrolled_meta_loss(net, params, F.cross_entropy, tasks, 0.4, steps)
    g_engine = torch.autograd.grad(engine, list(params.values()))
    g_reference = torch.autograd.grad(reference, list(params.values()))
    assert engine.item() == pytest.approx(reference.item(), abs=1e-12)
    for a, b in zip(g_engine, g_reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_first_order_equals_query_gradient_at_adapted_parameters(vectorize):
    net = tanh_mlp().double()
    sx, sy, qx, qy = regression_tasks()
    params = dict(net.named_parameters())
    out = meta_loss(
        net,
        mse_loss,
        sx,
        sy,
        qx,
        qy,
        inner_lr=0.2,
        inner_steps=3,
        algorithm="fomaml",
        vectorize=vectorize,
    )
    got = torch.autograd.grad(out.loss, list(params.values()))
    # reference: adapt each task without any graph, then the plain query gradient there, averaged
    expected = [torch.zeros_like(p) for p in params.values()]
    for t in range(sx.shape[0]):
        fast = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        for _ in range(3):
            g = torch.autograd.grad(
                mse_loss(functional_call(net, fast, (sx[t],)), sy[t]), list(fast.values())
            )
            fast = {
                k: (v - 0.2 * gi).detach().requires_grad_() for (k, v), gi in zip(fast.items(), g)
            }
        qg = torch.autograd.grad(
            mse_loss(functional_call(net, fast, (qx[t],)), qy[t]), list(fast.values())
        )
        expected = [e + q / sx.shape[0] for e, q in zip(expected, qg)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reptile_direction_is_initial_minus_adapted_parameters():
    net = tanh_mlp().double()
    sx, sy, qx, qy = regression_tasks()
    params = dict(net.named_parameters())
    out = meta_loss(net, mse_loss, sx, sy, qx, qy, inner_lr=0.1, inner_steps=4, algorithm="reptile")
    got = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(sx.shape[0]):
        fast = {k: v.detach().clone() for k, v in params.items()}
        for _ in range(4):
            fast = {k: v.requires_grad_() for k, v in fast.items()}
            g = torch.autograd.grad(
                mse_loss(functional_call(net, fast, (sx[t],)), sy[t]), list(fast.values())
            )
            fast = {k: (v - 0.1 * gi).detach() for (k, v), gi in zip(fast.items(), g)}
        for k in expected:
            expected[k] += (params[k].detach() - fast[k]) / sx.shape[0]
    assert max_abs_difference(got, expected) < 1e-12


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_vmap_path_equals_loop_path(network, algorithm):
    if network == "mlp":
        net, loss, tasks = tanh_mlp().double(), "mse", regression_tasks(n_tasks=4)
    else:
        net, loss, tasks = small_conv_net().double(), "cross_entropy", image_tasks(n_tasks=4)
    params = dict(net.named_parameters())
    results = {}
    for mode in ("vmap", "loop"):
        out = meta_loss(
            net, loss, *tasks, inner_lr=0.3, inner_steps=2, algorithm=algorithm, vectorize=mode
        )
        assert out.vectorized == (mode == "vmap")
        results[mode] = (out, torch.autograd.grad(out.loss, list(params.values())))
    (v, gv), (lp, gl) = results["vmap"], results["loop"]
    torch.testing.assert_close(v.query_losses, lp.query_losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v.initial_query_losses, lp.initial_query_losses)
    torch.testing.assert_close(v.query_predictions, lp.query_predictions, rtol=1e-10, atol=1e-12)
    for a, b in zip(gv, gl):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_initial_query_loss_is_the_loss_before_adaptation():
    net = tanh_mlp().double()
    sx, sy, qx, qy = regression_tasks()
    out = meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, inner_steps=1)
    expected = torch.stack([mse_loss(net(qx[t]), qy[t]) for t in range(3)])
    torch.testing.assert_close(out.initial_query_losses, expected.detach())
    zero_steps = meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, inner_steps=0)
    torch.testing.assert_close(zero_steps.query_losses, expected.detach())


def _bn_net():
    return nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()


def _backward_gradients(net, **kwargs):
    net.zero_grad()
    out = meta_loss(net, "mse", *regression_tasks(), inner_lr=0.2, **kwargs)
    out.loss.backward()  # checkpointed losses support backward(), not autograd.grad
    return out, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("steps", [1, 4])
def test_checkpointed_inner_steps_match_finite_differences_with_batchnorm(steps):
    net = _bn_net()
    net[1].running_mean.fill_(3.0)  # BatchNorm must keep its per-task mode during recomputation
    buffers = [b.clone() for b in net.buffers()]
    out, grads = _backward_gradients(net, inner_steps=steps, checkpoint_inner_steps=True)
    assert not out.vectorized
    for a, b in zip(net.buffers(), buffers):
        assert torch.equal(a, b)
    params = dict(net.named_parameters())

    def objective(p):
        with torch.enable_grad():
            tasks = regression_tasks()
            return meta_loss(net, "mse", *tasks, inner_lr=0.2, inner_steps=steps, params=p).loss

    numeric = finite_difference_gradient(objective, params)
    scale = max(v.abs().max().item() for v in numeric.values())
    assert max_abs_difference(dict(zip(params, grads)), numeric) < 1e-7 * max(scale, 1.0)
    _, plain = _backward_gradients(net, inner_steps=steps)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_checkpointed_inner_steps_replay_the_same_dropout_masks():
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)).double()
    results = []
    for checkpoint in (False, True):
        torch.manual_seed(5)
        # the loop both times: vmap draws its masks in another order
        results.append(
            _backward_gradients(
                net, inner_steps=3, vectorize="loop", checkpoint_inner_steps=checkpoint
            )
        )
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt.query_losses, plain.query_losses, rtol=1e-12, atol=1e-12)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compile_values_are_checked():
    assert check_compile(False) is None and check_compile(True) == "default"
    assert check_compile("max-autotune") == "max-autotune"
    with pytest.raises(ValueError, match="`compile` must be True, False or one of .*got 'fast'"):
        meta_loss(tanh_mlp(), "mse", *regression_tasks(), inner_lr=0.1, compile="fast")


def test_checkpointing_with_vmap_or_compile_is_refused():
    net, tasks = tanh_mlp(), regression_tasks(dtype=torch.float32)
    for kwargs, setting in [({"vectorize": "vmap"}, "vmap"), ({"compile": True}, "compile")]:
        with pytest.raises(ValueError, match=f"checkpoint_inner_steps.*{setting}"):
            meta_loss(net, "mse", *tasks, inner_lr=0.1, checkpoint_inner_steps=True, **kwargs)


def test_batchnorm_uses_task_statistics_and_does_not_touch_running_stats():
    net = _bn_net().train()
    net[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in net.named_buffers()}
    tasks = regression_tasks()
    net.eval()  # evaluation also normalises with each task's own statistics
    out = meta_loss(net, "mse", *tasks, inner_lr=0.2, inner_steps=0)
    for k, v in net.named_buffers():
        assert torch.equal(v, before[k]), k
    assert not net.training and not net[1].training and net[1].track_running_stats
    # reference: a BatchNorm without running statistics normalises with the batch's own
    fresh = _bn_net()
    fresh.load_state_dict(net.state_dict())
    fresh[1].running_mean = fresh[1].running_var = None
    fresh[1].track_running_stats = False
    expected = torch.stack([mse_loss(fresh(tasks[2][t]), tasks[3][t]) for t in range(3)])
    torch.testing.assert_close(out.query_losses, expected.detach())


def test_auto_falls_back_to_loop_when_vmap_fails():
    class ItemNet(nn.Module):  # .item() inside forward cannot be vmapped
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, x):
            return self.lin(x) * (1.0 if x.sum().item() > -1e9 else 0.0)

    net = ItemNet().double()
    tasks = regression_tasks()
    with pytest.warns(UserWarning, match="vmap failed"):
        out = meta_loss(net, "mse", *tasks, inner_lr=0.1)
    assert not out.vectorized
    reference = meta_loss(net, "mse", *tasks, inner_lr=0.1, vectorize="loop")
    torch.testing.assert_close(out.loss, reference.loss)


def test_frozen_parameters_and_buffers_pass_through_unchanged():
    net = tanh_mlp().double()
    net[0].weight.requires_grad_(False)
    net.register_buffer("unused_buffer", torch.ones(2))
    out = meta_loss(net, "mse", *regression_tasks(), inner_lr=0.1, inner_steps=2)
    out.loss.backward()
    assert net[0].weight.grad is None
    assert net[0].bias.grad is not None


def test_sgd_step_leaves_parameters_without_gradient_unchanged():
    p = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    out = sgd_step(p, {"a": torch.tensor(4.0), "b": None}, 0.5)
    assert out["a"].item() == -1.0 and out["b"] is p["b"]


def test_adapt_parameters_first_order_has_identity_jacobian():
    net = nn.Linear(1, 1).double()
    params = dict(net.named_parameters())
    x, y = torch.randn(5, 1, dtype=torch.double), torch.randn(5, 1, dtype=torch.double)
    adapted = adapt_parameters(net, params, {}, mse_loss, x, y, 0.3, 2, first_order=True)
    (jac,) = torch.autograd.grad(adapted["weight"].sum(), [params["weight"]])
    assert jac.item() == 1.0


# -- bad input ---------------------------------------------------------------------------------


def _good():
    return regression_tasks(dtype=torch.float32)


def test_mismatched_support_and_query_feature_shapes_name_the_argument():
    sx, sy, qx, qy = _good()
    with pytest.raises(ValueError, match="`support_x` examples have shape.*`query_x`"):
        meta_loss(nn.Linear(1, 1), "mse", sx, sy, qx.expand(-1, -1, 2), qy, inner_lr=0.1)


def test_mismatched_task_counts_name_the_argument():
    sx, sy, qx, qy = _good()
    with pytest.raises(ValueError, match="`query_y` has 2 tasks"):
        meta_loss(nn.Linear(1, 1), "mse", sx, sy, qx, qy[:2], inner_lr=0.1)


def test_mismatched_examples_and_labels_name_the_argument():
    sx, sy, qx, qy = _good()
    with pytest.raises(
        ValueError, match="`support_x` has 5 examples per task but `support_y` has 4"
    ):
        meta_loss(nn.Linear(1, 1), "mse", sx, sy[:, :4], qx, qy, inner_lr=0.1)


@pytest.mark.parametrize("steps", [-1, 1.5, True])
def test_invalid_inner_steps_is_refused(steps):
    with pytest.raises((ValueError, TypeError), match="`inner_steps` must be an integer >= 0"):
        meta_loss(nn.Linear(1, 1), "mse", *_good(), inner_lr=0.1, inner_steps=steps)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), "0.1"])
def test_non_finite_inner_lr_is_refused(lr):
    with pytest.raises((ValueError, TypeError), match="`inner_lr` must be a finite number > 0"):
        meta_loss(nn.Linear(1, 1), "mse", *_good(), inner_lr=lr)


@pytest.mark.parametrize("vectorize", ["vmap", "loop", "auto"])
def test_non_scalar_loss_is_refused(vectorize):
    def per_example(prediction, target):
        return (prediction - target) ** 2

    with pytest.raises(ValueError, match="loss function must return a scalar"):
        meta_loss(nn.Linear(1, 1), per_example, *_good(), inner_lr=0.1, vectorize=vectorize)


def test_output_shape_not_matching_targets_is_refused():
    with pytest.raises(ValueError, match=r"output shape \(\d+, 2\) for target shape \(\d+, 1\)"):
        meta_loss(nn.Linear(1, 2), "mse", *_good(), inner_lr=0.1)


def test_unknown_algorithm_and_vectorize_are_refused():
    with pytest.raises(ValueError, match="`algorithm` must be one of"):
        meta_loss(nn.Linear(1, 1), "mse", *_good(), inner_lr=0.1, algorithm="sgd")
    with pytest.raises(ValueError, match="`vectorize` must be one of"):
        meta_loss(nn.Linear(1, 1), "mse", *_good(), inner_lr=0.1, vectorize="yes")
    with pytest.raises(ValueError, match="`loss` must be one of"):
        meta_loss(nn.Linear(1, 1), "l1", *_good(), inner_lr=0.1)


class _Center(torch.autograd.Function):
    """``x - x.mean()``, whose batching rule is planted (``correct_rule=False``: the mean over every
    task instead of each task's own, the kind of bug no list of layers can name)."""

    correct_rule = False

    @staticmethod
    def forward(x):
        return x - x.mean()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _Center.apply(grad)

    @staticmethod
    def vmap(info, in_dims, x):
        (dim,) = in_dims
        if _Center.correct_rule:
            dims = [d for d in range(x.dim()) if d != dim]
            return x - x.mean(dims, keepdim=True), dim
        return x - x.mean(), dim


class _CenteredNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(_Center.apply(self.a(x))))


@pytest.mark.parametrize("correct_rule", [False, True])
def test_auto_checks_vmap_against_the_loop_once_and_catches_a_wrong_batching_rule(
    monkeypatch, correct_rule
):
    monkeypatch.setattr(_Center, "correct_rule", correct_rule)
    net, tasks = _CenteredNet().double(), regression_tasks()
    loop = meta_loss(net, "mse", *tasks, inner_lr=0.1, vectorize="loop")
    forced = meta_loss(net, "mse", *tasks, inner_lr=0.1, vectorize="vmap")
    assert (forced.query_losses - loop.query_losses).abs().max() > 1e-3 or correct_rule
    checks = []
    original = execution.vmap_error
    monkeypatch.setattr(execution, "vmap_error", lambda *a: checks.append(1) or original(*a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = meta_loss(net, "mse", *tasks, inner_lr=0.1)
        second = meta_loss(net, "mse", *tasks, inner_lr=0.1)
    assert len(checks) == 1  # the first batch of this network and setting only
    assert first.vectorized == second.vectorized == correct_rule
    messages = [str(w.message) for w in caught]
    if correct_rule:
        assert messages == []
    else:
        assert len(messages) == 1 and "does not reproduce the per-task computation" in messages[0]
        assert "_CenteredNet" in messages[0] and "vectorize='loop'" in messages[0]
        assert not executor_of(net).uses_vmap("maml", "auto")
    torch.testing.assert_close(first.query_losses, loop.query_losses, rtol=1e-10, atol=1e-12)


def test_the_check_compares_dropout_networks_under_one_rng_state():
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a disagreement would warn
        out = meta_loss(net, "mse", *regression_tasks(), inner_lr=0.1, inner_steps=2)
    assert out.vectorized
    # the check forks the RNG: the run draws what it would have drawn without it
    torch.set_rng_state(state)
    again = meta_loss(net, "mse", *regression_tasks(), inner_lr=0.1, inner_steps=2)
    torch.testing.assert_close(again.query_losses, out.query_losses, rtol=0, atol=0)


def test_a_data_error_raises_and_leaves_vmap_on():
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 3))
    sx, sy, qx, qy = image_tasks(dtype=torch.float32)
    with pytest.raises(IndexError, match="out of bounds"):
        meta_loss(net, "cross_entropy", sx, sy, qx, qy + 5, inner_lr=0.1)
    with pytest.raises(RuntimeError, match="same dtype"):
        meta_loss(net, "cross_entropy", sx.double(), sy, qx.double(), qy, inner_lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = meta_loss(net, "cross_entropy", sx, sy, qx, qy, inner_lr=0.1)
    assert out.vectorized and executor_of(net).uses_vmap("maml", "auto")
    with pytest.raises(IndexError, match="out of bounds"):  # after the check too
        meta_loss(net, "cross_entropy", sx, sy, qx, qy + 5, inner_lr=0.1)
    assert meta_loss(net, "cross_entropy", sx, sy, qx, qy, inner_lr=0.1).vectorized


def _event_log_loss(events, query_size):
    """MSE that logs each query-set forward and the backward through it."""

    def loss(prediction, target):
        if prediction.shape[0] == query_size and prediction.requires_grad:
            task = sum(e == "forward" for e in events)
            events.append("forward")
            prediction.register_hook(lambda g: events.append(f"backward {task}"))
        return F.mse_loss(prediction, target)

    return loss


@pytest.mark.parametrize("checkpoint", [False, True])
def test_loop_path_frees_each_task_graph_before_the_next_task(checkpoint):
    net, tasks = tanh_mlp().double(), regression_tasks(n_tasks=3, k=5, q=6)
    events = []
    kwargs = dict(inner_lr=0.2, inner_steps=2, checkpoint_inner_steps=checkpoint)
    out = meta_loss(net, _event_log_loss(events, 6), *tasks, vectorize="loop", **kwargs)
    # each task's backward runs before the next task's forward: one task's graph at a time
    assert events == ["forward", "backward 0", "forward", "backward 1", "forward", "backward 2"]
    out.loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    params = dict(net.named_parameters())
    expected = torch.autograd.grad(
        unrolled_meta_loss(net, params, mse_loss, tasks, lr=0.2, steps=2), list(params.values())
    )
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_loop_path_passes_the_meta_gradient_to_inputs_that_require_grad():
    encoder = nn.Linear(1, 1).double()
    net = tanh_mlp().double()
    sx, sy, qx, qy = regression_tasks()
    results = []
    for mode in ("loop", "vmap"):
        encoder.zero_grad()
        net.zero_grad()
        out = meta_loss(net, "mse", encoder(sx), sy, encoder(qx), qy, inner_lr=0.2, vectorize=mode)
        out.loss.backward()
        results.append([p.grad.clone() for p in (*encoder.parameters(), *net.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert results[0][0].abs().sum() > 0


def test_loop_path_loss_refuses_a_second_derivative():
    net = tanh_mlp().double()
    out = meta_loss(net, "mse", *regression_tasks(), inner_lr=0.2, vectorize="loop")
    with pytest.raises(RuntimeError, match="supports one backward, not create_graph=True"):
        torch.autograd.grad(out.loss, [net[0].weight], create_graph=True)
    (g,) = torch.autograd.grad(out.loss, [net[0].weight])  # one backward is fine
    assert g.shape == net[0].weight.shape


def test_auto_runs_convolution_networks_task_by_task_on_the_cpu():
    net = small_conv_net()
    out = meta_loss(net.double(), "cross_entropy", *image_tasks(), inner_lr=0.1)
    assert not out.vectorized and not executor_of(net).uses_vmap("maml", "auto")
    assert executor_of(net).uses_vmap("maml", "vmap")
    assert meta_loss(
        net, "cross_entropy", *image_tasks(), inner_lr=0.1, vectorize="vmap"
    ).vectorized


def test_every_compiled_setting_stays_compiled_past_dynamos_recompile_limit():
    # dynamo compiles at most recompile_limit graphs per code object and runs the rest eagerly
    from torch._dynamo.utils import counters

    net, tasks = tanh_mlp().double(), regression_tasks()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):
        for steps in (1, 2):
            meta_loss(net, "mse", *tasks, inner_lr=0.1, inner_steps=steps, compile=True)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("vectorize", ["vmap", "loop", "auto"])
def test_an_empty_support_set_is_refused_on_every_path(vectorize):
    sx, sy, qx, qy = regression_tasks()
    with pytest.raises(ValueError, match="`support_x` needs at least one example per task, got 0"):
        meta_loss(tanh_mlp().double(), "mse", sx[:, :0], sy[:, :0], qx, qy, inner_lr=0.1)


def test_a_frozen_network_and_a_non_positive_inner_lr_are_refused():
    frozen = tanh_mlp().double().requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no parameter with requires_grad=True"):
        meta_loss(frozen, "mse", *regression_tasks(), inner_lr=0.1)
    params = {n: p.clone().requires_grad_() for n, p in frozen.named_parameters()}
    meta_loss(frozen, "mse", *regression_tasks(), inner_lr=0.1, params=params).loss.backward()
    for lr in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"`inner_lr` must be a finite number > 0, got {lr}"):
            meta_loss(tanh_mlp(), "mse", *regression_tasks(), inner_lr=lr)


@pytest.mark.parametrize("vectorize", ["auto", "loop"])
def test_a_network_that_cannot_take_the_data_is_named_with_its_layer_and_shapes(vectorize):
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "vmap failed" warning: the error is the user's
        with pytest.raises(RuntimeError) as info:
            meta_loss(net, "mse", *regression_tasks(), inner_lr=0.1, vectorize=vectorize)
    message = str(info.value)
    assert "Sequential cannot run on this task's data: layer `0`" in message
    assert (
        "Linear(in_features=3, out_features=8" in message and "input of shape (6, 1)" in message
    )  # the query set, first
    assert "mat1 and mat2 shapes cannot be multiplied" in message
    assert executor_of(net).uses_vmap("maml", "auto")  # nothing remembered


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_an_unbatched_task_is_refused_naming_the_layout(vectorize):
    x = torch.linspace(-1, 1, 10).unsqueeze(1)  # one task of 10 examples, without a task dimension
    with pytest.raises(ValueError, match=r"`support_x` has shape \(10, 1\): read as 10 tasks"):
        meta_loss(tanh_mlp(), "mse", x, x, x, x, inner_lr=0.1, vectorize=vectorize)
    with pytest.raises(ValueError, match=r"\[tasks, examples, \*features\].*\(1, 10, 1\)"):
        meta_loss(tanh_mlp(), "mse", x[None], x[None], x, x, inner_lr=0.1, vectorize=vectorize)
    out = meta_loss(tanh_mlp(), "mse", *(t[None] for t in (x, x, x, x)), inner_lr=0.1)
    assert out.query_losses.shape == (1,)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]
)
def test_class_labels_of_every_integer_dtype_are_read_alike_on_both_paths(dtype):
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 2))
    sx, sy, qx, qy = image_tasks(classes=2, dtype=torch.float32)
    reference = meta_loss(net, "cross_entropy", sx, sy, qx, qy, inner_lr=0.1, vectorize="loop")
    for vectorize in ("vmap", "loop", "auto"):
        out = meta_loss(
            net, "cross_entropy", sx, sy.to(dtype), qx, qy.to(dtype), inner_lr=0.1,
            vectorize=vectorize,
        )  # fmt: skip
        torch.testing.assert_close(out.loss, reference.loss)
        assert out.vectorized == (vectorize != "loop")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_first_batch_decides_nothing_about_vmap(value):
    net, executor = tanh_mlp().float(), execution.Executor()
    sx, sy, qx, qy = (t.float().clone() for t in regression_tasks())
    poisoned = sx.clone()
    poisoned[1, 0, 0] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing blames vmap
        first = meta_loss(net, "mse", poisoned, sy, qx, qy, inner_lr=0.1, executor=executor)
        assert not first.vectorized and not executor.decisions
        second = meta_loss(net, "mse", sx, sy, qx, qy, inner_lr=0.1, executor=executor)
    assert second.vectorized and executor.uses_vmap("maml", "auto")


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "16-bit parameters"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_rounding_does_not_turn_vmap_off(dtype, autocast):
    # the sinusoid MLP, 25 tasks: float16 parameters differed by 4.4e-2 in the meta-gradient, and
    # autocast by 1e-2 in the predictions, from the per-task run (rounding, not a batching rule)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    g = torch.Generator().manual_seed(0)
    sx, qx = (torch.rand(25, 10, 1, generator=g) * 10 - 5 for _ in range(2))
    batch = (sx, sx.sin(), qx, qx.sin())
    if not autocast:
        net, batch = net.to(dtype), tuple(t.to(dtype) for t in batch)
    executor = execution.Executor()
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
        warnings.simplefilter("error")
        out = meta_loss(net, "mse", *batch, inner_lr=0.01, executor=executor)
    assert out.vectorized


def test_compiled_meta_loss_compiles_once_for_fresh_batches_of_one_setting(monkeypatch):
    graphs, compile = [], torch.compile

    def counting_compile(fn, mode=None, **kwargs):
        def backend(graph, example_inputs):  # counts the graphs dynamo hands over, runs eagerly
            graphs.append(graph)
            return graph.forward

        return compile(fn, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    net, g = tanh_mlp().float(), torch.Generator().manual_seed(0)
    for _ in range(5):  # a user's own loop: a fresh batch each call, the algorithm by name
        batch = [torch.randn(4, 5, 1, generator=g) for _ in range(4)]
        meta_loss(net, "mse", *batch, inner_lr=0.1, compile=True, algorithm="maml").loss.backward()
    assert len(graphs) == 1
    meta_loss(net, "mse", *batch, inner_lr=0.1, compile=True, algorithm="fomaml")
    assert len(graphs) == 2  # another setting compiles once more
