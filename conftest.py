"""Collection rules for the whole checkout (tests and the package's doctests).

- Without the ``eeg`` extra (MNE, MOABB) the EEG modules' doctests are not collected (their test
  files skip themselves); the report header says so.
- Tests never write into the checkout: every file outside the virtual environments, caches and
  ``.git`` is listed before and after the session, and a change fails the run.
- Tests run on one torch intra-op thread, as do the processes they start: torch's default, one
  per core, collapses when another process shares the cores (a busy machine: one test took 23 min
  on the default threads, under 5 min on one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# before torch is imported here, for the processes the tests start (subprocesses, DDP workers)
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).parent
_EEG_MODULES = [
    "lightning_maml/datamodules/synthetic_eeg.py",
    "lightning_maml/datamodules/moabb.py",
    "lightning_maml/datamodules/recordings.py",
]
_NOT_CHECKOUT = {".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".ruff_cache"}

try:
    import mne  # noqa: F401
    import moabb  # noqa: F401

    EEG_EXTRA = True
except ImportError:
    EEG_EXTRA = False

collect_ignore = [] if EEG_EXTRA else list(_EEG_MODULES)


def pytest_report_header(config: pytest.Config) -> str | None:
    if EEG_EXTRA:
        return None
    return f"eeg extra (mne, moabb) not installed: doctests of {', '.join(_EEG_MODULES)} skipped"


def _checkout_files() -> dict[str, tuple[int, int]]:
    files = {}
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [
            d for d in subfolders if d not in _NOT_CHECKOUT and not d.endswith(".egg-info")
        ]
        for name in names:
            path = Path(folder, name)
            stat = path.stat()
            files[str(path.relative_to(ROOT))] = (stat.st_size, stat.st_mtime_ns)
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _checkout_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    after = _checkout_files()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                "tests wrote into the checkout: " + ", ".join(changed), red=True, bold=True
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[dict]()
