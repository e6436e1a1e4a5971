"""MetaGradientCheck passes on correct meta-gradients and catches planted bugs, also under DDP."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tasks import image_tasks, quiet_trainer, small_conv_net, tanh_mlp
from torch import nn

import lightning_maml.functional.inner as inner
from lightning_maml import Episode, MAMLModule
from lightning_maml.callbacks import MetaGradientCheck, MetaGradientMismatch
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.datamodules.sinusoid import TaskSet
from lightning_maml.functional import ANIL, MAMLPlusPlus, MetaSGD
from lightning_maml.models import MLP, EEGNet


def _fit(module, data, callbacks, max_steps=2, **kwargs):
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module, data)
    return trainer


def _sinusoid(meta_batch_size=4):
    return SinusoidDataModule(
        k_shot=5, query_size=5, meta_batch_size=meta_batch_size, batches_per_epoch=3
    )


def _conv_loader():
    sx, sy, qx, qy = (t.float() if t.is_floating_point() else t for t in image_tasks(n_tasks=6))
    return torch.utils.data.DataLoader(TaskSet(Episode(sx, sy, qx, qy)), batch_size=3)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_check_passes_on_correct_meta_gradients(network, steps, algorithm):
    check = MetaGradientCheck(every_n_steps=1, rtol=1e-6)
    if network == "mlp":
        module = MAMLModule(tanh_mlp(), inner_lr=0.3, inner_steps=steps, algorithm=algorithm)
        data = _sinusoid()
    else:
        module = MAMLModule(
            small_conv_net(),
            loss="cross_entropy",
            inner_lr=0.5,
            inner_steps=steps,
            algorithm=algorithm,
        )
        data = _conv_loader()
    _fit(module, data, [check], precision="64-true")
    assert check.last_result["max_rel_error"] < 1e-6


def test_check_passes_in_float32_with_default_tolerance():
    check = MetaGradientCheck(every_n_steps=1)
    _fit(MAMLModule(MLP(), inner_lr=0.05, inner_steps=2), _sinusoid(), [check])
    assert check.last_result["max_rel_error"] < 1e-3


class DetachedInnerGradient(MAMLModule):
    """Claims second order but computes the first-order gradient."""

    def meta_forward(self, batch, inner_steps=None, train=True):
        if not train:
            return super().meta_forward(batch, inner_steps, train)
        second_order = self.algorithm
        self.algorithm = second_order.with_order(first_order=True)
        try:
            return super().meta_forward(batch, inner_steps, train)
        finally:
            self.algorithm = second_order


class SummedOverTasks(MAMLModule):
    def meta_forward(self, batch, inner_steps=None, train=True):
        out = super().meta_forward(batch, inner_steps, train)
        return out._replace(loss=out.loss * out.query_losses.shape[0])


def _mismatched_lr_sgd_step(params, grads, lr):
    # value uses lr, but the graph differentiates as if it were lr / 2
    honest = {n: p if grads.get(n) is None else p - lr * grads[n] for n, p in params.items()}
    graph = {n: p if grads.get(n) is None else p - 0.5 * lr * grads[n] for n, p in params.items()}
    return {n: graph[n] + (honest[n] - graph[n]).detach() for n in params}


@pytest.mark.parametrize("bug", ["detached_inner_gradient", "inner_lr_mismatch", "summed_loss"])
def test_check_raises_on_planted_bugs(bug, monkeypatch):
    cls = {"detached_inner_gradient": DetachedInnerGradient, "summed_loss": SummedOverTasks}.get(
        bug, MAMLModule
    )
    if bug == "inner_lr_mismatch":
        monkeypatch.setattr(inner, "sgd_step", _mismatched_lr_sgd_step)
    module = cls(tanh_mlp(), inner_lr=0.3, inner_steps=2)
    with pytest.raises(MetaGradientMismatch, match="disagrees with finite differences") as info:
        _fit(module, _sinusoid(), [MetaGradientCheck()], precision="64-true")
    assert "direction 0: gradient·v" in str(info.value)


def test_warn_mode_warns_instead_of_raising():
    check = MetaGradientCheck(on_mismatch="warn")
    with pytest.warns(UserWarning, match="disagrees with finite differences"):
        _fit(SummedOverTasks(tanh_mlp(), inner_lr=0.3), _sinusoid(), [check], max_steps=1)


def test_check_does_not_change_the_training_trajectory():
    def run(callbacks):
        pl.seed_everything(0)
        module = MAMLModule(MLP(), inner_lr=0.05, inner_steps=2)
        _fit(module, _sinusoid(), callbacks, max_steps=4)
        return [p.detach().clone() for p in module.net.parameters()], torch.rand(3)

    with_check, rng_with = run([MetaGradientCheck(every_n_steps=1)])
    without, rng_without = run([])
    for a, b in zip(with_check, without):
        assert torch.equal(a, b)
    assert torch.equal(rng_with, rng_without)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="`num_directions` must be an integer >= 1, got 0"):
        MetaGradientCheck(num_directions=0)
    with pytest.raises(ValueError, match="`on_mismatch` must be 'raise' or 'warn'"):
        MetaGradientCheck(on_mismatch="ignore")
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0"):
        MetaGradientCheck(eps=0)
    with pytest.raises(MisconfigurationException, match="algorithm='reptile'"):
        _fit(MAMLModule(MLP(), algorithm="reptile"), _sinusoid(), [MetaGradientCheck()])
    dropout_net = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.1), nn.Linear(8, 1))
    with pytest.raises(MisconfigurationException, match="dropout layers"):
        _fit(MAMLModule(dropout_net), _sinusoid(), [MetaGradientCheck()])


class _Record(Callback):
    def __init__(self, check, directory):
        self.check, self.directory = check, directory

    def on_train_end(self, trainer, pl_module):
        path = f"{self.directory}/rank{trainer.global_rank}.json"
        with open(path, "w") as f:
            json.dump(self.check.last_result, f)


class UnsyncedGradients(MAMLModule):
    """DDP does not average this module's gradients: each rank applies its own."""

    def on_train_batch_start(self, batch, batch_idx):
        self.trainer.strategy.model.require_backward_grad_sync = False


