"""A checkpoint never makes loading import or call code of its choosing: every name it holds is
this library's, torch's, registered, or replaced by what the caller passes; anything else is
refused before any import, by ``load_from_checkpoint`` and by the command line alike."""

import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from tasks import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_maml import Episode, MAMLModule
from lightning_maml.cli import build_cli
from lightning_maml.datamodules.sinusoid import TaskSet
from lightning_maml.functional import mse_loss, register_loss
from lightning_maml.models import MLP, register_network

PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

def payload(prediction, target):
    pathlib.Path({marker!r}).write_text("called")
    return (prediction - target).abs().mean()

import torch
class Net(torch.nn.Linear):
    def __init__(self, **kwargs):
        pathlib.Path({marker!r}).write_text("built")
        super().__init__(1, 1)
"""


def _checkpoint(tmp_path, module=None):
    pl.seed_everything(0)
    module = module or MAMLModule(MLP(hidden=[4]), inner_lr=0.1)
    x = torch.randn(4, 5, 1)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TaskSet(Episode(x, x, x, x)), batch_size=2))
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """A module ``payload_<id>`` on the import path that leaves a marker file when imported,
    called or built; yields (module name, marker)."""
    name = f"payload_{abs(hash(str(tmp_path)))}"
    marker = tmp_path / "marker"
    (tmp_path / f"{name}.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def _crafted(path, **changes):
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"].update(changes)
    crafted = path.with_name("crafted.ckpt")
    torch.save(checkpoint, crafted)
    return crafted


@pytest.mark.parametrize(
    "field",
    [
        lambda name: {"loss": f"{name}.payload"},
        lambda name: {"net": {"class_path": f"{name}.Net", "init_args": {}}},
        lambda name: {"algorithm": {"class_path": f"{name}.Net", "init_args": {}}},
        lambda name: {"optimizer": {"class_path": f"{name}.Net", "init_args": {}}},
        lambda name: {
            "net": {
                "class_path": "lightning_maml.models.MLP",
                "init_args": {"inner": {"class_path": f"{name}.Net"}},
            }
        },
    ],  # fmt: skip
    ids=["loss", "net", "algorithm", "optimizer", "nested"],
)
def test_a_crafted_checkpoint_is_refused_before_anything_is_imported(tmp_path, payload, field):
    name, marker = payload
    crafted = _crafted(_checkpoint(tmp_path), **field(name))
    with pytest.raises(ValueError, match=rf"hyper-parameter `\w+` names '{name}\.\w+'.*refused"):
        MAMLModule.load_from_checkpoint(crafted)
    assert name not in sys.modules and not marker.exists()
    with pytest.raises(ValueError, match="refused before any import"):  # the command line too
        build_cli(["test", "--model.net=lightning_maml.models.MLP",
                   "--data=lightning_maml.datamodules.SinusoidDataModule",
                   f"--ckpt_path={crafted}", "--trainer.logger=false"])  # fmt: skip
    assert name not in sys.modules and not marker.exists()


def test_what_the_caller_passes_replaces_the_checkpoints_name(tmp_path, payload):
    name, marker = payload
    crafted = _crafted(_checkpoint(tmp_path), loss=f"{name}.payload")
    loaded = MAMLModule.load_from_checkpoint(crafted, loss=mse_loss)  # what it was trained with
    assert loaded.loss_fn is mse_loss
    assert name not in sys.modules and not marker.exists()


class Unregistered(nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.init_args = {"width": width}
        self.layer = nn.Linear(1, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.layer(x)))


@register_network
class Registered(Unregistered):
    pass


@register_loss
def registered_loss(prediction, target):
    return F.smooth_l1_loss(prediction, target)


def test_torch_and_library_names_and_registered_ones_load_without_arguments(tmp_path):
    path = _checkpoint(tmp_path, MAMLModule(MLP(hidden=[4]), loss=F.l1_loss, algorithm="anil"))
    assert MAMLModule.load_from_checkpoint(path).loss_fn is F.l1_loss
    path = _checkpoint(tmp_path, MAMLModule(Registered(), loss=registered_loss))
    loaded = MAMLModule.load_from_checkpoint(path)
    assert type(loaded.net) is Registered and loaded.loss_fn is registered_loss


def test_an_unregistered_network_class_is_asked_for(tmp_path):
    path = _checkpoint(tmp_path, MAMLModule(Unregistered(width=5)))
    with pytest.raises(ValueError, match=r"`net` names '.*Unregistered'.*net=\.\.\."):
        MAMLModule.load_from_checkpoint(path)
    assert type(MAMLModule.load_from_checkpoint(path, net=Unregistered(5)).net) is Unregistered


def test_a_checkpoint_without_the_librarys_record_is_refused(tmp_path):
    path = _checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["lightning_maml"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="no 'lightning_maml' entry .* refused"):
        MAMLModule.load_from_checkpoint(path)


def test_predict_without_a_checkpoint_is_refused_and_replaced_flags_are_named(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    common = ["--model.net=lightning_maml.models.MLP",
              "--data=lightning_maml.datamodules.SinusoidDataModule",
              "--data.meta_batch_size=2", "--data.num_test_tasks=2", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    with pytest.raises(MisconfigurationException, match="predict` without --ckpt_path"):
        build_cli(["predict", *common])
    path = _checkpoint(tmp_path)
    with pytest.warns(UserWarning, match=r"replace --model.algorithm='fomaml' \(the checkpoint "
                      r"has 'maml'\)"):  # fmt: skip
        cli = build_cli(["test", *common, "--model.algorithm=fomaml", f"--ckpt_path={path}"])
    assert cli.model.algorithm.name == "maml"
