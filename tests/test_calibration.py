"""Calibrating a new task: MAMLModule.adapt and trainer.predict against plain SGD and the engine."""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from tasks import quiet_trainer, regression_tasks, tanh_mlp
from torch.utils.data import DataLoader

from lightning_maml import Episode, MAMLModule
from lightning_maml.datamodules.sinusoid import TaskSet
from lightning_maml.functional import ANIL, IMAML, MAMLPlusPlus, MetaSGD, ProtoMAML
from lightning_maml.models import EEGNet


def _plain_sgd(net, x, y, rates, steps, loss=F.mse_loss, adapt=None):
    """A copy of ``net`` after ``steps`` of p -= rate * grad on (x, y), written without the engine;
    ``rates(name, step)`` gives a parameter's step size, ``adapt`` the names that move."""
    net = copy.deepcopy(net)
    params = dict(net.named_parameters())
    names = [n for n in params if adapt is None or n in adapt]
    for step in range(steps):
        grads = torch.autograd.grad(loss(net(x), y), [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                params[n] -= rates(n, step) * g
    return net


def _task():
    sx, sy, qx, _ = regression_tasks(n_tasks=1, k=10, q=7)
    return sx[0], sy[0], qx[0]


def test_adapt_equals_plain_sgd_on_a_copy_and_leaves_the_module_unchanged():
    module = MAMLModule(tanh_mlp().double(), inner_lr=0.3, eval_inner_steps=4)
    before = [p.detach().clone() for p in module.parameters()]
    sx, sy, qx = _task()
    calibrated = module.adapt(sx, sy)
    reference = _plain_sgd(module.net, sx, sy, lambda n, s: 0.3, 4)
    torch.testing.assert_close(calibrated(qx), reference(qx), rtol=1e-12, atol=1e-12)
    assert not calibrated.training and all(p.grad_fn is None for p in calibrated.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert not any(p.grad is not None for p in module.parameters())
    two_steps = _plain_sgd(module.net, sx, sy, lambda n, s: 0.3, 2)
    torch.testing.assert_close(module.adapt(sx, sy, steps=2)(qx), two_steps(qx))


def test_adapt_uses_meta_sgds_learned_step_sizes():
    module = MAMLModule(tanh_mlp().double(), inner_lr=0.3, eval_inner_steps=3, algorithm=MetaSGD())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # learned rates as after meta-training: one per weight, all different
        for lr in module.algorithm.lrs:
            lr.copy_(torch.rand(lr.shape, generator=g, dtype=lr.dtype) * 0.5)
    rates = dict(zip(dict(module.net.named_parameters()), module.algorithm.lrs))
    sx, sy, qx = _task()
    reference = _plain_sgd(module.net, sx, sy, lambda n, s: rates[n].detach(), 3)
    torch.testing.assert_close(module.adapt(sx, sy)(qx), reference(qx))


def test_adapt_uses_maml_plus_plus_rates_per_step_and_anil_moves_its_head_only():
    module = MAMLModule(
        tanh_mlp().double(), inner_lr=0.3, inner_steps=2, eval_inner_steps=3,
        algorithm=MAMLPlusPlus(),
    )  # fmt: skip
    with torch.no_grad():
        for i, lslr in enumerate(module.algorithm.lslr):
            lslr.copy_(torch.tensor([0.1 + 0.01 * i, 0.2 + 0.01 * i]))
    rates = dict(zip(dict(module.net.named_parameters()), module.algorithm.lslr))
    sx, sy, qx = _task()
    # past the trained steps the last step's rate is reused
    reference = _plain_sgd(module.net, sx, sy, lambda n, s: rates[n][min(s, 1)].detach(), 3)
    torch.testing.assert_close(module.adapt(sx, sy)(qx), reference(qx))
    anil = MAMLModule(tanh_mlp().double(), inner_lr=0.3, eval_inner_steps=3, algorithm=ANIL())
    calibrated = anil.adapt(sx, sy)
    reference = _plain_sgd(anil.net, sx, sy, lambda n, s: 0.3, 3, adapt=["4.weight", "4.bias"])
    torch.testing.assert_close(calibrated(qx), reference(qx))
    assert torch.equal(calibrated[0].weight, anil.net[0].weight)


def _eeg_episodes(n_tasks=6):
    g = torch.Generator().manual_seed(0)
    sx, qx = (
        torch.randn(n_tasks, 6, 3, 32, generator=g),
        torch.randn(n_tasks, 8, 3, 32, generator=g),
    )
    sy = torch.tensor([0, 0, 0, 1, 1, 1]).expand(n_tasks, -1).contiguous()
    qy = torch.tensor([0, 1] * 4).expand(n_tasks, -1).contiguous()
    return Episode(sx, sy, qx, qy)


@pytest.mark.parametrize(
    "make_algorithm",
    [
        lambda: "maml",
        lambda: MAMLPlusPlus(per_step_bn=True),
        lambda: IMAML(lam=5.0),
        lambda: ProtoMAML(),
    ],
    ids=["maml", "maml++ per-step bn", "imaml", "protomaml"],
)
def test_predict_returns_each_episodes_adapted_query_predictions_batch_norm_included(
    make_algorithm,
):
    pl.seed_everything(0)
    net = EEGNet(3, 32, 2, sampling_rate=16)  # BatchNorm and dropout layers
    module = MAMLModule(
        net,
        loss="cross_entropy",
        inner_lr=0.1,
        inner_steps=2,
        eval_inner_steps=3,
        algorithm=make_algorithm(),
    )
    with torch.no_grad():  # learned tensors apart from their initial values
        for t in module.algorithm.parameters():
            t.mul_(1 + 0.3 * torch.rand_like(t))
    episodes = _eeg_episodes()
    predictions = quiet_trainer().predict(module, DataLoader(TaskSet(episodes), batch_size=4))
    assert [p.shape for p in predictions] == [(4, 8, 2), (2, 8, 2)]
    predicted = torch.cat(predictions)
    module.eval()  # as under trainer.predict: no dropout
    engine = module.meta_forward(episodes, 3, train=False).query_predictions
    torch.testing.assert_close(predicted, engine)
    for t in range(len(episodes.support_x)):  # the same network as adapt() gives, task by task
        calibrated = module.adapt(episodes.support_x[t], episodes.support_y[t], batch_norm="batch")
        with torch.no_grad():
            torch.testing.assert_close(calibrated(episodes.query_x[t]), predicted[t])
    assert all(p.grad is None for p in module.parameters())


def test_adapt_refuses_data_that_is_not_one_tasks():
    module = MAMLModule(tanh_mlp())
    x = torch.randn(5, 1)
    with pytest.raises(
        ValueError, match="`support_x` has 5 examples per task but `support_y` has 4"
    ):
        module.adapt(x, x[:4])
    with pytest.raises(ValueError, match="`steps` must be an integer >= 0, got -1"):
        module.adapt(x, x, steps=-1)


def test_adapt_starts_protomamls_head_at_the_prototypes_and_steps_from_there():
    from reference import prototype_head
    from tasks import image_tasks, small_conv_net

    net = small_conv_net().double()
    module = MAMLModule(net, loss="cross_entropy", inner_lr=0.3, algorithm=ProtoMAML())
    sx, sy, qx, _ = image_tasks(n_tasks=1, k=9)
    start = prototype_head(net, dict(net.named_parameters()), sx[0], sy[0])
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(start[name])
    for steps in (0, 3):
        expected = _plain_sgd(reference, sx[0], sy[0], lambda n, s: 0.3, steps, F.cross_entropy)
        got = module.adapt(sx[0], sy[0], steps=steps)
        torch.testing.assert_close(got(qx[0]), expected(qx[0]), rtol=1e-10, atol=1e-12)


def test_adapt_takes_imamls_regularised_steps():
    from reference import regularised_gradient_descent

    module = MAMLModule(tanh_mlp().double(), inner_lr=0.2, algorithm=IMAML(lam=3.0))
    sx, sy, qx = _task()
    params = {n: p.detach() for n, p in module.net.named_parameters()}
    solve = regularised_gradient_descent(module.net, F.mse_loss, 3.0, 0.2, 6)
    phi = solve(params, {}, sx, sy)
    expected = torch.func.functional_call(module.net, phi, (qx,))
    torch.testing.assert_close(module.adapt(sx, sy, steps=6)(qx), expected, rtol=1e-12, atol=1e-12)
    # not plain SGD: the pull towards the meta-parameters shows
    plain = _plain_sgd(module.net, sx, sy, lambda n, s: 0.2, 6)
    assert (plain(qx) - expected).abs().max() > 1e-4


def test_per_step_batch_norm_trains_restores_from_a_checkpoint_and_adapts_alike(tmp_path):
    pl.seed_everything(0)
    module = MAMLModule(
        EEGNet(3, 32, 2, sampling_rate=16, dropout=0.0),
        loss="cross_entropy",
        inner_lr=0.1,
        inner_steps=2,
        algorithm=MAMLPlusPlus(msl_epochs=1, per_step_bn=True),
    )
    before = [t.detach().clone() for t in module.algorithm.bn]
    assert [tuple(t.shape) for t in before] == [(2, 8), (2, 8), (2, 16), (2, 16), (2, 16), (2, 16)]
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TaskSet(_eeg_episodes()), batch_size=2))
    moved = [not torch.equal(a, b) for a, b in zip(before, module.algorithm.bn)]
    assert all(moved)  # every per-step weight and bias is meta-learned
    assert (
        module.net.temporal[1].weight.grad is None or not module.net.temporal[1].weight.grad.any()
    )
    ckpt = next(tmp_path.rglob("*.ckpt"))
    loaded = MAMLModule.load_from_checkpoint(ckpt)
    assert loaded.algorithm.per_step_bn
    episodes = _eeg_episodes(2)
    a = module.adapt(episodes.support_x[0], episodes.support_y[0], steps=4)
    b = loaded.adapt(episodes.support_x[0], episodes.support_y[0], steps=4)
    torch.testing.assert_close(a(episodes.query_x[0]), b(episodes.query_x[0]))


# ---- what adapt returns: BatchNorm from the calibration trials, refusals, ordinary tensors ------


def test_support_statistics_normalise_each_trial_as_written_by_hand():
    pl.seed_everything(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    module = MAMLModule(net, inner_lr=0.1)
    g = torch.Generator().manual_seed(1)
    sx, sy = torch.randn(9, 2, generator=g, dtype=torch.float64), torch.randn(9, 1, generator=g)
    qx = torch.randn(5, 2, generator=g, dtype=torch.float64)
    calibrated = module.adapt(sx, sy.double(), steps=3)
    p = dict(calibrated.named_parameters())
    hidden = sx @ p["0.weight"].T + p["0.bias"]  # the support statistics, by hand
    mean, var = hidden.mean(0), hidden.var(0, unbiased=True)
    h = (qx @ p["0.weight"].T + p["0.bias"] - mean) / torch.sqrt(var + net[1].eps)
    expected = torch.tanh(p["1.weight"] * h + p["1.bias"]) @ p["3.weight"].T + p["3.bias"]
    with torch.no_grad():
        torch.testing.assert_close(calibrated(qx), expected, rtol=1e-12, atol=1e-12)
        one_by_one = torch.cat([calibrated(qx[i : i + 1]) for i in range(len(qx))])
        torch.testing.assert_close(one_by_one, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["maml", "protomaml", "imaml"])
def test_a_calibrated_eegnet_classifies_one_trial_as_in_a_batch_and_reloads_in_a_fresh_process(
    tmp_path, algorithm
):
    import subprocess
    import sys

    pl.seed_everything(0)
    make = dict(n_channels=3, n_samples=32, n_classes=2, sampling_rate=16)
    net = EEGNet(**make, dense_max_norm=None if algorithm == "protomaml" else 0.25)
    module = MAMLModule(net, loss="cross_entropy", inner_lr=0.1, algorithm=algorithm)
    episodes = _eeg_episodes(1)
    calibrated = module.adapt(episodes.support_x[0], episodes.support_y[0], steps=3)
    layered = EEGNet(**{**net.init_args, "fused": False})  # the same weights, layer by layer
    layered.load_state_dict(calibrated.state_dict())
    query = episodes.query_x[0]
    with torch.no_grad():
        batch = calibrated(query)
        alone = torch.cat([calibrated(query[i : i + 1]) for i in range(len(query))])
        torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layered.eval()(query), batch, rtol=1e-4, atol=1e-5)
        with warnings.catch_warnings():  # sizes become constants (the network's are fixed);
            warnings.simplefilter("ignore")  # torch 2.13 deprecates tracing for torch.export
            traced = torch.jit.trace(calibrated, query[:1], check_trace=False)
        torch.testing.assert_close(traced(query), batch, rtol=1e-5, atol=1e-6)
        exported = torch.export.export(
            calibrated, (query[:2],), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
        )
        torch.testing.assert_close(exported.module()(query), batch, rtol=1e-5, atol=1e-6)
    torch.save({"state_dict": calibrated.state_dict(), "init_args": net.init_args},
               tmp_path / "calibrated.pt")  # fmt: skip
    torch.save(query, tmp_path / "query.pt")
    script = (
        "import sys, torch\n"
        "from lightning_maml.models import EEGNet\n"
        "saved = torch.load(sys.argv[1] + '/calibrated.pt')\n"
        "net = EEGNet(**saved['init_args'])\n"
        "net.load_state_dict(saved['state_dict'])\n"
        "net.eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(net(torch.load(sys.argv[1] + '/query.pt')), sys.argv[1] + '/out.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), batch)


def test_adapt_refuses_non_finite_trials_naming_them_and_a_diverging_step_size():
    module = MAMLModule(tanh_mlp(), inner_lr=0.1)
    sx, sy, _ = _task()
    sx, sy = sx.float().clone(), sy.float().clone()
    sx[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`support_x` holds NaN or inf in trials \[3\]"):
        module.adapt(sx, sy)
    sx[3, 0] = 0.0
    sy[[1, 6], 0] = float("inf")
    with pytest.raises(ValueError, match=r"`support_y` holds NaN or inf in trials \[1, 6\]"):
        module.adapt(sx, sy)
    sy[[1, 6], 0] = 0.0
    diverging = MAMLModule(tanh_mlp(), inner_lr=1e6)
    with pytest.raises(ValueError, match=r"calibration diverged.*inner_lr=1000000.0"):
        diverging.adapt(sx * 1e3, sy * 1e3, steps=20)


def test_adapt_under_inference_mode_returns_ordinary_tensors():
    module = MAMLModule(EEGNet(3, 32, 2, sampling_rate=16), loss="cross_entropy", inner_lr=0.1)
    episodes = _eeg_episodes(1)
    with torch.inference_mode():
        support_x = episodes.support_x[0].clone()
        calibrated = module.adapt(support_x, episodes.support_y[0])
    tensors = [*calibrated.parameters(), *calibrated.buffers()]
    assert tensors and not any(t.is_inference() for t in tensors)
    calibrated.train()  # fine-tuning it later works
    calibrated(episodes.query_x[0]).sum().backward()


def test_protomaml_refuses_a_support_set_without_one_of_its_classes():
    net = EEGNet(3, 32, 3, sampling_rate=16, dense_max_norm=None)
    module = MAMLModule(net, loss="cross_entropy", inner_lr=0.1, algorithm="protomaml")
    episodes = _eeg_episodes(1)
    with pytest.raises(ValueError, match=r"has none of classes \[2\] \(of the head's 3\)"):
        module.adapt(episodes.support_x[0], episodes.support_y[0])


def test_saved_predictions_carry_their_targets_and_trials_so_they_score_alone(tmp_path):
    from lightning_maml.callbacks import PredictionWriter
    from lightning_maml.datamodules import EpisodicDataset

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 3, 32, generator=g), torch.arange(60) % 2
    subjects = torch.arange(60) // 20  # three subjects of 20 trials
    episodes = EpisodicDataset(x, y, subjects, n_way=2, k_shot=3, query_size=4,
                               num_episodes=5, relabel=False)  # fmt: skip
    module = MAMLModule(EEGNet(3, 32, 2, sampling_rate=16), loss="cross_entropy", inner_lr=0.1)
    writer = PredictionWriter(tmp_path)
    trainer = quiet_trainer(callbacks=[writer])
    predictions = trainer.predict(module, DataLoader(episodes, batch_size=2))
    saved = torch.load(tmp_path / "predictions.pt")
    assert [p.shape for p in saved["query_y"]] == [(2, 8), (2, 8), (1, 8)]
    for b, indices in enumerate(saved["batch_indices"]):
        torch.testing.assert_close(saved["predictions"][b], predictions[b])
        for t, episode in enumerate(indices):
            trials = saved["query_trials"][b][t]
            assert torch.equal(x[trials], episodes[episode].query_x)
            assert torch.equal(y[trials], saved["query_y"][b][t])
            assert saved["tasks"][b][t] == int(subjects[trials[0]])
