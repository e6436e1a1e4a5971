"""MAMLModule inside Lightning: learning signal, gradients vs a reference, Trainer features, DDP."""

import copy
import csv
import functools
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import unrolled_meta_loss
from tasks import quiet_trainer, regression_tasks, tanh_mlp
from torch import nn

from lightning_maml import Episode, MAMLModule
from lightning_maml.callbacks import MetaGradientCheck
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.datamodules.sinusoid import TaskSet
from lightning_maml.functional import IMAML, episode_metrics, meta_loss, mse_loss
from lightning_maml.models import MLP


def test_short_training_makes_adaptation_reduce_held_out_mse():
    pl.seed_everything(0)
    module = MAMLModule(MLP(), inner_lr=0.01, inner_steps=1, eval_inner_steps=5)
    data = SinusoidDataModule(meta_batch_size=25, batches_per_epoch=200, num_test_tasks=200)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, data)
    # a plain Trainer evaluates under inference mode; the module adapts all the same
    (result,) = pl.Trainer(logger=False, enable_progress_bar=False).test(module, data)
    assert result["test/query_loss_after"] < 0.8 * result["test/query_loss_before"]
    # and training did something: the untrained network adapts far worse
    untrained = MAMLModule(MLP(), inner_lr=0.01, eval_inner_steps=5)
    (before,) = pl.Trainer(logger=False, enable_progress_bar=False).test(untrained, data)
    assert result["test/query_loss_after"] < before["test/query_loss_after"]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_meta_loss_gradient_equals_unrolled_reference(algorithm):
    net = tanh_mlp().double()
    module = MAMLModule(net, inner_lr=0.2, inner_steps=2, algorithm=algorithm)
    tasks = regression_tasks()
    module.meta_loss(Episode(*tasks)).backward()
    params = dict(net.named_parameters())
    ref = unrolled_meta_loss(
        net, params, mse_loss, tasks, 0.2, 2, first_order=algorithm == "fomaml"
    )
    for p, g in zip(params.values(), torch.autograd.grad(ref, list(params.values()))):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_compiled_training_follows_the_eager_trajectory(algorithm):
    def run(compile):
        pl.seed_everything(0)
        module = MAMLModule(
            tanh_mlp(), inner_lr=0.3, inner_steps=2, algorithm=algorithm, compile=compile
        )
        data = SinusoidDataModule(k_shot=5, query_size=5, meta_batch_size=4, batches_per_epoch=3)
        quiet_trainer(max_steps=3, limit_val_batches=0, precision="64-true").fit(module, data)
        return [p.detach() for p in module.net.parameters()]

    for eager, compiled in zip(run(False), run(True)):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def test_batches_as_tuples_and_mappings_are_accepted():
    module = MAMLModule(tanh_mlp().double(), inner_lr=0.1)
    tasks = regression_tasks()
    as_tuple = module.meta_loss(tuple(tasks))
    as_dict = module.meta_loss(dict(zip(Episode._fields, tasks)))
    assert as_tuple.item() == as_dict.item()
    with pytest.raises(TypeError, match="a batch must be an Episode"):
        module.meta_loss(tasks[0])


def test_double_precision_gradient_clipping_and_csv_logger(tmp_path):
    module = MAMLModule(MLP(), inner_lr=0.01, optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    start = [p.detach().clone() for p in module.net.parameters()]
    trainer = quiet_trainer(
        max_steps=1,
        precision="64-true",
        gradient_clip_val=1e-3,
        gradient_clip_algorithm="norm",
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    trainer.fit(module, SinusoidDataModule(meta_batch_size=5, batches_per_epoch=1, num_val_tasks=5))
    assert all(p.dtype == torch.float64 for p in module.net.parameters())
    step = torch.cat(
        [(p.detach().float() - s).flatten() for p, s in zip(module.net.parameters(), start)]
    )
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-4)  # SGD lr 1 on a clipped gradient
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for name in [
        "train/loss",
        "train/query_loss_after",
        "train/query_loss_before_epoch",
        "val/query_loss_after",
        "val/query_loss_before",
    ]:
        assert name in header.split(","), header


def test_epoch_means_are_the_means_over_every_task_of_the_epoch(tmp_path):
    seen = {"query_loss_after": [], "query_loss_before": []}

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            out = pl_module.last_meta_output
            seen["query_loss_after"].append(out.query_losses)
            seen["query_loss_before"].append(out.initial_query_losses)

    module = MAMLModule(MLP(hidden=(8,)), inner_lr=0.1)
    data = SinusoidDataModule(meta_batch_size=3, batches_per_epoch=5)
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[Record()], logger=logger)
    trainer.fit(module, data)
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    for name, values in seen.items():
        assert len(values) == 10
        column = f"train/{name}_epoch"
        logged = {int(r["epoch"]): float(r[column]) for r in rows if r.get(column)}
        for epoch in range(2):  # each epoch's mean is over its own tasks only
            expected = torch.cat(values[5 * epoch : 5 * epoch + 5]).mean().item()
            assert logged[epoch] == pytest.approx(expected, rel=1e-6), (name, epoch)


