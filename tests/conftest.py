import io
import os
import pickle
import struct
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


# ----------------------------------------------------------------------------------------------
# Tiny CIFAR-10 data sets in the official layout

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as the official batch files hold them."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_archive(path, batches, folder="cifar-10-batches-py", meta=False, mode="w:gz"):
    """batches: file name -> batch dict (pickled as the official files are) or raw bytes;
    mode "w": an uncompressed tar, whose size does not depend on the bytes it holds."""
    files = dict(batches)
    if meta:
        files["batches.meta"] = {b"label_names": [b"c%d" % i for i in range(10)],
                                 b"num_cases_per_batch": 10000}
    with tarfile.open(path, mode) as tar:
        for name, obj in files.items():
            raw = obj if isinstance(obj, bytes) else py2_pickle(obj)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def write_folder(path, batches):
    os.makedirs(path, exist_ok=True)
    for name, obj in batches.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(obj if isinstance(obj, bytes) else py2_pickle(obj))
    return str(path)


@pytest.fixture
def tiny_cifar(tmp_path):
    """A CIFAR-10 archive with 16 images per training batch and 20 test images, so a run takes
    seconds."""
    rng = np.random.default_rng(0)
    sizes = {f"data_batch_{i}": 16 for i in range(1, 6)}
    sizes["test_batch"] = 20
    batches = {name: {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), np.uint8),
                      b"labels": rng.integers(0, 10, n).tolist(),
                      b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
               for name, n in sizes.items()}
    return write_archive(tmp_path / "cifar-10-python.tar.gz", batches)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the test is about CUDA (may pick a device itself)")


@pytest.fixture(autouse=True)
def _device_pinned(request, monkeypatch):
    """On a GPU machine a test that leaves the device to 'auto' trains on CUDA instead of what it
    was written for (and compiles there): every test but the CUDA ones names its device."""
    if request.node.get_closest_marker("cuda"):
        return
    import speedrun
    pick = speedrun.pick_device

    def pinned(name):
        assert name != "auto" and not name.startswith("cuda"), \
            f"a test asked for --device {name!r}: pin it to cpu (or mark it cuda)"
        return pick(name)

    monkeypatch.setattr(speedrun, "pick_device", pinned)
