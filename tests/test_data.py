"""Tests for data_gpu: reading and caching CIFAR-10, augmentations against hand-computed PIL
results, CutMix/MixUp, and the stateless sampler. Tiny archives are built in tmp_path."""
import hashlib
import io
import os
import pickle
import sys
import urllib.error

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_gpu  # noqa: E402
from conftest import write_archive, write_folder  # noqa: E402
from data_gpu import AA_OPS, DataError  # noqa: E402

REAL_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar-10-python.tar.gz")
NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
quiet = lambda *args: None
DECODE = data_gpu._decode


# ----------------------------------------------------------------------------- tiny data sets

def batch_dicts(per_batch=3, bytes_keys=True, seed=0):
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    return {name: {key("data"): rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                   key("labels"): [int(v) for v in rng.integers(0, 10, per_batch)],
                   key("batch_label"): b"tiny" if bytes_keys else "tiny"} for name in NAMES}


def expected(batches, key=b"data", labels=b"labels"):
    train = [batches[name] for name in NAMES[:5]]
    return (np.concatenate([b[key] for b in train]).reshape(-1, 3, 32, 32),
            np.concatenate([b[labels] for b in train]), batches["test_batch"][key].reshape(-1, 3, 32, 32))


def check_loaded(data, batches, bytes_keys=True):
    train_x, train_y, test_x = expected(batches, *((b"data", b"labels") if bytes_keys else ("data", "labels")))
    assert data["train_x"].dtype == torch.uint8 and data["train_y"].dtype == torch.int64
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in data.values())
    assert np.array_equal(data["train_x"].numpy(), train_x) and np.array_equal(data["train_y"].numpy(), train_y)
    assert np.array_equal(data["test_x"].numpy(), test_x) and data["test_y"].shape == (len(test_x),)


# ----------------------------------------------------------------------------- reading

@pytest.mark.parametrize("bytes_keys", [True, False])
def test_reads_archive_with_bytes_or_str_keys(tmp_path, bytes_keys):
    batches = batch_dicts(bytes_keys=bytes_keys)
    data = data_gpu.load_cifar10(write_archive(tmp_path / "c.tar.gz", batches), log=quiet)
    check_loaded(data, batches, bytes_keys)
    assert data["train_x"].shape == (15, 3, 32, 32) and data["test_x"].shape == (3, 3, 32, 32)


def test_reads_extracted_folder_its_parent_and_archive_folder(tmp_path):
    batches = batch_dicts()
    folder = write_folder(tmp_path / "x" / "cifar-10-batches-py", batches)
    for path in (folder, tmp_path / "x"):
        check_loaded(data_gpu.load_cifar10(str(path), root=str(tmp_path / "r"), log=quiet), batches)
    os.makedirs(tmp_path / "y")
    write_archive(tmp_path / "y" / "cifar-10-python.tar.gz", batches)
    check_loaded(data_gpu.load_cifar10(str(tmp_path / "y"), log=quiet), batches)


def bad_batches(**change):
    batches = batch_dicts()
    batches["data_batch_2"].update({k.encode(): v for k, v in change.items()})
    return batches


@pytest.mark.parametrize("batches, message", [
    (bad_batches(data=np.zeros((3, 3000), np.uint8)), "data_batch_2: data is uint8 (3, 3000)"),
    (bad_batches(data=np.zeros((3, 3072), np.int64)), "expected uint8 (n, 3072)"),
    (bad_batches(labels=[0, 10, 3]), "labels run from 0 to 10"),
    (bad_batches(labels=[0, 1]), "expected 3 integers"),
    (bad_batches(labels=[[0], [1, 2], 3]), "labels are not a list of integers"),
    ({n: b for n, b in batch_dicts().items() if n != "data_batch_3"}, "no cifar-10-batches-py/data_batch_3"),
    ({**batch_dicts(), "test_batch": b"not a pickle"}, "test_batch: not a CIFAR-10 batch pickle"),
    ({**batch_dicts(), "test_batch": pickle.dumps([1, 2])}, "test_batch: holds a list"),
    ({**batch_dicts(), "test_batch": pickle.dumps({"data": 1})}, "no 'data' and 'labels'"),
    ({**batch_dicts(), "test_batch": b"cos\nsystem\n(S'echo pwned'\ntR."}, "unexpected object os.system"),
])
def test_bad_batches_raise_one_line_data_errors(tmp_path, batches, message):
    with pytest.raises(DataError) as err:
        data_gpu.load_cifar10(write_archive(tmp_path / "c.tar.gz", batches), log=quiet)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_archives_and_paths(tmp_path):
    good = open(write_archive(tmp_path / "good.tar.gz", batch_dicts()), "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b garbage" * 100)
    write_archive(tmp_path / "layout.tar.gz", batch_dicts(), folder="elsewhere")
    # a flipped bit the pickles survive (here: in gzip's CRC itself) is found by reading to the end
    (tmp_path / "crc.tar.gz").write_bytes(good[:-8] + bytes([good[-8] ^ 1]) + good[-7:])
    for name, message in [("cut.tar.gz", "cannot be read"), ("junk.tar.gz", "cannot be read"),
                          ("crc.tar.gz", "CRC check failed"),
                          ("layout.tar.gz", "not the official"), ("missing.tar.gz", "no such file or folder")]:
        with pytest.raises(DataError, match=message):
            data_gpu.load_cifar10(str(tmp_path / name), log=quiet)
    folder = write_folder(tmp_path / "cifar-10-batches-py", batch_dicts())
    os.remove(os.path.join(folder, "data_batch_4"))
    with pytest.raises(DataError, match="missing data_batch_4"):
        data_gpu.load_cifar10(folder, log=quiet)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="holds neither"):
        data_gpu.load_cifar10(str(tmp_path / "empty"), log=quiet)


