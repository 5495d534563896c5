import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's test command runs two pytest-xdist workers (a file each at a time): each gets its
    # share of the cores, so their intra-op threads do not fight over them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def fresh_dynamo():
    """Forget every compiled graph before and after the test (modules opt in with usefixtures)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
