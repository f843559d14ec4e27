import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
settings.register_profile("lowbit", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("lowbit")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
