import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))  # bench scripts import their siblings by name
SHARED_ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar-10-python.tar.gz")


@pytest.fixture
def real_archive():
    if not os.path.exists(SHARED_ARCHIVE):
        pytest.skip(f"real CIFAR-10 archive absent at {SHARED_ARCHIVE}")
    return SHARED_ARCHIVE


@pytest.fixture
def one_thread():
    """Batches of 8 gain nothing from a second thread, and on a loaded 2-core machine two
    threads wait on each other (5x slower): keep the test fast wherever it runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cifar(tmp_path):
    """A CIFAR-10 archive in the official layout (Python-2 style pickles with bytes keys),
    with 16 images per training batch and 20 test images, so a run takes seconds."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    sizes = {f"data_batch_{i}": 16 for i in range(1, 6)}
    sizes["test_batch"] = 20
    for name, n in sizes.items():
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return str(archive)