# ----------------------------------------------------------------------------- cache

def count_decodes(monkeypatch):
    calls = []
    monkeypatch.setattr(data_gpu, "_decode", lambda source: calls.append(source) or DECODE(source))
    return calls


def test_cache_is_used_rebuilt_when_stale_and_when_corrupt(tmp_path, monkeypatch):
    batches = batch_dicts()
    archive = write_archive(tmp_path / "c.tar", batches, mode="w")  # uncompressed: sizes are exact
    calls = count_decodes(monkeypatch)
    data_gpu.load_cifar10(archive, log=quiet)
    cache = archive + ".u8cache.pt"
    assert os.path.exists(cache) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    monkeypatch.setattr(data_gpu, "_decode", lambda source: pytest.fail("decoded although cached"))
    check_loaded(data_gpu.load_cifar10(archive, log=quiet), batches)
    stat = os.stat(archive)
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: the same bytes
    check_loaded(data_gpu.load_cifar10(archive, log=quiet), batches)

    calls = count_decodes(monkeypatch)
    # replaced by other images of the same size, its mtime set back: stale all the same
    other = batch_dicts(seed=1)
    write_archive(archive, other, mode="w")
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert os.stat(archive).st_size == stat.st_size
    check_loaded(data_gpu.load_cifar10(archive, log=quiet), other)
    zeros = torch.zeros(15, 3, 32, 32, dtype=torch.uint8)
    for corrupt in (lambda: open(cache, "r+b").truncate(os.path.getsize(cache) // 2),
                    lambda: open(cache, "wb").write(b"garbage"),
                    lambda: torch.save({**torch.load(cache), "train_x": zeros}, cache)):  # fails its checksum
        corrupt()
        check_loaded(data_gpu.load_cifar10(archive, log=quiet), other)
    assert len(calls) == 4
    check_loaded(data_gpu.load_cifar10(archive, log=quiet), other)
    assert len(calls) == 4


def test_one_cache_for_the_data_reached_through_a_symlink(tmp_path, monkeypatch):
    batches = batch_dicts()
    (tmp_path / "store").mkdir()
    (tmp_path / "mine").mkdir()
    archive = write_archive(tmp_path / "store" / "c.tar.gz", batches)
    os.symlink(archive, tmp_path / "mine" / "linked.tar.gz")
    os.symlink(tmp_path / "store", tmp_path / "store-link")
    calls = count_decodes(monkeypatch)
    for path in (archive, tmp_path / "mine" / "linked.tar.gz", tmp_path / "store-link" / "c.tar.gz",
                 archive, tmp_path / "mine" / "linked.tar.gz"):
        check_loaded(data_gpu.load_cifar10(str(path), log=quiet), batches)
    assert len(calls) == 1
    assert os.listdir(tmp_path / "mine") == ["linked.tar.gz"]


def test_a_cache_write_that_fails_never_ends_the_load(tmp_path, monkeypatch):
    """A full disk: torch.save's stream writer raises RuntimeError, not OSError."""
    batches = batch_dicts()
    archive = write_archive(tmp_path / "c.tar.gz", batches)

    def full_disk(obj, f):
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")
    monkeypatch.setattr(data_gpu.torch, "save", full_disk)
    said = []
    check_loaded(data_gpu.load_cifar10(archive, log=said.append), batches)
    assert os.listdir(tmp_path) == ["c.tar.gz"]  # neither a cache nor a temporary file
    assert any(line.startswith(f"not caching CIFAR-10 in {tmp_path} (RuntimeError: ") for line in said)


def test_a_killed_cache_write_is_cleaned_up_on_the_next_start(tmp_path):
    """SIGTERM's default action ends the process without an exception: atomic_write's clean-up
    never runs and its temporary file stays; the next start removes it."""
    batches = batch_dicts()
    archive = write_archive(tmp_path / "c.tar.gz", batches)
    left = [tmp_path / ".c.tar.gz.u8cache.pt.k1ll3d.tmp", tmp_path / ".c.tar.gz.u8cache.pt.x.tmp"]
    for path in left:
        path.write_bytes(b"half a cache")
    (tmp_path / ".notes.tmp").write_bytes(b"someone else's")
    check_loaded(data_gpu.load_cifar10(archive, log=quiet), batches)
    assert sorted(os.listdir(tmp_path)) == [".notes.tmp", "c.tar.gz", "c.tar.gz.u8cache.pt"]


def test_cache_goes_to_root_when_the_source_folder_is_read_only(tmp_path):
    """Each read-only source gets its own cache in root/, even under the same name: two
    sources never take turns rebuilding one file."""
    batches, other = batch_dicts(), batch_dicts(seed=1)
    folders = [write_folder(tmp_path / ro / "cifar-10-batches-py", b) for ro, b in (("a", batches), ("b", other))]
    root = tmp_path / "root"
    for ro in "ab":
        os.chmod(tmp_path / ro, 0o555)
    try:
        for _ in range(2):
            for folder, b in zip(folders, (batches, other)):
                said = []
                check_loaded(data_gpu.load_cifar10(folder, root=str(root), log=said.append), b)
                assert not any("stale" in line for line in said), said
        for ro in "ab":
            assert os.listdir(tmp_path / ro) == ["cifar-10-batches-py"]
        caches = sorted(os.listdir(root))
        assert len(caches) == 2 and all(c.startswith("cifar-10-batches-py.") and c.endswith(".u8cache.pt")
                                        for c in caches)
    finally:
        for ro in "ab":
            os.chmod(tmp_path / ro, 0o755)


# ----------------------------------------------------------------------------- download

class FakeResponse(io.BytesIO):
    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def serve(monkeypatch, payload=None, error=None):
    def urlopen(url, timeout=None):
        assert url == data_gpu.CIFAR_URL
        if error:
            raise error
        return FakeResponse(payload)
    monkeypatch.setattr(data_gpu.urllib.request, "urlopen", urlopen)


def test_download_verifies_md5_before_publishing(tmp_path, monkeypatch):
    payload = open(write_archive(tmp_path / "served.tar.gz", batch_dicts()), "rb").read()
    root = tmp_path / "root"
    serve(monkeypatch, payload)
    with pytest.raises(DataError, match="corrupt"):
        data_gpu.load_cifar10(root=str(root), log=quiet)
    assert os.listdir(root) == []  # neither the archive nor its temporary file

    monkeypatch.setattr(data_gpu, "CIFAR_MD5", hashlib.md5(payload).hexdigest())
    logged = []
    check_loaded(data_gpu.load_cifar10(root=str(root), log=logged.append), batch_dicts())
    assert open(root / "cifar-10-python.tar.gz", "rb").read() == payload
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")] and any("100%" in line for line in logged)
    serve(monkeypatch, error=AssertionError("must not download again"))
    check_loaded(data_gpu.load_cifar10(root=str(root), log=quiet), batch_dicts())


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
    serve(monkeypatch, error=urllib.error.URLError("no network"))
    with pytest.raises(DataError, match="download it by hand and pass --data"):
        data_gpu.load_cifar10(root=str(tmp_path), log=quiet)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists(REAL_ARCHIVE), reason="shared CIFAR-10 archive not present")
