"""A new person's recordings prepared as training's trials were: from PhysioNet's EDF files read
with MNE, the same arrays as MOABBDataModule's own loading; refusals naming what differs; the
description kept in a trained module's checkpoints."""

import shutil

import numpy as np
import pytest
import torch
from tasks import REAL_EEG, needs_real_eeg, quiet_trainer

pytest.importorskip("moabb")

import mne  # noqa: E402

from lightning_maml import MAMLModule  # noqa: E402
from lightning_maml.datamodules import EEGPreprocessing, MOABBDataModule  # noqa: E402
from lightning_maml.models import EEGNet  # noqa: E402

EVENTS = {"left_hand": "T1", "right_hand": "T2"}


@pytest.fixture(scope="module")
def physionet(tmp_path_factory):
    """A copy of the recordings (MNE may write beside them), MNE pointed at it, and a data module
    of subjects 1-2 (training) and 3 (test) as the shipped config makes trials."""
    folder = tmp_path_factory.mktemp("mne") / "mne_data"
    shutil.copytree(REAL_EEG, folder)
    patch = pytest.MonkeyPatch()
    for name in ("MNE_DATA", "MNE_DATASETS_EEGBCI_PATH"):
        patch.setenv(name, str(folder))
    patch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    dm = MOABBDataModule(
        "PhysionetMI", "LeftRightImagery", {"fmin": 8, "fmax": 30, "resample": 80},
        train_subjects=[1, 2], val_subjects=[], test_subjects=[3], standardize="trial",
        cache_dir=None, n_way=2, k_shot=3, query_size=4, meta_batch_size=2,
        episodes_per_epoch=4, num_eval_episodes=2,
        dataset_kwargs={"imagined": True, "executed": False},
        dataset_attributes={"hand_runs": [4, 8, 12], "feet_runs": []},
    )  # fmt: skip
    dm.setup()
    yield dm, folder
    patch.undo()


def _edf_runs(subject):
    from mne.datasets import eegbci

    files = eegbci.load_data(subject, runs=[4, 8, 12], update_path=False)
    return [mne.io.read_raw_edf(f, preload=True, verbose=False) for f in files]


@needs_real_eeg
def test_edf_files_read_with_mne_give_the_data_modules_own_trials(physionet):
    dm, _ = physionet
    preprocessing = EEGPreprocessing.from_dict(dm.describe_preprocessing())
    assert preprocessing.channels[:3] == ("FC5", "FC3", "FC1") and len(preprocessing.channels) == 64
    assert (preprocessing.sampling_rate, preprocessing.n_samples) == (80.0, 240)
    assert preprocessing.classes == ("left_hand", "right_hand")
    x, y = preprocessing.prepare(_edf_runs(3), events=EVENTS)
    expected_x, expected_y, _ = dm.data["test"]
    torch.testing.assert_close(x, expected_x, rtol=0, atol=1e-6)
    assert torch.equal(y, expected_y)


@needs_real_eeg
def test_what_cannot_be_prepared_alike_is_refused_naming_it(physionet):
    dm, _ = physionet
    preprocessing = EEGPreprocessing.from_dict(dm.describe_preprocessing())
    raws = _edf_runs(3)
    dropped = [raw.copy().drop_channels(["Cz..", "Fc5."]) for raw in raws]
    with pytest.raises(ValueError, match=r"missing \['FC5', 'Cz'\] \(the network takes 64"):
        preprocessing.prepare(dropped, events=EVENTS)
    with pytest.raises(ValueError, match=r"`events` names classes \['feet'\]"):
        preprocessing.prepare(raws, events={**EVENTS, "feet": "T3"})
    with pytest.raises(ValueError, match="no cue annotated"):
        preprocessing.prepare(raws, events={"left_hand": "T7"})
    x = np.random.default_rng(0).normal(size=(3, 64, 240))
    names = list(preprocessing.channels)
    with pytest.raises(ValueError, match="sampled at 160 Hz, the network's at 80 Hz"):
        preprocessing.prepare(x, channel_names=names, sampling_rate=160)
    with pytest.raises(ValueError, match=r"200 samples, the network takes 240 \(0-3 s from"):
        preprocessing.prepare(x[:, :, :200], channel_names=names, sampling_rate=80)
    shuffled = np.random.default_rng(1).permutation(64)
    torch.testing.assert_close(
        preprocessing.prepare(x[:, shuffled], channel_names=[names[i] for i in shuffled],
                              sampling_rate=80),
        preprocessing.prepare(x, channel_names=names, sampling_rate=80),
    )  # fmt: skip


@needs_real_eeg
def test_a_fitted_module_keeps_the_preprocessing_in_its_checkpoints(physionet, tmp_path):
    dm, _ = physionet
    module = MAMLModule(EEGNet(64, 240, 2, sampling_rate=80), loss="cross_entropy", inner_lr=0.1)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    loaded = MAMLModule.load_from_checkpoint(tmp_path / "fitted.ckpt")
    assert EEGPreprocessing.of(loaded) == EEGPreprocessing.from_dict(dm.describe_preprocessing())
    with pytest.raises(ValueError, match="records no preprocessing"):
        EEGPreprocessing.of(MAMLModule(EEGNet(64, 240, 2, sampling_rate=80)))