def _ddp_check(module, directory):
    check = MetaGradientCheck(every_n_steps=1, rtol=1e-6)
    _fit(
        module,
        _sinusoid(meta_batch_size=2),
        [check, _Record(check, directory)],
        devices=2,
        strategy="ddp_spawn",
        precision="64-true",
        max_steps=2,
    )


def test_ddp_check_passes_and_logs_identical_figures_on_both_ranks(tmp_path):
    _ddp_check(MAMLModule(tanh_mlp(), inner_lr=0.3, inner_steps=2), tmp_path)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    assert rank0["max_rel_error"] < 1e-6


def test_ddp_check_catches_gradients_not_averaged_across_ranks(tmp_path):
    with pytest.raises(Exception, match="disagrees with finite differences"):
        _ddp_check(UnsyncedGradients(tanh_mlp(), inner_lr=0.3, inner_steps=2), tmp_path)


def test_no_false_alarm_on_a_long_healthy_relu_run():
    # the default MLP is ReLU: a step of eps around the parameters crosses a kink now and then
    # (with seed 0, at step 271 a single-step estimate was off by a relative 1.0)
    pl.seed_everything(0)
    check, errors = MetaGradientCheck(every_n_steps=1), []

    class Record(Callback):
        def on_before_optimizer_step(self, *args):
            errors.append(check.last_result["max_rel_error"])

    data = SinusoidDataModule(meta_batch_size=25, batches_per_epoch=10_000)
    _fit(MAMLModule(MLP()), data, [check, Record()], max_steps=300)
    assert len(errors) == 300 and max(errors) < check.rtol


def test_dropout_with_p_zero_is_deterministic_and_checked():
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 1))
    check = MetaGradientCheck(every_n_steps=1)
    _fit(MAMLModule(net), _sinusoid(), [check], max_steps=2)
    assert check.last_result["max_rel_error"] < check.rtol
    eegnet = MAMLModule(EEGNet(3, 32, 2, sampling_rate=16, dropout=0.0), loss="cross_entropy")
    check.setup(quiet_trainer(), eegnet, "fit")  # accepted: its Dropout layers have p = 0