def test_real_archive(tmp_path):
    data = data_gpu.load_cifar10(REAL_ARCHIVE, root=str(tmp_path), log=quiet)
    assert data["train_x"].shape == (50000, 3, 32, 32) and data["test_x"].shape == (10000, 3, 32, 32)
    assert data["train_x"].dtype == torch.uint8 and data["test_y"].dtype == torch.int64
    assert data["train_y"].bincount().tolist() == [5000] * 10 and data["test_y"].bincount().tolist() == [1000] * 10
    again = data_gpu.load_cifar10(REAL_ARCHIVE, root=str(tmp_path), log=quiet)  # from the cache
    assert all(torch.equal(data[k], again[k]) for k in data)


# ----------------------------------------------------------------------------- AutoAugment ops

def image(*channels):
    """(1,3,H,W) float image from three nested lists, or one list used for all channels."""
    planes = [torch.tensor(c, dtype=torch.float32) for c in channels]
    return torch.stack(planes * 3 if len(planes) == 1 else planes)[None]


def op(name, x, p):
    return AA_OPS[name](x, torch.full((len(x),), float(p)))


def test_point_ops():
    x = image([[0, 15, 16, 127], [128, 200, 254, 255]])
    assert op("invert", x, 0).equal(255 - x)
    assert op("solarize", x, 128).equal(image([[0, 15, 16, 127], [127, 55, 1, 0]]))
    assert op("posterize", x, 4).equal(image([[0, 0, 16, 112], [128, 192, 240, 240]]))
    assert op("brightness", x, 1.5).equal(image([[0, 22, 24, 190], [192, 255, 255, 255]]))
    assert op("brightness", image([[101, 3]]), 0.5).equal(image([[50, 1]]))  # PIL truncates


