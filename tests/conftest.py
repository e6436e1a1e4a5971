import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_restore_rng():
    """Every test starts from the same seeds, and leaves numpy's global RNG as it found it."""
    state = np.random.get_state()
    torch.manual_seed(0)
    yield
    np.random.set_state(state)