FAMILY = {
    "anil": lambda: "anil",
    "anil first order": lambda: ANIL(first_order=True),
    "metasgd": lambda: "metasgd",
    "metasgd first order": lambda: MetaSGD(first_order=True),
    # epoch 0: multi-step loss, first order; epoch 1: multi-step loss, second order; epoch 2: the
    # last step's loss alone
    "maml++": lambda: MAMLPlusPlus(msl_epochs=2, first_order_epochs=1),
}


@pytest.mark.parametrize("name", FAMILY)
def test_check_passes_for_the_rest_of_the_family(name):
    check, seen = MetaGradientCheck(every_n_steps=1, rtol=1e-6), []

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((trainer.current_epoch, check.last_result["max_rel_error"]))

    module = MAMLModule(tanh_mlp(), inner_lr=0.3, inner_steps=2, algorithm=FAMILY[name]())
    _fit(module, _sinusoid(), [check, Record()], max_steps=7, precision="64-true")
    assert {epoch for epoch, _ in seen} == {0, 1, 2}
    assert max(error for _, error in seen) < 1e-6


def test_check_covers_learned_step_sizes(monkeypatch):
    # a planted bug: Meta-SGD's step sizes used as constants, so they get no meta-gradient
    rates = MetaSGD.rates
    monkeypatch.setattr(
        MetaSGD, "rates", lambda self, *a: {n: r.detach() for n, r in rates(self, *a).items()}
    )
    module = MAMLModule(tanh_mlp(), inner_lr=0.3, inner_steps=2, algorithm="metasgd")
    with pytest.raises(MetaGradientMismatch, match="algorithm='metasgd'"):
        _fit(module, _sinusoid(), [MetaGradientCheck()], precision="64-true")


class _CorruptGradient(Callback):
    """Before the check: one element of the first gradient doubled, NaN or inf (on ``rank``)."""

    def __init__(self, how, rank=None):
        self.how, self.rank = how, rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        grad = next(pl_module.net.parameters()).grad.view(-1)
        grad[0] = {"double": 2 * grad[0], "nan": math.nan, "inf": math.inf}[self.how]


@pytest.mark.parametrize(
    "how, message",
    [
        ("double", "disagrees with finite differences"),
        ("nan", r"holds non-finite values \(NaN or inf\) at step 0, in \['0.weight'\]"),
        ("inf", r"holds non-finite values \(NaN or inf\) at step 0, in \['0.weight'\]"),
    ],
)
def test_a_corrupted_gradient_fails_the_check_nan_and_inf_included(how, message):
    check = MetaGradientCheck()
    with pytest.raises(MetaGradientMismatch, match=message):
        _fit(MAMLModule(tanh_mlp(), inner_lr=0.3), _sinusoid(), [_CorruptGradient(how), check])
    assert not check.last_result["max_rel_error"] <= check.rtol
    if how != "double":
        assert check.last_result["max_rel_error"] == math.inf


def test_under_ddp_a_nan_on_one_rank_fails_the_check_on_every_rank_naming_it(tmp_path):
    check = MetaGradientCheck(every_n_steps=1)
    with pytest.raises(Exception, match=r"holds non-finite values.*rank 1"):
        _fit(
            MAMLModule(tanh_mlp(), inner_lr=0.3),
            _sinusoid(meta_batch_size=2),
            [_CorruptGradient("nan", rank=1), check],
            devices=2,
            strategy="ddp_spawn",
            max_steps=1,
        )


def test_under_ddp_a_mismatch_names_the_rank_whose_figures_it_shows(tmp_path):
    with pytest.raises(Exception, match=r"rank [01] \(the largest error over 2 ranks\)"):
        _ddp_check(UnsyncedGradients(tanh_mlp(), inner_lr=0.3, inner_steps=2), tmp_path)


def test_check_passes_for_protomaml_and_refuses_imaml_saying_what_its_update_is():
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ELU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    )
    check = MetaGradientCheck(every_n_steps=1, rtol=1e-6)
    module = MAMLModule(
        net, loss="cross_entropy", inner_lr=0.3, inner_steps=2, algorithm="protomaml"
    )
    _fit(module, _conv_loader(), [check], max_steps=2, precision="64-true")
    assert check.last_result["max_rel_error"] < 1e-6
    with pytest.raises(MisconfigurationException, match="implicit gradient at the exact minimiser"):
        _fit(MAMLModule(MLP(), algorithm="imaml"), _sinusoid(), [MetaGradientCheck()])