def test_grey_contrast_color():
    assert data_gpu._grey(image([[255, 0, 0]], [[0, 255, 0]], [[0, 0, 255]])).flatten().tolist() == [76, 150, 29]
    grey = image([[0, 100], [100, 200]])  # L mean 100
    assert op("contrast", grey, 2).equal(image([[0, 100], [100, 255]]))
    assert op("contrast", grey, 0.5).equal(image([[50, 100], [100, 150]]))
    # mean of L = (76 + 0 + 0 + 0) / 4 = 19: red 19 + 0.5 * (255 - 19) = 137, green/blue 19 - 9.5 -> 9
    red = image([[255, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]])
    assert op("contrast", red, 0.5)[0, :, 0, 0].tolist() == [137, 9, 9]
    pixel = image([[100]], [[50]], [[0]])  # L = 59.75 -> 59
    assert op("color", pixel, 0).flatten().tolist() == [59, 59, 59]
    assert op("color", pixel, 2).flatten().tolist() == [141, 41, 0]


def test_sharpness_smooths_the_interior_with_pil_rounding():
    for centre, smooth in [(23, 15), (24, 15), (30, 18)]:  # (80 + 5 c) / 13 = 15.0, 15.4, 17.7
        x = image([[10, 10, 10], [10, centre, 10], [10, 10, 10]])
        assert op("sharpness", x, 0).equal(image([[10, 10, 10], [10, smooth, 10], [10, 10, 10]]))
        assert op("sharpness", x, 2)[0, 0, 1, 1] == min(smooth + 2 * (centre - smooth), 255)
        assert op("sharpness", x, 2)[0, 0, 0].tolist() == [10, 10, 10]


def test_autocontrast_and_equalize():
    x = image([[50, 100, 150]], [[7, 7, 7]], [[0, 2, 7]])
    assert op("autocontrast", x, 0).equal(image([[0, 127, 255]], [[7, 7, 7]], [[0, 72, 255]]))  # truncated
    # PIL computes int(v * (255 / 210) - 0) in float64: 210 -> 254.99999999999997 -> 254
    assert op("autocontrast", image([[0, 105, 210]]), 0).equal(image([[0, 127, 254]]))
    # 512 pixels of 10, 256 of 20, 256 of 30: step = (1024 - 256) // 255 = 3, lut = (1 + cumsum) // 3
    plane = torch.tensor([10.0] * 512 + [20.0] * 256 + [30.0] * 256).view(32, 32)
    out = op("equalize", torch.stack([plane, plane, torch.full((32, 32), 9.0)])[None], 0)
    assert torch.equal(out[0, 0], plane.clone().apply_(lambda v: {10: 0, 20: 171, 30: 255}[v]))
    assert (out[0, 2] == 9).all()  # a single value (step 0) stays as it is


def test_shear_is_pil_bicubic_with_grey_fill():
    ramp = image([list(range(0, 80, 10))] * 2)
    # p = 2: rows shift by exactly 1 and 3 pixels
    assert op("shearX", ramp, 2)[0, 0].tolist() == [[10, 20, 30, 40, 50, 60, 70, 128],
                                                    [30, 40, 50, 60, 70, 128, 128, 128]]
    # p = 1: half-pixel shift, PIL's a = -1 cubic: weights (-1/8, 5/8, 5/8, -1/8), taps clamped at the border
    assert op("shearX", ramp, 1)[0, 0, 0].tolist() == [3, 15, 25, 35, 45, 55, 66, 128]
    step = image([[0, 0, 0, 0, 100, 100, 100, 100]])
    assert op("shearX", step, 1)[0, 0, 0].tolist() == [0, 0, 0, 50, 112, 100, 100, 128]
    assert op("shearX", ramp, -2)[0, 0, 1].tolist() == [128, 128, 128, 0, 10, 20, 30, 40]
    x = torch.arange(3 * 6 * 5, dtype=torch.float32).view(1, 3, 6, 5)
    assert op("shearY", x, 0.7).equal(op("shearX", x.transpose(2, 3), 0.7).transpose(2, 3))