def test_checkpoint_resume_continues_the_same_trajectory(tmp_path):
    def run(max_epochs, folder, ckpt=None):
        pl.seed_everything(0)
        module = MAMLModule(MLP(), inner_lr=0.01)
        data = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=3)
        trainer = quiet_trainer(
            max_epochs=max_epochs,
            limit_val_batches=0,
            enable_checkpointing=True,
            default_root_dir=tmp_path / folder,
        )
        trainer.fit(module, data, ckpt_path=ckpt)
        return module, trainer

    continuous, _ = run(2, "continuous")
    _, first = run(1, "first")
    ckpt = first.checkpoint_callback.best_model_path
    resumed, _ = run(2, "resumed", ckpt)
    for a, b in zip(continuous.net.parameters(), resumed.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = MAMLModule.load_from_checkpoint(ckpt, net=MLP())
    assert loaded.inner_lr == 0.01 and loaded.hparams.algorithm == "maml"


def test_classification_accuracy_is_logged_and_correct():
    # two-way tasks whose classes are separated along a task-specific axis
    g = torch.Generator().manual_seed(0)
    tasks, k = 6, 8
    direction = torch.randn(tasks, 1, 2, generator=g)
    x = torch.randn(tasks, 2 * k, 2, generator=g)
    y = ((x * direction).sum(-1) > 0).long()
    episode = Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
    module = MAMLModule(nn.Linear(2, 2), loss="cross_entropy", inner_lr=0.5, inner_steps=3)
    (result,) = quiet_trainer().validate(
        module, torch.utils.data.DataLoader(TaskSet(episode), batch_size=3)
    )
    out = module.meta_forward(episode, inner_steps=3, train=False)
    expected = (out.query_predictions.argmax(-1) == episode.query_y).float().mean().item()
    assert result["val/query_acc_after"] == pytest.approx(expected)


def test_checkpointed_training_passes_the_finite_difference_check():
    check = MetaGradientCheck(every_n_steps=1, rtol=1e-6)
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    module = MAMLModule(net, inner_lr=0.3, inner_steps=3, checkpoint_inner_steps=True)
    data = SinusoidDataModule(k_shot=5, query_size=5, meta_batch_size=3, batches_per_epoch=2)
    quiet_trainer(max_steps=2, limit_val_batches=0, precision="64-true", callbacks=[check]).fit(
        module, data
    )
    assert check.last_result["max_rel_error"] < 1e-6
    assert not module.last_meta_output.vectorized


def test_invalid_module_arguments_are_refused_at_construction():
    with pytest.raises(ValueError, match="checkpoint_inner_steps.*compile=True"):
        MAMLModule(MLP(), checkpoint_inner_steps=True, compile=True)
    with pytest.raises(ValueError, match="`compile` must be True, False or one of"):
        MAMLModule(MLP(), compile="yes")
    with pytest.raises(ValueError, match="`inner_steps` must be an integer >= 0, got -1"):
        MAMLModule(MLP(), inner_steps=-1)
    with pytest.raises(ValueError, match="`eval_inner_steps` must be an integer >= 0"):
        MAMLModule(MLP(), eval_inner_steps=-2)
    with pytest.raises(ValueError, match="`inner_lr` must be a finite number > 0, got inf"):
        MAMLModule(MLP(), inner_lr=math.inf)
    for lr in (0.0, -0.01):
        with pytest.raises(ValueError, match=f"`inner_lr` must be a finite number > 0, got {lr}"):
            MAMLModule(MLP(), inner_lr=lr)
    with pytest.raises(ValueError, match="`algorithm` must be one of"):
        MAMLModule(MLP(), algorithm="sgd")
    with pytest.raises(ValueError, match="`meta_lr` must be a finite number > 0, got 0.0"):
        MAMLModule(MLP(), meta_lr=0.0)
    frozen = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match=r"`net` \(MLP\) has no parameter with requires_grad=True"):
        MAMLModule(frozen)
    with pytest.raises(TypeError, match="`net` must be a torch.nn.Module"):
        MAMLModule("MLP")


