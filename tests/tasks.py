"""Small networks, task batches and a quiet Trainer shared by the tests."""

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

#: real PhysioNet recordings in MNE's layout, copied by the tests that use them
#: (``LIGHTNING_MAML_MNE_DATA`` points elsewhere)
REAL_EEG = Path(
    os.environ.get("LIGHTNING_MAML_MNE_DATA")
    or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mne_data"
)
needs_real_eeg = pytest.mark.skipif(
    not REAL_EEG.exists(),
    reason=f"real PhysioNet recordings not found at {REAL_EEG}: set LIGHTNING_MAML_MNE_DATA to a "
    "folder holding them in MNE's layout",
)


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def small_conv_net(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, classes),
    )


def small_bn_net(classes: int = 3) -> nn.Module:
    """``small_conv_net`` with a BatchNorm layer after its convolution."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, classes),
    )


def regression_tasks(n_tasks=3, k=5, q=6, dtype=torch.float64, generator=None):
    g = generator or torch.Generator().manual_seed(1)
    sx = torch.rand(n_tasks, k, 1, generator=g, dtype=dtype) * 4 - 2
    qx = torch.rand(n_tasks, q, 1, generator=g, dtype=dtype) * 4 - 2
    amp = torch.rand(n_tasks, 1, 1, generator=g, dtype=dtype) + 0.5
    return sx, amp * torch.sin(sx), qx, amp * torch.sin(qx)


def image_tasks(n_tasks=3, k=4, q=5, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    sx = torch.randn(n_tasks, k, 1, 6, 6, generator=g, dtype=dtype)
    qx = torch.randn(n_tasks, q, 1, 6, 6, generator=g, dtype=dtype)
    sy = torch.randint(0, classes, (n_tasks, k), generator=g)
    qy = torch.randint(0, classes, (n_tasks, q), generator=g)
    return sx, sy, qx, qy


def fake_motor_imagery(n_subjects=4):
    """MOABB's FakeDataset with left/right hand imagery, 40 cues a run, seeded (eeg extra)."""
    from moabb.datasets.fake import FakeDataset

    return FakeDataset(
        event_list=("left_hand", "right_hand"),
        n_subjects=n_subjects,
        n_sessions=1,
        n_runs=1,
        n_events=40,
        duration=100,
        seed=0,
    )


class ReleaseProcessGroup(pl.Callback):
    """Destroys the gloo process group when a spawned DDP run ends.

    Left alive, it is torn down at interpreter exit, and a spawned process then aborts now and
    then ("terminate called without an active exception", about 1 run in 4 here) after a fit that
    finished correctly.
    """

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary, unless overridden;
    spawned DDP runs release their process group at teardown."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs = {**defaults, **kwargs}
    if kwargs.get("strategy") == "ddp_spawn":
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), ReleaseProcessGroup()]
    return pl.Trainer(**kwargs)


class FailingDataModule(pl.LightningDataModule):
    """A data module whose data cannot be loaded in ``setup`` (as an offline download fails)."""

    def setup(self, stage: str) -> None:
        raise RuntimeError("the data could not be loaded")
