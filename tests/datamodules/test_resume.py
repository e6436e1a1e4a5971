"""A run resumed from any checkpoint (mid-epoch or at an epoch's end, with or without DataLoader
workers, under DDP) ends with the same parameters and optimizer state, bit for bit, as the run that
was never interrupted: it meta-trains on the same task stream."""

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tasks import ReleaseProcessGroup, fake_motor_imagery, quiet_trainer

from lightning_maml import MAMLModule
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP


def _fit(folder, make_data, max_steps, ckpt=None, make_module=None, **trainer_kwargs):
    """Fit ``make_module()`` (default: MAML on the MLP) from scratch (or from ``ckpt``),
    checkpointing every 10 steps and at the end."""
    torch.manual_seed(0)
    callbacks = [
        ModelCheckpoint(dirpath=folder, every_n_train_steps=10, save_top_k=-1, save_last=True)
    ]
    if trainer_kwargs.get("strategy") == "ddp_spawn":
        callbacks.append(ReleaseProcessGroup())
    trainer = quiet_trainer(
        max_steps=max_steps,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = make_module() if make_module is not None else MAMLModule(MLP())
        trainer.fit(module, make_data(), ckpt_path=ckpt)
    # Lightning finds the loader resumable (it warns about loaders without state_dict)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return folder


def _checkpoint(folder, step):
    (path,) = folder.glob(f"*step={step}.ckpt")
    return str(path)


def _assert_same_final_state(a, b):
    first = torch.load(a / "last.ckpt", weights_only=False)
    second = torch.load(b / "last.ckpt", weights_only=False)
    assert first["global_step"] == second["global_step"]
    for name, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][name]), name
    (opt_a,), (opt_b,) = first["optimizer_states"], second["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][index][key]), (index, key)


def _sinusoid(batches_per_epoch=16, num_workers=0):
    def make():
        return SinusoidDataModule(
            meta_batch_size=2,
            batches_per_epoch=batches_per_epoch,
            num_val_tasks=2,
            num_workers=num_workers,
        )

    return make


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("resume_step", [10, 20])  # 10 batches into epoch 0, 4 into epoch 1
def test_sinusoid_resume_continues_the_same_task_stream(tmp_path, num_workers, resume_step):
    data = _sinusoid(num_workers=num_workers)
    whole = _fit(tmp_path / "whole", data, 40)
    resumed = _fit(tmp_path / "resumed", data, 40, ckpt=_checkpoint(whole, resume_step))
    _assert_same_final_state(whole, resumed)


def test_sinusoid_resume_from_the_end_of_an_epoch(tmp_path):
    data = _sinusoid(batches_per_epoch=10)
    whole = _fit(tmp_path / "whole", data, 30)
    resumed = _fit(tmp_path / "resumed", data, 30, ckpt=_checkpoint(whole, 10))
    _assert_same_final_state(whole, resumed)


def test_episodic_eeg_resume_continues_the_same_episodes(tmp_path):
    pytest.importorskip("moabb")
    from lightning_maml.datamodules import MOABBDataModule

    def data():
        return MOABBDataModule(
            fake_motor_imagery(n_subjects=3),
            "LeftRightImagery",
            {"resample": 32},
            train_subjects=[1, 2],
            val_subjects=[3],
            test_subjects=[],
            n_way=2,
            k_shot=2,
            query_size=2,
            meta_batch_size=2,
            episodes_per_epoch=32,  # 16 batches an epoch
            cache_dir=str(tmp_path / "cache"),
        )

    def module():
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 96, 2))
        return MAMLModule(net, loss="cross_entropy", inner_lr=0.1)

    whole = _fit(tmp_path / "whole", data, 30, make_module=module)
    resumed = _fit(tmp_path / "resumed", data, 30, _checkpoint(whole, 20), make_module=module)
    _assert_same_final_state(whole, resumed)


def test_ddp_resume_continues_the_same_task_stream(tmp_path):
    data = _sinusoid()
    ddp = dict(strategy="ddp_spawn", devices=2)
    whole = _fit(tmp_path / "whole", data, 30, **ddp)
    resumed = _fit(tmp_path / "resumed", data, 30, ckpt=_checkpoint(whole, 20), **ddp)
    _assert_same_final_state(whole, resumed)


def test_few_shot_resume_continues_the_same_episodes(tmp_path):
    from torch.utils.data import TensorDataset

    from lightning_maml.datamodules import FewShotDataModule

    samples = TensorDataset(torch.randn(400, 4), torch.arange(10).repeat_interleave(40))

    def data():
        return FewShotDataModule(
            samples,
            n_way=3,
            k_shot=2,
            query_size=2,
            meta_batch_size=2,
            episodes_per_epoch=32,  # 16 batches an epoch
            fractions=(0.4, 0.3, 0.3),
            num_workers=1,
        )

    def module():
        return MAMLModule(torch.nn.Linear(4, 3), loss="cross_entropy", inner_lr=0.1)

    whole = _fit(tmp_path / "whole", data, 30, make_module=module)
    resumed = _fit(tmp_path / "resumed", data, 30, _checkpoint(whole, 20), make_module=module)
    _assert_same_final_state(whole, resumed)