def test_translate_and_rotate_are_pil_nearest_with_grey_fill():
    ramp = image([list(range(0, 80, 10))])
    assert op("translateX", ramp, 0.25)[0, 0, 0].tolist() == [20, 30, 40, 50, 60, 70, 128, 128]
    assert op("translateX", ramp, -1.6 / 8)[0, 0, 0].tolist() == [128, 128, 0, 10, 20, 30, 40, 50]  # 1.6 -> 2
    column = ramp.transpose(2, 3)
    assert op("translateY", column, 1.4 / 8).equal(op("translateX", ramp, 1.4 / 8).transpose(2, 3))  # 1.4 -> 1
    x = torch.arange(48, dtype=torch.float32).view(1, 3, 4, 4)
    assert op("rotate", x, 90).equal(torch.rot90(x, 1, (2, 3)))  # counter-clockwise
    assert op("rotate", x, 180).equal(x.flip(2, 3))
    turned = op("rotate", torch.zeros(1, 3, 8, 8), 30)
    assert turned[0, 0, 0, 0] == 128 and turned[0, 0, 3:5, 3:5].eq(0).all()


def test_magnitudes_follow_the_paper_linspace():
    param = data_gpu._op_param
    assert [param("posterize", m, 1) for m in (0, 2, 7, 9)] == [8, 7, 5, 4]
    assert param("solarize", 2, 1) == pytest.approx(256 - 2 * 256 / 9)
    assert param("color", 3, -1) == pytest.approx(0.7) and param("brightness", 9, 1) == pytest.approx(1.9)
    assert param("translateY", 9, -1) == pytest.approx(-150 / 331)
    assert param("shearY", 8, 1) == pytest.approx(0.3 * 8 / 9)
    assert param("rotate", 2, -1) == pytest.approx(20 / 3)  # counter-clockwise only
    assert len(data_gpu._POLICY) == 25 and set(AA_OPS) == set(data_gpu._OPS) and len(AA_OPS) == 14


def reachable(img):
    """Every image the CIFAR-10 policy can make from img through the single-op functions, with
    its probability: (unique images, probabilities)."""
    param = lambda name, level, sign: torch.tensor([data_gpu._op_param(name, level, sign)], dtype=torch.float64)
    apply = lambda name, level, sign, x: AA_OPS[name](x, param(name, level, sign))
    outs, probs = [], []
    for p1, op1, m1, p2, op2, m2 in data_gpu._POLICY:
        firsts = [(img, 1 - p1)] + [(apply(op1, m1, s, img), p1 / 2) for s in (-1, 1)]
        for first, q in firsts:
            outs += [first] + [apply(op2, m2, s, first) for s in (-1, 1)]
            probs += [q * (1 - p2) / 25, q * p2 / 50, q * p2 / 50]
    unique, inverse = torch.cat(outs).unique(dim=0, return_inverse=True)
    probs = torch.tensor(probs, dtype=torch.float64)
    return unique, torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, probs)


def test_autoaugment_batch_follows_the_policy_per_image():
    img = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(1)).float()
    img[..., :8, :8] = 40  # a flat patch, so autocontrast and equalize are not trivial
    out = data_gpu._autoaugment(img.expand(2000, -1, -1, -1).contiguous(), draws(0))
    candidates, expected = reachable(img)
    match = (out[:, None] == candidates[None]).flatten(2).all(2)  # (2000, candidates)
    assert match.sum(1).eq(1).all()  # every output is exactly one reachable image
    seen = match.double().mean(0)
    assert (seen - expected).abs().max() < 0.045 and 0.5 * (seen - expected).abs().sum() < 0.12  # ~4 sigma
    assert match.any(0).sum() > 80  # most of the ~100 reachable images occur


# ----------------------------------------------------------------------------- augment

def draws(seed, step=0):
    """The draws of one step of a run seeded `seed`, as the trainer makes them."""
    key = data_gpu.seed_key_for(seed, 0, "cpu")
    return data_gpu.Draws(data_gpu.step_key(key, torch.tensor(step)))