def test_network_output_not_matching_targets_fails_before_training():
    module = MAMLModule(MLP(out_features=2))
    trainer = quiet_trainer(max_steps=100)
    with pytest.raises(ValueError, match=r"output shape \(10, 2\) for target shape \(10, 1\)"):
        trainer.fit(module, SinusoidDataModule(meta_batch_size=2, num_val_tasks=2))
    assert trainer.global_step == 0


class _SaveParameters(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        params = [p.detach().clone() for p in pl_module.net.parameters()]
        torch.save(params, f"{self.directory}/rank{trainer.global_rank}.pt")


def _one_step(tmp_path, devices, meta_batch_size, compile=False):
    pl.seed_everything(0)
    module = MAMLModule(
        MLP(hidden=(8,)),
        inner_lr=0.1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        compile=compile,
    )
    data = SinusoidDataModule(meta_batch_size=meta_batch_size, batches_per_epoch=1)
    trainer = quiet_trainer(
        max_steps=1,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true",
        limit_val_batches=0,
        callbacks=[_SaveParameters(tmp_path)],
    )
    trainer.fit(module, data)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_ddp_step_equals_single_process_step_over_the_union_of_tasks(tmp_path, compile):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    # the compiled gradient reaches DDP's gradient hooks through ordinary autograd
    _one_step(tmp_path / "ddp", devices=2, meta_batch_size=3, compile=compile)
    _one_step(tmp_path / "single", devices=1, meta_batch_size=6)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    initial = MLP(hidden=(8,))  # the step moved the parameters
    for a, b, c in zip(rank0, rank1, single):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert any(not torch.allclose(a.float(), p) for a, p in zip(rank0, initial.parameters()))


@pytest.mark.parametrize("trainer_kwargs", [{"log_every_n_steps": 0}, {"barebones": True}])
def test_training_runs_with_step_logging_off(trainer_kwargs):
    module = MAMLModule(MLP())
    data = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=3, num_val_tasks=2)
    kwargs = dict(max_steps=4, limit_val_batches=1, **trainer_kwargs)
    if trainer_kwargs.get("barebones"):
        trainer = pl.Trainer(accelerator="cpu", devices=1, **kwargs)
    else:
        trainer = quiet_trainer(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    assert trainer.global_step == 4
    assert not [w for w in caught if "self.log" in str(w.message)]


def test_meta_lr_with_an_optimizer_is_refused_and_meta_lr_defaults_to_1e_3():
    adam = functools.partial(torch.optim.Adam, lr=0.01)
    with pytest.raises(ValueError, match=r"`meta_lr=0.005` sets the learning rate of the default"):
        MAMLModule(MLP(), meta_lr=0.005, optimizer=adam)
    assert MAMLModule(MLP(), optimizer=adam).configure_optimizers().defaults["lr"] == 0.01
    assert MAMLModule(MLP()).configure_optimizers().defaults["lr"] == 1e-3


def test_accuracy_with_class_probability_targets_counts_their_most_probable_class():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 2, generator=g)
    y = (x[..., 0] > 0).long()
    hard = Episode(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])
    soft = Episode(*(t if i % 2 == 0 else F.one_hot(t, 2).float() for i, t in enumerate(hard)))
    results = []
    for episode in (hard, soft):
        torch.manual_seed(0)
        module = MAMLModule(nn.Linear(2, 2), loss="cross_entropy", inner_lr=0.5)
        (result,) = quiet_trainer().validate(module, torch.utils.data.DataLoader(TaskSet(episode)))
        results.append(result["val/query_acc_after"])
    assert results[0] == pytest.approx(results[1])


@pytest.mark.parametrize(
    "algorithm", ["maml", "fomaml", "reptile", "anil", "metasgd", "maml++", "imaml"]
)
def test_every_algorithm_trains_and_evaluates_under_a_plain_trainer(algorithm):
    if algorithm == "imaml":  # the sinusoid MLP's support Hessians go below -1, its default lam
        algorithm = IMAML(lam=100.0)
    module = MAMLModule(MLP(), inner_lr=0.01, inner_steps=2, algorithm=algorithm)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=3, num_val_tasks=8)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(module, data)
    assert all(not torch.equal(before[n], p) for n, p in module.named_parameters())
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert math.isfinite(metrics["val/query_loss_after"])


