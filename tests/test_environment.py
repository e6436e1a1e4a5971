"""What the suite runs under (conftest.py): one torch thread, in its processes too."""

import os
import subprocess
import sys

import torch


def test_the_suite_and_the_processes_it_starts_run_on_one_thread():
    assert torch.get_num_threads() == 1
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert child.stdout.strip() == "1" and os.environ["OMP_NUM_THREADS"] == "1"
