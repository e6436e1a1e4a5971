"""SyntheticMotorImagery: a MOABB dataset with the documented class signal, learnable by MAML."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("moabb")
import lightning.pytorch as pl  # noqa: E402
import mne  # noqa: E402
from moabb.paradigms import LeftRightImagery, MotorImagery  # noqa: E402
from scipy.signal import welch  # noqa: E402
from tasks import quiet_trainer  # noqa: E402

from lightning_maml import MAMLModule  # noqa: E402
from lightning_maml.datamodules import MOABBDataModule  # noqa: E402
from lightning_maml.datamodules.synthetic_eeg import SyntheticMotorImagery  # noqa: E402
from lightning_maml.functional import IMAML  # noqa: E402
from lightning_maml.models import EEGNet  # noqa: E402

mne.set_log_level("error")


def test_moabb_paradigms_cut_it_like_any_dataset():
    dataset = SyntheticMotorImagery(n_subjects=3, trials_per_class=12)
    x, y, meta = MotorImagery(n_classes=3, resample=64).get_data(dataset, subjects=[1, 2])
    assert x.shape == (72, 13, 192)  # 3 classes x 12 trials x 2 subjects, 3 s at 64 Hz
    assert sorted(np.unique(y, return_counts=True)[1].tolist()) == [24, 24, 24]
    assert sorted(set(meta.subject)) == [1, 2]
    again, _, _ = MotorImagery(n_classes=3, resample=64).get_data(
        SyntheticMotorImagery(n_subjects=3, trials_per_class=12), subjects=[1, 2]
    )
    np.testing.assert_array_equal(x, again)  # seeded per subject
    assert not np.allclose(x[:36], x[36:])  # subjects differ


def _mu_power(x, sfreq, frequency):
    f, psd = welch(x, fs=sfreq, nperseg=int(sfreq))
    band = (f >= frequency - 1.5) & (f <= frequency + 1.5)
    return psd[..., band].mean(-1)


@pytest.mark.parametrize("ers_fraction, sign", [(0.0, -1.0), (1.0, 1.0)])
def test_imagery_changes_contralateral_mu_power_as_documented(ers_fraction, sign):
    dataset = SyntheticMotorImagery(n_subjects=1, trials_per_class=30, ers_fraction=ers_fraction)
    profile = dataset.subject_profile(1)
    assert profile["sign"] == sign
    x, y, _ = LeftRightImagery().get_data(dataset, subjects=[1])
    channels = list(dataset.channels)
    power = _mu_power(x, dataset.sfreq, profile["mu_frequency"])
    left, right = power[y == "left_hand"].mean(0), power[y == "right_hand"].mean(0)
    c3, c4 = channels.index("C3"), channels.index("C4")
    # left-hand imagery modulates C4 (right motor cortex), right-hand imagery C3
    assert sign * (left[c4] - right[c4]) > 0.2 * right[c4]
    assert sign * (right[c3] - left[c3]) > 0.2 * left[c3]


@pytest.mark.parametrize("algorithm", ["maml", "protomaml", "imaml"])
@pytest.mark.filterwarnings("ignore:non-finite values at training step")
def test_short_maml_run_is_well_above_chance_on_held_out_subjects(algorithm):
    pl.seed_everything(0)
    data = MOABBDataModule(
        SyntheticMotorImagery(n_subjects=8, trials_per_class=25),
        "LeftRightImagery",
        {"resample": 64},
        train_subjects=[1, 2, 3, 4, 5, 6],
        val_subjects=[],
        test_subjects=[7, 8],
        n_way=2,
        k_shot=5,
        query_size=10,
        meta_batch_size=4,
        episodes_per_epoch=40,
        num_eval_episodes=40,
        cache_dir=None,
    )
    # ProtoMAML's prototype head is a plain linear layer; iMAML with lam = 1 / inner_lr
    net = EEGNet(13, 192, 2, sampling_rate=64, dropout=0.0,
                 dense_max_norm=None if algorithm == "protomaml" else 0.25)  # fmt: skip
    module = MAMLModule(
        net, loss="cross_entropy", inner_lr=0.1, inner_steps=1, eval_inner_steps=5, meta_lr=3e-3,
        algorithm=IMAML(lam=10.0) if algorithm == "imaml" else algorithm,
        on_nonfinite="skip",  # iMAML: steps without an implicit gradient (counted below)
    )  # fmt: skip
    trainer = quiet_trainer(max_steps=80, limit_val_batches=0)
    (untrained,) = trainer.test(module, data, verbose=False)
    trainer.fit(module, data)
    (result,) = trainer.test(module, data, verbose=False)
    # 2-way: chance is 0.5; 40 episodes x 20 query trials on two unseen subjects
    assert module.nonfinite_steps <= (10 if algorithm == "imaml" else 0)  # iMAML: 6 of 80 here
    assert result["test/query_acc_after"] > 0.8
    assert result["test/query_acc_after"] > untrained["test/query_acc_after"] + 0.15


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="`events` must be a non-empty subset"):
        SyntheticMotorImagery(events=("tongue",))
    with pytest.raises(ValueError, match=r"`channels` \['XX'\] are not 10-05 channel names"):
        SyntheticMotorImagery(channels=("C3", "XX"))
    with pytest.raises(ValueError, match="`trials_per_class` must be an integer >= 1, got 0"):
        SyntheticMotorImagery(trials_per_class=0)
    with pytest.raises(ValueError, match=r"`modulation` must be in \[0.0, 0.9\], got 1.5"):
        SyntheticMotorImagery(modulation=1.5)


def test_same_tensors_whatever_the_torch_seed():
    a = SyntheticMotorImagery(n_subjects=1, trials_per_class=2)._get_single_subject_data(1)
    torch.manual_seed(123)
    np.random.seed(7)
    b = SyntheticMotorImagery(n_subjects=1, trials_per_class=2)._get_single_subject_data(1)
    np.testing.assert_array_equal(a["0"]["0"].get_data(), b["0"]["0"].get_data())


def test_get_data_leaves_the_environment_as_it_found_it(monkeypatch):
    dataset = SyntheticMotorImagery(n_subjects=1, trials_per_class=4)
    key = f"MNE_DATASETS_{dataset.code.upper()}_PATH"
    monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(mne, "get_config", lambda *args, **kwargs: None)  # no configured folder
    seen = []
    original = type(dataset).__mro__[1].get_data

    def spy(self, *args, **kwargs):
        seen.append(os.environ.get(key))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(dataset).__mro__[1], "get_data", spy)
    x, _, _ = LeftRightImagery().get_data(dataset, subjects=[1])
    assert len(x) == 8
    assert seen and seen[0] is not None and not os.path.exists(seen[0])  # a folder for the call
    assert key not in os.environ
