"""Every Python block of the README runs as written (with training cut to a few steps), in a
temporary working directory."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "moabb" in code:
        pytest.importorskip("moabb")
    shortened = re.sub(r"max_(steps|epochs)=[\d_]+", "max_steps=3", code)
    assert shortened == code or "max_steps" in code or "max_epochs" in code
    monkeypatch.chdir(tmp_path)  # Trainers write logs and checkpoints into the working directory
    exec(compile(shortened, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
