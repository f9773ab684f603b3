import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar-10-python.tar.gz")


@pytest.fixture
def real_archive():
    if not os.path.exists(SHARED_ARCHIVE):
        pytest.skip(f"real CIFAR-10 archive absent at {SHARED_ARCHIVE}")
    return SHARED_ARCHIVE