def test_draws_are_uniform_keyed_and_fresh_each_call_and_step():
    a, b = draws(0), draws(0)
    u = a.rand(200000)
    assert u.equal(b.rand(200000)) and not u.equal(a.rand(200000))  # same key, same draw
    assert not u.equal(draws(0, 1).rand(200000)) and not u.equal(draws(1).rand(200000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.001
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01  # neighbours independent
    counts = torch.bincount(draws(2).randint(3, 10, (70000,)) - 3, minlength=7)
    assert counts.sum() == 70000 and (counts - 10000).abs().max() < 500  # ~5 sigma

def test_augment_shapes_range_determinism_and_per_image_randomness():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = data_gpu.augment(x, draws(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    lo, hi = data_gpu.normalize(torch.tensor([0, 255]).view(2, 1, 1, 1).expand(2, 3, 1, 1)).flatten(1)
    assert (out >= lo.view(1, 3, 1, 1)).all() and (out <= hi.view(1, 3, 1, 1)).all()
    assert out.equal(data_gpu.augment(x, draws(0)))
    assert not out.equal(data_gpu.augment(x, draws(1)))
    copies = data_gpu.augment(x[:1].expand(64, -1, -1, -1), draws(0))
    assert len(copies.unique(dim=0)) >= 60
    plain = data_gpu.augment(x, draws(0), flip=False, crop_pad=0, autoaugment=False, erase_prob=0)
    assert plain.equal(data_gpu.normalize(x))


def test_flip_and_crop_give_a_shift_of_the_padded_image_or_its_mirror():
    x = torch.randperm(3 * 32 * 32).remainder(256).to(torch.uint8).view(1, 3, 32, 32)
    out = data_gpu.augment(x.expand(128, -1, -1, -1), draws(3), autoaugment=False, erase_prob=0)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))[0]
    crops = torch.stack([img[:, i:i + 32, j:j + 32] for img in (padded, padded.flip(2))
                         for i in range(9) for j in range(9)])
    match = (out[:, None] == data_gpu.normalize(crops)[None]).flatten(2).all(2)
    assert match.sum(1).eq(1).all()  # every output is exactly one (mirror, offset)
    used = match.any(0).view(2, 81)
    assert used[0].any() and used[1].any() and used.sum() > 40


def test_random_erasing_boxes():
    x = torch.full((2000, 3, 32, 32), 7.0)
    out = data_gpu._random_erase(x, draws(0), 1.0)
    erased = out != 7.0
    assert erased.any(1).eq(erased.all(1)).all()  # all channels or none
    fill = torch.tensor(data_gpu.MEAN).view(1, 3, 1, 1).expand_as(out)
    assert out[erased].equal(fill[erased])
    rows, cols = erased[:, 0].any(2), erased[:, 0].any(1)
    h, w = rows.sum(1), cols.sum(1)
    assert erased[:, 0].sum((1, 2)).equal(h * w) and (h > 0).all()  # one filled rectangle per image
    assert (h < 32).all() and (w < 32).all()
    # (h, w) must come from area in [0.02, 0.4] of 1024 and aspect in [0.3, 1/0.3], rounded
    hf, wf = h.double(), w.double()
    assert ((hf - 0.5) * (wf - 0.5) <= 0.4 * 1024).all() and ((hf + 0.5) * (wf + 0.5) >= 0.02 * 1024).all()
    assert ((hf + 0.5) / (wf - 0.5) >= 0.3).all() and ((hf - 0.5) / (wf + 0.5) <= 1 / 0.3).all()
    assert 170 < (h * w).double().mean() < 260
    assert rows[:, 0].any() and rows[:, -1].any() and cols[:, 0].any() and cols[:, -1].any()
    some = data_gpu._random_erase(x, draws(0), 0.25)
    assert 0.2 < (some != 7.0).flatten(1).any(1).double().mean() < 0.3


# ----------------------------------------------------------------------------- CutMix / MixUp

def labelled_batch(B=8):
    x = torch.arange(1, B + 1, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 32, 32).contiguous()
    return x, torch.arange(B) % 10


def test_cutmix_lam_is_the_pasted_area():
    x, y = labelled_batch()
    for seed in range(40):
        mixed, soft = data_gpu.mix(x, y, 10, draws(seed), mix_prob=1, mixup=False)
        from_partner = (mixed == x.flip(0)).flatten(1).double().mean(1)
        assert ((mixed == x) | (mixed == x.flip(0))).all()
        assert torch.allclose(soft[torch.arange(8), y].double(), 1 - from_partner, atol=1e-6)
        assert torch.allclose(soft[torch.arange(8), y.flip(0)].double(), from_partner, atol=1e-6)
        assert torch.allclose(soft.sum(1), torch.ones(8))


def test_mixup_is_a_convex_combination_and_mix_prob_zero_is_identity():
    x, y = labelled_batch()
    for seed in range(10):
        mixed, soft = data_gpu.mix(x, y, 10, draws(seed), mix_prob=1, cutmix=False)
        lam = soft[0, y[0]]
        assert 0 < lam < 1 and torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))  # always mixed
        assert torch.allclose(soft[torch.arange(8), y.flip(0)], 1 - lam.expand(8))
        same, soft = data_gpu.mix(x, y, 10, draws(seed), mix_prob=0)
        assert same.equal(x) and soft.equal(torch.nn.functional.one_hot(y, 10).float())


