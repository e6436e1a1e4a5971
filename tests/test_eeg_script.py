"""scripts/eeg.py on real PhysioNet subjects: end to end with tiny settings, resumed after a
killed fold, and no query trial of a test subject in anything fitted."""

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks import REAL_EEG, needs_real_eeg

pytest.importorskip("moabb")
pytest.importorskip("pyriemann")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mne_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mne") / "mne_data"
    shutil.copytree(REAL_EEG, folder)  # MNE may write beside the recordings
    return folder


def _run(mne_data, out, *extra, methods="maml,joint,ensemble,csp-lda,ts-lr", selection="1,2"):
    command = [
        sys.executable, str(ROOT / "scripts" / "eeg.py"), "--mne-data", str(mne_data),
        "--subjects", "1-3", "--selection-subjects", selection, "--test-subjects", "3",
        "--methods", methods, "--k-shots", "1,5", "--episodes", "2",
        "--meta-steps", "2", "--eval-steps", "1,2", "--out", str(out), "--no-progress-bar",
        "--scratch-steps", "2", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, check=True, cwd=out.parent)


@needs_real_eeg
def test_the_script_end_to_end_and_resumed_after_a_killed_fold(mne_data, tmp_path):
    out = tmp_path / "eeg"
    first = _run(mne_data, out)
    table = (out / "results.md").read_text()
    report = json.loads((out / "results.json").read_text())
    assert "mne_data" not in report["args"]  # this machine's folder is no part of the result
    assert report["best_family_method"] == "maml"
    assert set(report["chosen"]) == {"maml", "joint", "ensemble"}
    methods = {s["method"] for s in report["summary"]}
    assert methods == {
        "MAML", "MAML (query batch)", "joint + fine-tuning", "joint + fine-tuning (query batch)",
        "MAML & TS+LR + K", "CSP+LDA zero-shot", "CSP+LDA + K",
        "TS+LR zero-shot", "TS+LR zero-shot (transductive)", "TS+LR + K",
    }  # fmt: skip
    assert all(s["subjects"] == [3] for s in report["summary"])
    assert "n/a (1 subject)" in first.stdout
    assert (out / "eeg_accuracy.png").exists() and (out / "eeg_subjects.png").exists()
    stored = {p: p.stat().st_mtime_ns for p in (out / "folds").glob("*.json")}
    assert len(stored) == 2 * 3 + 5  # selection: 2 folds x 3 network methods; test: 1 fold x 5
    killed = next(p for p in stored if json.loads(p.read_text())["method"] == "maml")
    killed.unlink()  # as if the run had been killed before this fold's maml finished
    _run(mne_data, out)
    assert (out / "results.md").read_text() == table  # the fold computed again, identically
    for path, mtime in stored.items():  # only the killed one computed again
        assert path.exists() and (path == killed or path.stat().st_mtime_ns == mtime)

    # another method scored later on the same episodes joins the table, compared with MAML
    merged = tmp_path / "merged"
    _run(mne_data, merged, "--merge", str(out / "results.json"), "--reference", "maml",
         methods="scratch", selection="")  # fmt: skip
    joined = json.loads((merged / "results.json").read_text())
    scratch = {"scratch", "scratch (query batch)"}
    assert {s["method"] for s in joined["summary"]} == methods | scratch
    earlier = {(s["method"], s["K"]): s["accuracy"] for s in report["summary"]}
    for s in joined["summary"]:
        if s["method"] not in scratch:
            assert s["accuracy"] == earlier[(s["method"], s["K"])]
    assert {d["versus"] for d in joined["differences"]} == methods - {"MAML"} | scratch
    with pytest.raises(subprocess.CalledProcessError) as refused:  # MAML twice: refused
        _run(mne_data, tmp_path / "twice", "--merge", str(out / "results.json"), methods="maml")
    assert "already holds ['maml']" in refused.value.stderr


def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("eeg")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_a_test_subjects_query_trials_reach_no_alignment_and_no_fit():
    eeg = _script()
    g = np.random.default_rng(0)
    x = torch.as_tensor(g.standard_normal((20, 4, 50)), dtype=torch.float32)
    y = torch.arange(2).repeat(10)
    episodes = [(np.array([0, 1, 2, 3]), np.arange(4, 20))]
    poisoned = x.clone()
    poisoned[4:] = 1e3 * torch.randn_like(poisoned[4:])
    clean_batch = eeg.episode_batch(x, y, episodes, align=True)
    poisoned_batch = eeg.episode_batch(poisoned, y, episodes, align=True)
    torch.testing.assert_close(poisoned_batch.support_x, clean_batch.support_x)
    # tangent space + LR calibrated on the support trials: the same fit either way
    covariances = lambda t: np.stack([a @ a.T / 50 + 1e-3 * np.eye(4) for a in t.double().numpy()])  # noqa: E731
    train = covariances(torch.as_tensor(g.standard_normal((30, 4, 50))))
    train_y = np.arange(2).repeat(15)
    fits = [
        eeg.ts_lr_calibrated((train, train_y, covariances(t), y.numpy()), episodes[0][0])[0]
        for t in (x, poisoned)
    ]
    np.testing.assert_array_equal(fits[0][-1].coef_, fits[1][-1].coef_)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--test-subjects", "3,3"], r"--test-subjects '3,3' names subjects \[3\] more than once"),
        (["--test-subjects="], r"--test-subjects '' names no subject"),
        (["--test-subjects", "3-2"], r"--test-subjects '3-2': the range '3-2' runs backwards"),
        (["--subjects", "a-c"], r"--subjects 'a-c': 'a-c' is not a subject number or a range"),
    ],
)
def test_subject_lists_are_checked_when_parsed_naming_the_option(arguments, message):
    command = [sys.executable, str(ROOT / "scripts" / "eeg.py"), *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr


def test_the_primary_score_classifies_each_query_trial_alone():
    # a query trial's class probabilities do not change when the other query trials do: the
    # calibrated network's BatchNorm takes its statistics from the support trials
    from lightning_maml import MAMLModule
    from lightning_maml.models import EEGNet

    eeg = _script()
    torch.manual_seed(0)
    module = MAMLModule(EEGNet(4, 64, 2, sampling_rate=32), loss="cross_entropy", inner_lr=0.1)
    x = torch.randn(20, 4, 64)
    y = torch.arange(2).repeat(10)
    episodes = [(np.array([0, 1, 2, 3]), np.arange(4, 20))]
    poisoned = x.clone()
    poisoned[5:] = 30 * torch.randn_like(poisoned[5:])  # every query trial but the first
    clean = eeg.single_trial_probabilities(module, eeg.episode_batch(x, y, episodes, False), 3)
    other = eeg.single_trial_probabilities(
        module, eeg.episode_batch(poisoned, y, episodes, False), 3
    )
    torch.testing.assert_close(clean[0][0], other[0][0])
    assert not torch.allclose(clean[0][1:], other[0][1:])  # the others did change
