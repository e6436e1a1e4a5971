"""scripts/eeg.py, the command line over lightning_maml.study, on real PhysioNet subjects: end to
end with tiny settings (selection, every kind of method), resumed after a killed fold, merged
with a later run; its arguments checked when parsed."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tasks import REAL_EEG, needs_real_eeg

pytest.importorskip("moabb")
pytest.importorskip("pyriemann")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mne_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mne") / "mne_data"
    shutil.copytree(REAL_EEG, folder)  # MNE may write beside the recordings
    return folder


def _run(mne_data, out, *extra, methods="maml,joint,ensemble,csp-lda,ts-lr,rpa", selection="1,2"):
    command = [
        sys.executable, str(ROOT / "scripts" / "eeg.py"), "--mne-data", str(mne_data),
        "--subjects", "1-3", "--selection-subjects", selection, "--test-subjects", "3",
        "--folds", "loso", "--methods", methods, "--k-shots", "1,5", "--rpa-k-shots", "5",
        "--episodes", "2", "--meta-steps", "2", "--eval-steps", "1,2", "--out", str(out),
        "--no-progress-bar", "--scratch-steps", "2", *extra,
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
    assert report["chosen"]["ensemble"] == report["chosen"]["maml"]
    methods = {s["method"] for s in report["summary"]}
    assert methods == {
        "MAML", "joint + fine-tuning", "MAML & TS+LR + K", "CSP+LDA zero-shot", "CSP+LDA + K",
        "TS+LR zero-shot", "TS+LR zero-shot (transductive)", "TS+LR + K", "RPA + K",
    }  # fmt: skip
    assert [s["K"] for s in report["summary"] if s["method"] == "RPA + K"] == [5]
    assert all(s["subjects"] == [3] for s in report["summary"])
    assert report["reference"] == "MAML & TS+LR + K"
    assert "n/a (1 subject)" in first.stdout
    assert (out / "eeg_accuracy.png").exists() and (out / "eeg_subjects.png").exists()
    stored = {p: p.stat().st_mtime_ns for p in (out / "folds").glob("*.json")}
    # selection: 2 folds x 8 candidates (maml and joint, 2 alignments x 2 step counts);
    # test: 1 fold x 9 methods
    assert len(stored) == 2 * 8 + 9
    killed = next(p for p in stored if json.loads(p.read_text())["method"] == "MAML")
    killed.unlink()  # as if the run had been killed before this fold's MAML finished
    # resumed with two worker processes: a function of the main script is __mp_main__.eegnet
    # there, yet the result is stored under this process's name, once
    _run(mne_data, out, "--workers", "2")
    assert (out / "results.md").read_text() == table  # the fold computed again, identically
    for path, mtime in stored.items():  # only the killed one computed again
        assert path.exists() and (path == killed or path.stat().st_mtime_ns == mtime)
    assert len(list((out / "folds").glob("*.json"))) == len(stored)

    # another method scored later on the same episodes joins the table, compared with MAML
    merged = tmp_path / "merged"
    _run(mne_data, merged, "--merge", str(out / "results.json"), "--reference", "maml",
         methods="scratch", selection="")  # fmt: skip
    joined = json.loads((merged / "results.json").read_text())
    assert {s["method"] for s in joined["summary"]} == methods | {"scratch"}
    earlier = {(s["method"], s["K"]): s["accuracy"] for s in report["summary"]}
    for s in joined["summary"]:
        if s["method"] != "scratch":
            assert s["accuracy"] == earlier[(s["method"], s["K"])]
    assert {d["versus"] for d in joined["differences"]} == methods - {"MAML"} | {"scratch"}
    with pytest.raises(subprocess.CalledProcessError) as refused:  # MAML twice: refused
        _run(mne_data, tmp_path / "twice", "--merge", str(out / "results.json"), methods="maml")
    assert "already holds ['maml']" in refused.value.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--test-subjects", "3,3"], r"--test-subjects '3,3' names subjects \[3\] more than once"),
        (["--test-subjects="], r"--test-subjects '' names no subject"),
        (["--test-subjects", "3-2"], r"--test-subjects '3-2': the range '3-2' runs backwards"),
        (["--subjects", "a-c"], r"--subjects 'a-c': 'a-c' is not a subject number or a range"),
        (["--folds", "0"], r"--folds '0': 'loso' or a number from 1 to the 19 test subjects"),
        (["--rpa-k-shots", "3"], r"--rpa-k-shots \[3\] must be among --k-shots \[1, 5, 10\]"),
        (["--selection-methods", "ensemble"], r"other than ensemble"),
    ],
)
def test_subject_lists_are_checked_when_parsed_naming_the_option(arguments, message):
    command = [sys.executable, str(ROOT / "scripts" / "eeg.py"), *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