def test_randperm_partner_pairs_each_image_with_a_permuted_one():
    x, y = labelled_batch()
    partners = set()
    for step in range(20):
        peek = draws(0, step)
        peek.rand(3), peek.randint(0, 1 << 20, (2,))  # the batch-level draws come first
        perm = peek.rand(8).argsort()  # the permutation mix is about to draw
        mixed, soft = data_gpu.mix(x, y, 10, draws(0, step), mix_prob=1, cutmix=False,
                                   partner="randperm")
        i = int((perm != torch.arange(8)).nonzero()[0])
        lam = soft[i, y[i]]
        assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
        assert torch.allclose(soft, lam * torch.eye(10)[y] + (1 - lam) * torch.eye(10)[y[perm]])
        partners.add(tuple(perm.tolist()))
    assert len(partners) == 20  # a fresh permutation per batch, not fixed pairs


def test_mix_picks_none_cutmix_or_mixup_at_the_stated_rates():
    x, y = labelled_batch()
    kinds = []
    for step in range(400):
        mixed, _ = data_gpu.mix(x, y, 10, draws(0, step))
        blended = not ((mixed == x) | (mixed == x.flip(0))).all()
        kinds.append("mixup" if blended else "none" if mixed.equal(x) else "cutmix")
    counts = {k: kinds.count(k) for k in ("none", "cutmix", "mixup")}
    assert 160 < counts["none"] < 240 and 60 < counts["cutmix"] < 140 and 60 < counts["mixup"] < 140


def paper_mix_lams(n, seed=0, mix_prob=0.5, H=32, W=32):
    """The paper's per-batch mixing, drawn on the host as its code does: None when the batch is
    not mixed, else ('cutmix' or 'mixup', the target weight of the image itself)."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        if rng.random() >= mix_prob:
            out.append(None)
            continue
        lam = rng.beta(1.0, 1.0)
        if rng.random() < 0.5:
            cy, cx = rng.integers(H), rng.integers(W)
            ch, cw = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
            y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, H)
            x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, W)
            out.append(("cutmix", 1 - (y1 - y0) * (x1 - x0) / (H * W)))
        else:
            out.append(("mixup", lam))
    return out


def test_device_mixing_has_the_papers_statistics():
    """Frequencies of none / CutMix / MixUp and the mean target weight of each kind, over 2,000
    batches drawn on the device, against the paper's host-side draws (4-5 standard errors)."""
    x, y = labelled_batch()
    ours = []
    for step in range(2000):
        mixed, soft = data_gpu.mix(x, y, 10, draws(0, step))
        lam = soft[0, y[0]].item()
        blended = not ((mixed == x) | (mixed == x.flip(0))).all()
        ours.append(None if mixed.equal(x) and lam == 1 else ("mixup" if blended else "cutmix", lam))
    paper = paper_mix_lams(20000)
    for kind in ("cutmix", "mixup"):
        share = [sum(1 for r in runs if r and r[0] == kind) / len(runs) for runs in (ours, paper)]
        assert abs(share[0] - share[1]) < 0.05  # 0.25 each; s.e. of ours ~0.0097
        lams = [[r[1] for r in runs if r and r[0] == kind] for runs in (ours, paper)]
        assert abs(np.mean(lams[0]) - np.mean(lams[1])) < 0.05  # s.e. of ours ~0.013
    assert abs(ours.count(None) / 2000 - 0.5) < 0.05


# ----------------------------------------------------------------------------- sampler

def test_steps_for():
    assert data_gpu.steps_for(100, 256) == 58500  # the paper's 100 x 585 (drop_last epochs)
    assert data_gpu.steps_for(100, 256, drop_last=False) == 58593
    assert data_gpu.steps_for(100, 1024) == 14600
    assert data_gpu.steps_for(1, 100, n=1000, passes_per_epoch=1) == 10


def test_sampler_passes_ranks_and_determinism():
    sampler = data_gpu.RepeatedPassSampler(25, 10, seed=5, device="cpu")
    stream = torch.cat([sampler.indices(s) for s in range(10)])  # 100 positions = 4 passes
    assert stream.dtype == torch.int64 and len(sampler.indices(3)) == 10
    passes = stream.view(4, 25)
    assert all(p.sort().values.equal(torch.arange(25)) for p in passes)
    assert not passes[0].equal(passes[1])
    assert stream[20:30].equal(sampler.indices(2))  # a batch spanning two passes
    fresh = data_gpu.RepeatedPassSampler(25, 10, seed=5, device="cpu")
    assert fresh.indices(7).equal(stream[70:80]) and fresh.indices(0).equal(stream[:10])  # stateless
    assert not data_gpu.RepeatedPassSampler(25, 10, seed=6, device="cpu").indices(0).equal(stream[:10])
    ranks = [data_gpu.RepeatedPassSampler(25, 10, 5, "cpu", rank=r, world_size=2) for r in range(2)]
    for step in (0, 2, 9):
        parts = [r.indices(step) for r in ranks]
        assert len(parts[0]) == 5 and torch.stack(parts, 1).flatten().equal(stream[step * 10:(step + 1) * 10])
    # the device-side stream serves a step counter the same batches, for every rank
    for r in ranks:
        laid = r.stream(10)
        assert all(r.indices_at(laid, torch.tensor(s)).equal(r.indices(s)) for s in range(10))


