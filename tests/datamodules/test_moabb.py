"""MOABBDataModule through MOABB's real loading path: FakeDataset, cache, errors, real PhysioNet."""

import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks import REAL_EEG, fake_motor_imagery, needs_real_eeg

pytest.importorskip("moabb")

from lightning_maml.datamodules import MOABBDataModule  # noqa: E402
from lightning_maml.datamodules.moabb import _read_cache, _write_cache  # noqa: E402


def _module(tmp_path, **kwargs):
    defaults = dict(
        paradigm="LeftRightImagery",
        paradigm_kwargs={"resample": 64},
        train_subjects=[1, 2],
        val_subjects=[3],
        test_subjects=[4],
        n_way=2,
        k_shot=3,
        query_size=4,
        meta_batch_size=2,
        cache_dir=str(tmp_path),
    )
    return MOABBDataModule(fake_motor_imagery(), **{**defaults, **kwargs})


def test_fake_dataset_episodes_and_standardisation(tmp_path):
    dm = _module(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 6, 3, 192) and batch.query_x.shape == (2, 8, 3, 192)
    assert batch.support_y[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert dm.classes == ["left_hand", "right_hand"]
    x, _, ids = dm.data["train"]
    subject1 = x[torch.as_tensor(ids == 1)]
    assert subject1.mean(dim=(0, 2)).abs().max() < 1e-4
    assert (subject1.std(dim=(0, 2)) - 1).abs().max() < 1e-2
    assert len(list(dm.val_dataloader())) == 50


def test_second_load_hits_the_cache(tmp_path, monkeypatch):
    dm = _module(tmp_path)
    dm.prepare_data()
    assert len(list(tmp_path.glob("*.npz"))) == 4
    again = _module(tmp_path)

    def no_mne(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(again.paradigm, "get_data", no_mne)
    again.prepare_data()
    again.setup()
    np.testing.assert_array_equal(again.data["train"][0].numpy(), _loaded(dm))
    # other paradigm settings are another cache entry
    other = _module(tmp_path, paradigm_kwargs={"resample": 32})
    other.prepare_data()
    assert len(list(tmp_path.glob("*.npz"))) == 8


def _loaded(dm):
    dm.setup()
    return dm.data["train"][0].numpy()


def test_bad_subjects_and_splits_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`val_subjects` holds subjects \[9\]"):
        _module(tmp_path, val_subjects=[9])
    with pytest.raises(ValueError, match="the subject splits overlap"):
        _module(tmp_path, val_subjects=[1])
    with pytest.raises(ValueError, match="`k_shot` must be an integer >= 1"):
        _module(tmp_path, k_shot=0)


def test_too_few_trials_for_the_episode_is_a_clear_error(tmp_path):
    dm = _module(tmp_path, k_shot=15, query_size=15)
    dm.setup()
    with pytest.raises(ValueError, match="task 1 has 0 classes with at least"):
        dm.train_dataloader()


def test_missing_files_offline_name_dataset_and_data_folder(tmp_path, monkeypatch):
    from moabb.datasets import PhysionetMI

    monkeypatch.setenv("MNE_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("MNE_DATASETS_EEGBCI_PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    dataset = PhysionetMI(imagined=True)
    dataset.feet_runs = []
    dm = MOABBDataModule(
        dataset,
        "LeftRightImagery",
        train_subjects=[2],
        val_subjects=[],
        test_subjects=[],
        cache_dir=None,
    )
    # the data folder does not exist, so MNE refuses before any download is tried
    with pytest.raises(
        RuntimeError,
        match=r"could not load subject 2 of PhysionetMotorImagery.*MNE data folder .*empty",
    ):
        dm.setup()


@needs_real_eeg
def test_real_physionet_subject_through_moabb(tmp_path, monkeypatch):
    from moabb.datasets import PhysionetMI

    data = tmp_path / "mne_data"
    shutil.copytree(REAL_EEG, data)
    for name in ("MNE_DATA", "MNE_DATASETS_EEGBCI_PATH"):
        monkeypatch.setenv(name, str(data))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    dataset = PhysionetMI()
    dataset.feet_runs = []
    kwargs = dict(
        paradigm="LeftRightImagery",
        train_subjects=[1],
        val_subjects=[],
        test_subjects=[],
        n_way=2,
        k_shot=5,
        query_size=5,
        meta_batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    start = time.perf_counter()
    dm = MOABBDataModule(dataset, **kwargs)
    dm.prepare_data()
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached = MOABBDataModule(dataset, **kwargs)
    cached.prepare_data()
    cached.setup()
    second = time.perf_counter() - start
    batch = next(iter(cached.train_dataloader()))
    assert batch.support_x.shape == (2, 10, 64, 481)
    assert cached.data["train"][0].shape == (45, 64, 481)
    assert second < first
    print(
        f"\nPhysionetMI subject 1: load {first:.1f} s, cached load {second:.2f} s, "
        f"episode support {tuple(batch.support_x.shape)}, query {tuple(batch.query_x.shape)}"
    )


def test_dataset_by_dotted_path_with_kwargs_and_clear_errors(tmp_path):
    path = "lightning_maml.datamodules.synthetic_eeg.SyntheticMotorImagery"
    dm = MOABBDataModule(path, dataset_kwargs={"n_subjects": 3}, cache_dir=None, test_fraction=0)
    assert type(dm.dataset).__name__ == "SyntheticMotorImagery"
    assert dm.dataset.subject_list == [1, 2, 3]
    with pytest.raises(ValueError, match="`dataset` 'no_such.Module': cannot import no_such"):
        MOABBDataModule("no_such.Module", cache_dir=None)
    with pytest.raises(ValueError, match="`dataset` 'NoSuchDataset' is not a class of moabb"):
        MOABBDataModule("NoSuchDataset", cache_dir=None)
    with pytest.raises(ValueError, match="`dataset_kwargs` is only used when `dataset` is a name"):
        MOABBDataModule(fake_motor_imagery(), dataset_kwargs={"n_subjects": 3}, cache_dir=None)


def _corrupt_zero_bytes(path):
    path.write_bytes(b"")


def _corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_garbage(path):
    path.write_bytes(b"not a zip file at all" * 100)


def _corrupt_values(path):
    # a valid file whose arrays no longer match their checksum
    with np.load(path) as cached:
        x, y, digest = cached["x"].copy(), cached["y"], cached["sha256"]
    x[0, 0, 0] += 1.0
    np.savez(path, x=x, y=y, sha256=digest)


def _corrupt_nan(path):
    with np.load(path) as cached:
        x, y, digest = cached["x"].copy(), cached["y"], cached["sha256"]
    x[0, 0, 0] = np.nan
    np.savez(path, x=x, y=y, sha256=digest)


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_zero_bytes, _corrupt_truncate, _corrupt_garbage, _corrupt_values, _corrupt_nan],
)
def test_a_bad_cache_file_is_named_and_rebuilt(tmp_path, corrupt):
    dm = _module(tmp_path)
    dm.prepare_data()
    expected = _loaded(dm)
    path = dm._cache_path(1)
    corrupt(path)
    again = _module(tmp_path)
    with pytest.warns(UserWarning, match=f"cache file {path} is .*; rebuilding it"):
        again.prepare_data()
    np.testing.assert_array_equal(_loaded(again), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: read cleanly from now on
        np.testing.assert_array_equal(_loaded(_module(tmp_path)), expected)


def test_a_write_that_dies_leaves_no_cache_file(tmp_path, monkeypatch):
    dm = _module(tmp_path)

    def killed(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_and_readers_of_one_cache_file(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 3, 64)).astype(np.float32)
    y = np.array(["left_hand", "right_hand"] * 10)
    path = tmp_path / "subject.npz"
    _write_cache(path, x, y)
    problems = []

    def write():
        for _ in range(30):
            _write_cache(path, x, y)

    def read():
        for _ in range(60):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = _read_cache(path)
            if got is None or caught:
                problems.append([str(w.message) for w in caught])

    threads = [threading.Thread(target=f) for f in (write, write, read, read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subject.npz"]


def test_the_cache_key_covers_the_dataset_settings(tmp_path):
    from moabb.datasets import PhysionetMI

    from lightning_maml.datamodules.synthetic_eeg import SyntheticMotorImagery

    def path(dataset):
        return MOABBDataModule(dataset, cache_dir=str(tmp_path), train_subjects=[1])._cache_path(1)

    assert path(SyntheticMotorImagery()) == path(SyntheticMotorImagery())
    assert path(SyntheticMotorImagery()) != path(SyntheticMotorImagery(trials_per_class=40, snr=5))
    assert path(PhysionetMI()) != path(PhysionetMI(imagined=True, executed=True))
    restricted = PhysionetMI()
    restricted.hand_runs = [4]
    assert path(restricted) != path(PhysionetMI())


def test_the_data_folder_hint_is_given_for_download_errors_only(tmp_path, monkeypatch):
    import requests

    dm = _module(tmp_path, cache_dir=None)
    causes = {
        ValueError("lowpass frequency 50 Hz is above the Nyquist frequency 32 Hz"): False,
        requests.exceptions.ConnectionError("Max retries exceeded"): True,
        FileNotFoundError("Download location does not exist"): True,
    }
    for cause, hint in causes.items():

        def fail(*args, cause=cause, **kwargs):
            raise cause

        monkeypatch.setattr(dm.paradigm, "get_data", fail)
        with pytest.raises(RuntimeError, match="could not load subject 1 of FakeDataset") as info:
            dm.load_subject(1)
        assert ("Without network access" in str(info.value)) == hint, str(info.value)
        assert str(cause) in str(info.value)


def test_a_failed_download_leaves_no_empty_folders_and_one_short_error(tmp_path, monkeypatch):
    import requests

    data_folder = tmp_path / "mne_data"
    (data_folder / "kept").mkdir(parents=True)  # there before: stays, even though empty
    monkeypatch.setenv("MNE_DATA", str(data_folder))
    dm = _module(tmp_path, cache_dir=None)

    def fail(*args, **kwargs):
        (data_folder / "MNE-x-data" / "files" / "S001").mkdir(parents=True)
        (data_folder / "partial").mkdir()
        (data_folder / "partial" / "file.edf").write_text("")  # not empty: kept
        try:
            raise TimeoutError("read timed out")
        except TimeoutError as inner:
            raise requests.exceptions.ConnectionError("Max retries exceeded") from inner

    monkeypatch.setattr(dm.paradigm, "get_data", fail)
    with pytest.raises(
        RuntimeError, match=f"Max retries exceeded.*MNE looked for them in '{data_folder}'"
    ) as info:
        dm.load_subject(1)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert sorted(p.name for p in data_folder.iterdir()) == ["kept", "partial"]


def test_empty_data_folder_settings_name_the_folder_mne_used_and_leave_it_clean(
    tmp_path, monkeypatch
):
    import requests

    # `export MNE_DATA=$(realpath missing/folder)` exports an empty value: MNE then writes to
    # the current folder
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MNE_DATA", "")
    monkeypatch.setenv("MNE_DATASETS_EEGBCI_PATH", "")
    dm = _module(tmp_path / "cache", cache_dir=None)

    def fail(*args, **kwargs):
        (work / "MNE-eegbci-data" / "files" / "S005").mkdir(parents=True)
        raise requests.exceptions.ConnectionError("Failed to resolve 'physionet.org'")

    monkeypatch.setattr(dm.paradigm, "get_data", fail)
    with pytest.raises(RuntimeError, match=f"MNE looked for them in '{work}'"):
        dm.load_subject(5)
    assert list(work.iterdir()) == []


@needs_real_eeg
def test_the_shipped_physionet_config_trains_on_real_subjects(tmp_path, monkeypatch):
    """The real path end to end, offline: the shipped config meta-trains on all 19 subjects (its
    data, checked); one short fold of it (subjects 1-3 meta-train, 4 validates, 5 is held out)
    loads them through MOABB's PhysionetMI and LeftRightImagery from a copy of the data,
    meta-trains and tests."""
    import yaml

    from lightning_maml.cli import build_cli

    data = tmp_path / "mne_data"
    shutil.copytree(REAL_EEG, data)
    for name in ("MNE_DATA", "MNE_DATASETS_EEGBCI_PATH"):
        monkeypatch.setenv(name, str(data))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    config = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "configs" / "eeg_physionet.yaml").read_text()
    )
    shipped = config["data"]["init_args"]
    assert shipped["train_subjects"] == list(range(1, 20))
    assert shipped["dataset_attributes"]["hand_runs"] == [4, 8, 12]
    config["trainer"].update(max_steps=2, enable_progress_bar=False, default_root_dir=str(tmp_path))
    config["trainer"].pop("limit_val_batches")
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    shipped.update(num_eval_episodes=2, episodes_per_epoch=8)
    shipped.update(train_subjects=[1, 2, 3], val_subjects=[4], test_subjects=[5])
    path = tmp_path / "physionet.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    dm = cli.datamodule
    assert dm.classes == ["left_hand", "right_hand"]
    assert set(dm.data) == {"train", "val"}  # the config names the classes: fit loads these
    metrics = cli.trainer.test(cli.model, datamodule=dm, verbose=False)[0]
    assert 0.0 <= metrics["test/query_acc_after"] <= 1.0
    shapes = {split: tuple(x.shape) for split, (x, _, _) in dm.data.items()}
    assert shapes == {"train": (135, 64, 240), "val": (45, 64, 240), "test": (45, 64, 240)}
    subjects = {split: sorted(set(ids.tolist())) for split, (_, _, ids) in dm.data.items()}
    assert subjects == {"train": [1, 2, 3], "val": [4], "test": [5]}
    # each trial standardised on its own
    x = dm.data["test"][0]
    assert torch.allclose(x.mean(dim=2), torch.zeros(()), atol=1e-4)


def test_a_cache_folder_that_cannot_be_written_loads_without_caching(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # a cache folder below a file cannot be created, root or not
    expected = _loaded(_module(tmp_path / "writable"))
    dm = _module(tmp_path, cache_dir=str(blocked / "cache"))
    with pytest.warns(UserWarning, match=f"cannot write the cache folder '{blocked / 'cache'}'"):
        dm.prepare_data()
        dm.setup("fit")
    assert dm.cache_dir is None  # one warning, no further attempts
    np.testing.assert_array_equal(dm.data["train"][0].numpy(), expected)


def test_a_cache_file_that_cannot_replace_anothers_is_not_fatal(tmp_path, monkeypatch):
    # a sticky shared folder: another user's file cannot be replaced
    def refuse(source, target):
        raise PermissionError(1, "Operation not permitted", str(target))

    monkeypatch.setattr("lightning_maml.datamodules.moabb.os.replace", refuse)
    dm = _module(tmp_path)
    with pytest.warns(UserWarning, match="PermissionError"):
        dm.prepare_data()
    dm.setup("fit")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_cache_files_get_the_umasks_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        _write_cache(
            tmp_path / "subject.npz", np.zeros((2, 1, 4), np.float32), np.array(["a", "b"])
        )
    finally:
        os.umask(old)
    assert (tmp_path / "subject.npz").stat().st_mode & 0o777 == mode


def _numpy_alignment(trials):
    # R^{-1/2} of the mean spatial covariance, written directly in numpy
    covariance = np.mean([t @ t.T / t.shape[1] for t in trials.astype(np.float64)], axis=0)
    values, vectors = np.linalg.eigh(covariance)
    return vectors @ np.diag(values**-0.5) @ vectors.T


def test_alignment_matrix_equals_a_direct_numpy_computation():
    from lightning_maml.datamodules.alignment import alignment_matrix

    trials = np.random.default_rng(0).standard_normal((7, 5, 60)) * np.arange(1, 6)[:, None]
    np.testing.assert_allclose(alignment_matrix(trials).numpy(), _numpy_alignment(trials), 1e-10)


def test_euclidean_alignment_of_training_subjects_and_of_held_out_episodes_by_support_alone(
    tmp_path,
):
    plain = _module(tmp_path, standardize="trial")
    plain.prepare_data()
    plain.setup("fit")
    aligned = _module(tmp_path, standardize="trial", alignment="euclidean")
    aligned.setup("fit")
    # a training subject: by all of its own (standardised) trials
    x, _, ids = plain.data["train"]
    subject = x[torch.as_tensor(ids == 1)].numpy()
    expected = _numpy_alignment(subject) @ subject.astype(np.float64)
    got = aligned.data["train"][0][torch.as_tensor(ids == 1)].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # a held-out subject's episode: by its support trials alone
    raw, aligned_episode = plain.episodes("test")[3], aligned.episodes("test")[3]
    matrix = _numpy_alignment(raw.support_x.numpy())
    for field in ("support_x", "query_x"):
        expected = matrix @ getattr(raw, field).numpy().astype(np.float64)
        np.testing.assert_allclose(getattr(aligned_episode, field).numpy(), expected, 1e-4, 1e-5)


def test_no_query_trial_of_a_held_out_subject_reaches_anything_fitted(tmp_path):
    plain = _module(tmp_path, standardize="trial")
    plain.prepare_data()
    plain.setup("fit")
    support = {tuple(t.flatten()[:8].tolist()) for t in plain.episodes("test")[0].support_x}

    def first_episode(poison, alignment="euclidean"):
        dm = _module(tmp_path, standardize="trial", alignment=alignment)
        dm.setup("fit")
        if poison:  # every trial of the held-out subject outside the episode's support set
            x = dm.data["test"][0]
            for i in range(len(x)):
                if tuple(x[i].flatten()[:8].tolist()) not in support:
                    x[i] = 1e3 * torch.randn_like(x[i])
        return dm.episodes("test")[0]

    clean, poisoned = first_episode(poison=False), first_episode(poison=True)
    torch.testing.assert_close(poisoned.support_x, clean.support_x)  # as aligned: unchanged
    assert not torch.allclose(poisoned.query_x, clean.query_x)  # the query trials were poisoned
    # the transductive variant does use them
    transductive = first_episode(poison=False, alignment="euclidean-transductive")
    assert not torch.allclose(transductive.support_x, clean.support_x)


def test_an_unknown_alignment_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`alignment` must be one of .*'euclidean'.*got 'ea'"):
        _module(tmp_path, alignment="ea")


@needs_real_eeg
def test_loading_a_real_subject_prints_and_warns_nothing_a_user_cannot_act_on(
    tmp_path, monkeypatch, capfd
):
    from moabb.datasets import PhysionetMI

    data = tmp_path / "mne_data"
    shutil.copytree(REAL_EEG, data)
    for key in ("MNE_DATA", "MNE_DATASETS_EEGBCI_PATH"):
        monkeypatch.setenv(key, str(data))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    dm = MOABBDataModule(
        PhysionetMI(imagined=True, executed=False), "LeftRightImagery", {"resample": 80},
        train_subjects=[1], val_subjects=[], test_subjects=[2], cache_dir=None,
        dataset_attributes={"hand_runs": [4], "feet_runs": []},
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, _ = dm.load_subject(1)
    assert x.shape == (15, 64, 240)
    assert not [str(w.message) for w in caught if "Montage" in str(w.message)]
    printed = capfd.readouterr()
    assert "Used Annotations" not in printed.out + printed.err
    assert "Montage name" not in printed.out + printed.err


def test_a_rank_deficient_support_is_shrunk_with_a_warning_not_amplified_thousands_of_times():
    from lightning_maml.datamodules.alignment import SHRINK_FLOOR, align, alignment_matrix

    rng = np.random.default_rng(0)
    query = torch.as_tensor(rng.standard_normal((5, 16, 40)))
    short = torch.as_tensor(rng.standard_normal((1, 16, 10)))  # 10 samples for 16 channels
    with pytest.warns(UserWarning, match=r"rank-deficient \(1 trial\(s\) of 10 samples for 16 "):
        matrix = alignment_matrix(short)
    gain = align(query, matrix).std() / query.std()
    assert gain < 1 / SHRINK_FLOOR**0.5 * 1.5  # without shrinkage: over 10^4
    dead = torch.as_tensor(rng.standard_normal((6, 16, 40)))
    dead[:, 5] = 0.0  # a dead electrode in the calibration trials only
    with pytest.warns(UserWarning, match=r"channels \[5\] flat in these trials"):
        matrix = alignment_matrix(dead)
    assert align(query, matrix)[:, 5].std() / query[:, 5].std() < 1 / SHRINK_FLOOR**0.5 * 1.5
    with warnings.catch_warnings():  # a healthy estimate is left alone, silently
        warnings.simplefilter("error")
        healthy = torch.as_tensor(rng.standard_normal((6, 16, 40)))
        np.testing.assert_allclose(
            alignment_matrix(healthy).numpy(), _numpy_alignment(healthy.numpy()), 1e-10
        )


def test_alignment_names_bad_trials_and_takes_what_alignment_matrix_takes():
    from lightning_maml.datamodules.alignment import align, alignment_matrix

    x = np.random.default_rng(1).standard_normal((4, 3, 50))
    x[2, 1, 7] = np.nan
    with pytest.raises(ValueError, match=r"`trials` holds NaN or inf in trials \[2\] \(of 4\)"):
        alignment_matrix(x)
    with pytest.raises(ValueError, match="are all zero"):
        alignment_matrix(np.zeros((4, 3, 50)))
    counts = np.random.default_rng(2).integers(-50, 50, (4, 3, 50))  # integer trials
    aligned = align(counts, alignment_matrix(counts))  # NumPy arrays, as alignment_matrix takes
    assert aligned.is_floating_point() and aligned.abs().sum() > 0
    covariance = (aligned @ aligned.transpose(1, 2)).mean(0) / 50
    torch.testing.assert_close(covariance, torch.eye(3), rtol=1e-4, atol=1e-4)


def test_with_classes_given_test_and_predict_load_the_test_subjects_alone(tmp_path, monkeypatch):
    dm = _module(tmp_path, cache_dir=None, classes=["left_hand", "right_hand"])
    loads = []
    load = dm.load_subject
    monkeypatch.setattr(dm, "load_subject", lambda s: loads.append(s) or load(s))
    dm.setup("predict")
    assert loads == [4] and set(dm.data) == {"test"}
    dm.setup("fit")  # the rest when fitting
    assert loads == [4, 1, 2, 3] and set(dm.data) == {"train", "val", "test"}
    everyone = _module(tmp_path, cache_dir=None)
    everyone.setup("predict")  # without classes: every subject, to find the labels
    for split in dm.data:
        torch.testing.assert_close(dm.data[split][0], everyone.data[split][0])
        assert torch.equal(dm.data[split][1], everyone.data[split][1])
    with pytest.raises(ValueError, match=r"hold labels \['right_hand'\] that `classes`"):
        _module(tmp_path, cache_dir=None, classes=["left_hand"]).setup("test")
    with pytest.raises(ValueError, match="`classes` must name each class once"):
        _module(tmp_path, classes=["a", "a"])
