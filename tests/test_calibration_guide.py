"""The calibration guide (docs/calibration.md) as a new user runs it: its meta-training command
(cut to a few steps on two subjects), then its Python walk from the checkpoint and subject 19's
EDF files to single-trial predictions, in a temporary working directory."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
from tasks import REAL_EEG, needs_real_eeg

pytest.importorskip("moabb")

from lightning_maml.cli import build_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "calibration.md").read_text()


@needs_real_eeg
def test_the_guide_walks_from_recordings_to_single_trial_predictions(tmp_path, monkeypatch):
    data = tmp_path / "mne_data"
    shutil.copytree(REAL_EEG, data)  # MNE may write beside the recordings
    for name in ("MNE_DATA", "MNE_DATASETS_EEGBCI_PATH"):
        monkeypatch.setenv(name, str(data))
    monkeypatch.setenv("MOABB_DOWNLOAD_PROVIDER", "upstream")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")

    bash = re.search(r"```bash\n(.*?)```", PAGE, re.S).group(1)
    (command,) = [line for line in bash.splitlines() if line.startswith("lightning-maml fit")]
    arguments = shlex.split(command)[1:]
    assert "19" not in arguments[-1] and "18" in arguments[-1]  # subject 19 is held out
    short = ["--trainer.max_steps=2", "--data.init_args.train_subjects=[1, 2]",
             "--data.init_args.episodes_per_epoch=4",
             "--trainer.enable_progress_bar=false"]  # fmt: skip
    build_cli([*arguments, *short])

    (walk,) = re.findall(r"```python\n(.*?)```", PAGE, re.S)[:1]
    namespace = {"__name__": "__guide__"}
    exec(compile(walk, "docs/calibration.md:0", "exec"), namespace)
    assert namespace["trials"].shape == (45, 64, 240)
    assert len(namespace["later"]) == 35 and 0.0 <= namespace["accuracy"] <= 1.0
    assert (tmp_path / "subject19.pt").exists()
