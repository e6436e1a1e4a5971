"""Every Python block of the README and of the documentation site runs as written (with training
cut to a few steps), in a temporary working directory; a walk that needs a meta-trained
checkpoint and recordings runs in a test of its own, which sets them up (``OWN_TEST``)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: blocks run by a test of their own
OWN_TEST = {
    "docs/calibration.md:0": "tests/test_calibration_guide.py",
    "docs/eeg.md:2": "tests/test_study.py",  # the PhysioNet study, on 3 subjects
}
BLOCKS = {
    f"{page.relative_to(ROOT)}:{index}": code
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
    if f"{page.relative_to(ROOT)}:{index}" not in OWN_TEST
}


def test_the_readme_and_the_guides_have_python_blocks():
    assert sum(key.startswith("README.md") for key in BLOCKS) >= 1
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("key", list(BLOCKS))
def test_python_block_runs(key, tmp_path, monkeypatch):
    code = BLOCKS[key]
    if "moabb" in code:
        pytest.importorskip("moabb")
    shortened = re.sub(r"max_(steps|epochs)=[\d_]+", "max_steps=3", code)
    assert shortened == code or "max_steps" in code or "max_epochs" in code
    monkeypatch.chdir(tmp_path)  # Trainers write logs and checkpoints into the working directory
    exec(compile(shortened, key, "exec"), {"__name__": "__readme__"})
