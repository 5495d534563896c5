import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch


@pytest.fixture
def fresh_dynamo():
    """Forget every compiled graph before and after the test (modules opt in with usefixtures)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