def test_evaluation_adapts_with_the_learned_step_sizes():
    module = MAMLModule(MLP(), inner_lr=0.01, inner_steps=3, algorithm="metasgd")
    batch = Episode(*(t.float() for t in regression_tasks()))
    adapted = module.meta_forward(batch, train=False)
    with torch.no_grad():
        for rate in module.algorithm.parameters():
            rate.zero_()  # learned to take no step
    still = module.meta_forward(batch, train=False)
    assert not torch.allclose(adapted.query_losses, adapted.initial_query_losses)
    assert torch.allclose(still.query_losses, still.initial_query_losses)


class _OwnFewShotModule(pl.LightningModule):
    """A user's own module: its network, its training_step calling the functional meta-loss."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        out = meta_loss(self.net, "mse", *batch, inner_lr=0.3, inner_steps=2)
        metrics = episode_metrics(out, batch.query_y)
        self.log_dict({f"train/{k}": v.mean() for k, v in metrics.items()})
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


def test_the_meta_loss_in_a_users_own_module_trains_as_maml_module_does():
    data = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=5, num_val_tasks=4)
    torch.manual_seed(0)
    own = _OwnFewShotModule(tanh_mlp())
    ours = MAMLModule(
        copy.deepcopy(own.net),
        inner_lr=0.3,
        inner_steps=2,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )
    trainers = [quiet_trainer(max_steps=3, limit_val_batches=0) for _ in range(2)]
    trainers[0].fit(own, data)
    trainers[1].fit(ours, data)
    for a, b in zip(own.net.parameters(), ours.net.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    logged = trainers[0].callback_metrics
    assert {"train/query_loss_after", "train/query_loss_before"} <= set(logged)


class _ExistingClassifier(pl.LightningModule):
    def __init__(self, part_only=False):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.part_only = part_only

    def configure_optimizers(self):
        params = self.model[2].parameters() if self.part_only else self.model.parameters()
        optimizer = torch.optim.SGD(params, lr=0.5)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_maml_module_honours_an_existing_modules_optimizers_and_schedulers():
    existing = _ExistingClassifier()
    module = MAMLModule(existing.model, inner_lr=0.01, optimizers_from=existing)
    assert "optimizers_from" not in module.hparams and not any(
        name.startswith("optimizers_from") for name, _ in module.named_parameters()
    )
    data = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=5, num_val_tasks=4)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, data)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**3)
    partial = _ExistingClassifier(part_only=True)
    with pytest.raises(MisconfigurationException, match=r"missing \['0.weight', '0.bias'\]"):
        quiet_trainer(max_steps=1).fit(
            MAMLModule(partial.model, inner_lr=0.01, optimizers_from=partial), data
        )
    with pytest.raises(ValueError, match="leave `optimizer` and `meta_lr` out"):
        MAMLModule(existing.model, meta_lr=0.1, optimizers_from=existing)


def test_the_progress_bar_shows_short_distinct_names_and_loggers_only_full_ones(tmp_path):
    pl.seed_everything(0)
    module = MAMLModule(MLP(), inner_lr=0.01)
    data = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=4, num_val_tasks=4)
    trainer = quiet_trainer(
        max_epochs=1, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="run")
    )
    trainer.fit(module, data)
    assert set(trainer.progress_bar_metrics) == {"before", "after", "val_after"}
    torch.testing.assert_close(
        trainer.progress_bar_metrics["val_after"],
        trainer.callback_metrics["val/query_loss_after"].item(),
    )
    with open(next(Path(tmp_path).rglob("metrics.csv"))) as f:
        columns = set(next(csv.reader(f)))
    assert {"train/loss", "train/query_loss_before", "train/query_loss_after"} <= columns
    assert {"val/query_loss_after", "val/query_loss_before"} <= columns
    assert not columns & {"before", "after", "val_after", "acc"}


def test_protomaml_trains_and_evaluates_few_shot_classification():
    from lightning_maml.datamodules import FewShotDataModule

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12).repeat(20)
    centres = torch.randn(12, 6, generator=g) * 3
    data = torch.utils.data.TensorDataset(
        centres[labels] + torch.randn(240, 6, generator=g), labels
    )
    dm = FewShotDataModule(
        data, fractions=(0.5, 0.25, 0.25), n_way=3, k_shot=2, query_size=3, episodes_per_epoch=8
    )
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    module = MAMLModule(net, loss="cross_entropy", inner_lr=0.1, algorithm="protomaml")
    body = net[0].weight.detach().clone()
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(module, dm)
    assert not torch.equal(body, net[0].weight)
    accuracy = trainer.test(module, dm, verbose=False)[0]["test/query_acc_after"]
    assert accuracy > 0.6  # well-separated classes: the prototypes alone classify them