def test_drop_last_epochs_start_fresh_passes_and_drop_the_partial_batch():
    endless = data_gpu.RepeatedPassSampler(25, 10, seed=5, device="cpu")
    epochs = data_gpu.RepeatedPassSampler(25, 10, seed=5, device="cpu", epoch_samples=75)
    # epoch 0 is the endless stream's first 7 batches; its last 5 samples are dropped
    assert all(epochs.indices(s).equal(endless.indices(s)) for s in range(7))
    epoch1 = torch.cat([epochs.indices(s) for s in range(7, 14)])
    fresh = data_gpu.RepeatedPassSampler(25, 10, seed=5, device="cpu")  # passes 3, 4, 5 of it
    assert epoch1.equal(torch.cat([fresh.indices(s) for s in range(7, 15)])[5:75])
    assert epochs.indices(20).equal(data_gpu.RepeatedPassSampler(  # stateless
        25, 10, seed=5, device="cpu", epoch_samples=75).indices(20))
    laid = epochs.stream(21)  # the device-side stream holds the same epochs
    assert all(epochs.indices_at(laid, torch.tensor(s)).equal(epochs.indices(s)) for s in range(21))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_repeated_augmentation_keeps_copies_on_one_rank_and_an_epoch_sees_each_image_n_times(
        world_size):
    n, B, N = 48, 12, 3
    ranks = [data_gpu.RepeatedPassSampler(n, B, 0, "cpu", r, world_size, repeats=N,
                                          epoch_samples=3 * n) for r in range(world_size)]
    seen = torch.zeros(world_size, n, dtype=torch.long)
    for s in range(3 * n // B):  # one epoch: 144 samples, 12 whole batches
        for r, sampler in enumerate(ranks):
            part = sampler.indices(s)
            assert len(part) == B // world_size
            seen[r] += torch.bincount(part, minlength=n)
            if B // world_size % N == 0:  # each rank's batch is whole runs of N copies
                assert (part.view(-1, N) == part.view(-1, N)[:, :1]).all()
    assert seen.sum(0).eq(N).all()  # every image N times: one pass, N copies
    assert (seen > 0).sum(0).eq(1).all()  # all copies of an image on one rank, as the paper's
    first = torch.cat([r.indices(0) for r in ranks])
    assert first.unique().numel() == B // N  # 4 distinct images per batch of 12
    for sampler in ranks:  # the device-side stream serves the same batches to every rank
        laid = sampler.stream(30)
        assert all(sampler.indices_at(laid, torch.tensor(s)).equal(sampler.indices(s))
                   for s in range(30))


def test_repeated_augmentation_drops_the_epochs_tail_and_pads_ranks():
    dropped = data_gpu.RepeatedPassSampler(50, 12, 0, "cpu", repeats=3, epoch_samples=150)
    seen = torch.bincount(torch.cat([dropped.indices(s) for s in range(12)]), minlength=50)
    assert seen.sum() == 144 and (seen == 3).sum() == 48 and (seen == 0).sum() == 2  # 6 dropped
    # 50 images over 4 ranks: the pass is padded to 52 with its first images, as DistributedSampler
    ranks = [data_gpu.RepeatedPassSampler(50, 12, 0, "cpu", r, 4, repeats=3) for r in range(4)]
    stream = torch.stack([torch.cat([r.indices(s) for s in range(13)]) for r in ranks])  # 156
    seen = torch.bincount(stream.flatten(), minlength=50)
    assert (seen == 3).sum() == 48 and (seen == 6).sum() == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to check for device->host syncs")
def test_no_host_sync_on_cuda():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    sampler = data_gpu.RepeatedPassSampler(64, 16, 0, "cuda", repeats=3, epoch_samples=96)
    stream, key = sampler.stream(8), data_gpu.seed_key_for(0, 0, "cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    data_gpu.augment(x, data_gpu.Draws(key))  # the first call builds the per-device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            draws = data_gpu.Draws(data_gpu.step_key(key, step))
            out, soft = data_gpu.mix(data_gpu.augment(x[sampler.indices_at(stream, step)], draws),
                                     y[:16], 10, draws, mix_prob=1, partner="randperm")
            step += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all() and soft.shape == (16, 10)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(failure, tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(failure):
        with data_gpu.atomic_write(str(path), "w") as f:
            f.write("half of the new")
            raise failure()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with data_gpu.atomic_write(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]
