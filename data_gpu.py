"""CIFAR-10 on the GPU for the ViT speedrun: load once, augment whole batches on the device.

source (archive, extracted folder or download) -> decode once into a uint8 cache next to it
-> the data set as uint8 tensors -> per step, on the device: flip, crop, AutoAugment (CIFAR-10
policy, PIL semantics), normalise, random erasing -> CutMix/MixUp, chosen without a branch
-> a stateless repeated-pass sampler (batch = f(seed, step), so resume needs no sampler state).

Augmentation never loops over images and never syncs with the host. Its randomness is a pure
function of a key made from (seed, rank, step) on the device (`Draws`): no generator state to
save, nothing a compiled graph cannot trace, and a CUDA graph replays it afresh every step.
"""
import contextlib
import functools
import hashlib
import http.client
import io
import math
import os
import pickle
import tarfile
import tempfile
import types
import urllib.request
import zlib

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SIDE = 32  # CIFAR-10 images are 32x32 RGB

_ARCHIVE = "cifar-10-python.tar.gz"
_FOLDER = "cifar-10-batches-py"
_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
_CACHE_VERSION = 2  # 2: stamps hold content CRCs
_HELP = f"pass --data PATH to the {_ARCHIVE} archive or its extracted {_FOLDER} folder"


class DataError(Exception):
    """A user-facing one-line message; the trainer prints it and exits with code 2."""


def one_line(err) -> str:
    """An exception as one line, its type first (for messages that must stay one line)."""
    return " ".join(f"{type(err).__name__}: {err}".split())


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a hidden temporary file beside `path`; on a clean exit it replaces `path` in one
    rename, on any exception (a signal's included) it is removed: readers see the old file or
    the new one, never half of one, and nothing is left behind."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are not secrets
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- randomness

_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for int64 x in [0, 2^32): two 16-bit halves of c, so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def hash32(x):
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values: every input bit
    reaches every output bit, so consecutive counters give independent-looking numbers."""
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def step_key(seed_key, step):
    """The key of one step's draws: seed_key (from seed_key_for) mixed with the step, both int64
    tensors on the device, so a graph that increments `step` draws afresh at every replay."""
    return hash32((seed_key ^ hash32(step & _MASK32)) & _MASK32)


def seed_key_for(seed: int, rank: int, device) -> torch.Tensor:
    return hash32(torch.tensor((seed * 1000003 + rank) & _MASK32, dtype=torch.int64, device=device))


class Draws:
    """Random numbers from a key: element i of draw k is hash(hash(key + k·φ) + i). The same key
    gives the same numbers eagerly, compiled or replayed; each call is a new draw."""

    def __init__(self, key: torch.Tensor):
        self.key, self.count = key, 0

    def _bits(self, shape) -> torch.Tensor:
        self.count += 1
        base = hash32((self.key + self.count * 0x9E3779B9) & _MASK32)
        index = torch.arange(math.prod(shape), dtype=torch.int64, device=self.key.device)
        return hash32((base + index) & _MASK32).view(shape)

    def rand(self, *shape) -> torch.Tensor:
        """Uniform float32 in [0, 1), 24 random bits each."""
        return (self._bits(shape) >> 8).float() * 2.0 ** -24

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        """Uniform int64 in [low, high) (bias below 2^-24 for the small ranges used here)."""
        return low + ((self._bits(shape) >> 8) * (high - low) >> 24)


# ----------------------------------------------------------------------------- source

def _download(root, log):
    """Fetch the official archive into root/, publishing it only once its MD5 is right."""
    dest = os.path.join(root, _ARCHIVE)
    md5, done, shown = hashlib.md5(), 0, -1
    try:
        os.makedirs(root, exist_ok=True)
        log(f"downloading {CIFAR_URL} to {dest}")
        with urllib.request.urlopen(CIFAR_URL, timeout=60) as response, atomic_write(dest) as out:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                md5.update(chunk)
                done += len(chunk)
                if total and done * 10 // total > shown:
                    shown = done * 10 // total
                    log(f"  {done * 100 // total}% of {total / 2**20:.0f} MiB")
            if md5.hexdigest() != CIFAR_MD5:  # raised inside: the partial file is removed
                raise DataError(f"the download of {CIFAR_URL} is corrupt (MD5 {md5.hexdigest()}, "
                                f"expected {CIFAR_MD5}); try again, or download it by hand and {_HELP}")
        return dest
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError is an OSError
        raise DataError(f"could not download {CIFAR_URL} ({one_line(err)}); download it by hand "
                        f"and {_HELP}") from None


def _find_source(data, root, log):
    """The archive file or the cifar-10-batches-py folder to read, downloading when none is given."""
    if data is None:
        for candidate in (os.path.join(root, _FOLDER), os.path.join(root, _ARCHIVE)):
            if os.path.exists(candidate):
                return candidate
        return _download(root, log)
    path = os.path.expanduser(data)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise DataError(f"{data}: no such file or folder; {_HELP}")
    if os.path.basename(os.path.normpath(path)) == _FOLDER or os.path.exists(os.path.join(path, _BATCHES[0])):
        return path
    for candidate in (os.path.join(path, _FOLDER), os.path.join(path, _ARCHIVE)):
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"{data}: folder holds neither {_FOLDER}/ nor {_ARCHIVE}; {_HELP}")


# ----------------------------------------------------------------------------- decode / cache

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Batches are dicts of numpy arrays; refusing any other global makes a hostile file a DataError."""
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle_batch(raw, where):
    try:  # encoding="bytes" reads the official Python-2 pickles; Python-3 ones keep str keys
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:
        raise DataError(f"{where}: not a CIFAR-10 batch pickle ({one_line(err)})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where}: holds a {type(batch).__name__}, expected a dict with data and labels")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{where}: has no 'data' and 'labels' entries")
    images = batch["data"]
    try:
        labels = np.asarray(batch["labels"])
    except Exception as err:  # e.g. ragged lists
        raise DataError(f"{where}: labels are not a list of integers ({one_line(err)})") from None
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == 3072):
        shape = getattr(images, "shape", None)
        raise DataError(f"{where}: data is {getattr(images, 'dtype', type(images).__name__)} {shape}, "
                        f"expected uint8 (n, 3072)")
    if not len(images):  # the official batches hold 10,000 each; none would divide by zero later
        raise DataError(f"{where}: holds no images")
    if labels.ndim != 1 or len(labels) != len(images) or (len(labels) and labels.dtype.kind not in "iu"):
        raise DataError(f"{where}: labels are {labels.dtype} {labels.shape}, expected {len(images)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: labels run from {labels.min()} to {labels.max()}, expected 0..9")
    return images, labels.astype(np.int64)


def _source_files(source):
    """The files whose bytes make the data: the archive, or the six batch files of the folder."""
    if not os.path.isdir(source):
        return [source]
    missing = [name for name in _BATCHES if not os.path.isfile(os.path.join(source, name))]
    if missing:
        raise DataError(f"{source}: missing {missing[0]}; {_HELP}")
    return [os.path.join(source, name) for name in _BATCHES]


def _read_batches(source):
    """Raw bytes of the six batch files, from the archive or the folder."""
    raw = {}
    try:
        if os.path.isdir(source):
            for name, path in zip(_BATCHES, _source_files(source)):
                with open(path, "rb") as f:
                    raw[name] = f.read()
            return raw
        with tarfile.open(source, "r:*") as tar:  # one sequential pass over the gzip stream
            for member in tar:
                folder, _, name = member.name.removeprefix("./").rpartition("/")
                if folder == _FOLDER and name in _BATCHES and member.isfile():
                    raw[name] = tar.extractfile(member).read()
            while tar.fileobj.read(1 << 20):  # to the end: only gzip's CRC sees a flipped pixel bit
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{source}: cannot be read ({one_line(err)}); re-download it or {_HELP}") from None
    missing = [name for name in _BATCHES if name not in raw]
    if missing:
        raise DataError(f"{source}: archive has no {_FOLDER}/{missing[0]}; not the official {_ARCHIVE} layout")
    return raw


def _decode(source):
    raw = _read_batches(source)
    batches = [_unpickle_batch(raw.pop(name), f"{source}: {name}") for name in _BATCHES]
    (train_x, train_y), (test_x, test_y) = [
        [np.concatenate(parts) for parts in zip(*group)] for group in (batches[:5], batches[5:])]
    # rows are R, G, B planes
    as_images = lambda flat: torch.from_numpy(flat).reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)
    return {"train_x": as_images(train_x), "train_y": torch.from_numpy(train_y),
            "test_x": as_images(test_x), "test_y": torch.from_numpy(test_y)}


def _stamp(source):
    """(size, CRC-32 of the bytes) of each file decoded: a changed source always makes the cache
    stale, even one replaced by a file of the same size with its mtime set back. Reading the
    170 MB archive for it costs ~0.25 s, a tenth of loading the cache."""
    stamp = []
    try:
        for path in _source_files(source):
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            stamp += [os.path.getsize(path), crc]
    except OSError as err:
        raise DataError(f"{source}: cannot be read ({one_line(err)}); re-download it or {_HELP}") from None
    return stamp


def _checksum(arrays):
    crc = 0
    for key in sorted(arrays):
        crc = zlib.crc32(arrays[key].numpy(), crc)
    return crc


def writable(folder):
    # mode bits too: root may write anywhere, but a read-only shared folder should stay untouched
    return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)


def _cache_paths(source, root):
    """Next to the source; when that folder is read-only, in root/, keyed by the source's name
    and path: read-only sources of the same name (the real archive and a test's) keep their own."""
    name = os.path.basename(os.path.normpath(source))
    beside = os.path.join(os.path.dirname(os.path.abspath(source)), name + ".u8cache.pt")
    where = zlib.crc32(os.path.abspath(source).encode())
    in_root = os.path.abspath(os.path.join(root, f"{name}.{where:08x}.u8cache.pt"))
    return [beside, in_root]


def _load_cache(path, meta, log):
    if not os.path.exists(path):
        return None
    try:
        cached = torch.load(path, weights_only=True)
        arrays = {key: cached[key] for key in ("train_x", "train_y", "test_x", "test_y")}
        fresh = cached["meta"] == meta and cached["crc"] == _checksum(arrays)
    except Exception:  # truncated, garbage, or an older layout: all mean rebuild
        fresh = False
    if not fresh:
        log(f"cache {path} is stale or corrupt; rebuilding it")
        return None
    return arrays


def _save_cache(path, meta, arrays, log):
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        if not writable(folder):
            return False
        with atomic_write(path) as f:  # a reader never sees half a cache
            torch.save({**arrays, "meta": meta, "crc": _checksum(arrays)}, f)
    except (OSError, RuntimeError) as err:  # a full disk: torch.save's writer raises RuntimeError
        log(f"not caching CIFAR-10 in {folder} ({one_line(err)})")
        return False
    log(f"cached decoded CIFAR-10 in {path}")
    return True


def _remove_stale_temporaries(cache_path):
    """A cache write killed outright (SIGTERM's default action, SIGKILL) leaves its temporary file
    (atomic_write's .<name>.*.tmp) behind: remove it. A write in progress in another process
    loses its file and skips caching; that run goes on."""
    folder, name = os.path.split(cache_path)
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, entry))


def load_cifar10(data: str | None = None, root: str = "data", log=print) -> dict:
    """CIFAR-10 as contiguous CPU tensors: train_x/test_x uint8 (N,3,32,32), train_y/test_y int64 (N,).

    data: the archive, its extracted cifar-10-batches-py folder, or a folder holding either;
    None: root/, downloading the official archive there when it is missing. Bad input: DataError.
    The decoded arrays are cached in <source>.u8cache.pt beside the source (in root/ when that
    folder is read-only, else nowhere); a changed source or a damaged cache is rebuilt.
    """
    # the real path: the same data reached through a symlink shares one cache
    source = os.path.realpath(_find_source(data, root, log))
    meta = {"version": _CACHE_VERSION, "source": source, "stamp": _stamp(source)}
    paths = _cache_paths(source, root)
    for path in paths:
        _remove_stale_temporaries(path)
        arrays = _load_cache(path, meta, log)
        if arrays is not None:
            return arrays
    log(f"decoding CIFAR-10 from {source}")
    arrays = _decode(source)
    for path in paths:
        if _save_cache(path, meta, arrays, log):
            break
    return arrays


# ----------------------------------------------------------------------------- device tensors

_SHEARS, _WARPS = ("shearX", "shearY"), ("translateX", "translateY", "rotate")
_BLENDS = ("color", "sharpness")  # blends with a per-pixel degenerate image
_LUTS = ("contrast", "brightness", "posterize", "solarize", "autocontrast", "equalize", "invert")
_OPS = _SHEARS + _WARPS + _BLENDS + _LUTS
_RANGES = {"shearX": (0, 0.3), "shearY": (0, 0.3), "translateX": (0, 150 / 331), "translateY": (0, 150 / 331),
           "rotate": (0, 30), "color": (0, 0.9), "contrast": (0, 0.9), "sharpness": (0, 0.9),
           "brightness": (0, 0.9), "posterize": (8, 4), "solarize": (256, 0)}
# AutoAugment CIFAR-10 policy: (p1, op1, magnitude1, p2, op2, magnitude2)
_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6), (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3), (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2), (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7), (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1), (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8), (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6), (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3), (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4), (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8), (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3), (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3), (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)
# ops that can fire in each stage: what the table never asks for is never computed
_STAGE_OPS = [{row[3 * s + 1] for row in _POLICY if row[3 * s] > 0} for s in range(2)]


def _op_param(op, level, sign):
    """PIL's argument for op at magnitude level 0..9 (linspace over the range, as the paper's code)."""
    value = float(np.linspace(*_RANGES.get(op, (0, 0)), 10)[level])
    if op == "posterize":
        return float(round(value))
    if op in ("color", "contrast", "sharpness", "brightness"):
        return 1 + sign * value
    if op in ("shearX", "shearY", "translateX", "translateY"):
        return sign * value
    return value  # rotate turns counter-clockwise only, as in the paper's code


_CONSTS = {}


def device_constants(device, size=(IMAGE_SIDE, IMAGE_SIDE)):
    """Per-device (and image size) constants, built once: the hot path never copies from the host.
    (A plain dict, not lru_cache: a compiled graph reads it; torch.compile would retrace a cached
    function's body.) "cuda" and "cuda:0" share one entry: an entry built for the first would
    be missed by a compiled graph on the second, which would then build it under tracing."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, tuple(size))
    if key not in _CONSTS:
        _CONSTS[key] = _build_constants(*key)
    return _CONSTS[key]


def _build_constants(device, size):
    tensor = functools.partial(torch.tensor, device=device)
    # the policy as tables over (sub-policy, stage, sign): op id, probability, PIL argument, and
    # for translate/rotate the whole affine matrix (identity for the other ops)
    param = torch.tensor([[[_op_param(row[3 * s + 1], row[3 * s + 2], sign) for sign in (-1, 1)]
                           for s in range(2)] for row in _POLICY], dtype=torch.float64)
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=torch.float64)
    matrix = torch.stack([torch.stack([
        _inverse_map(row[3 * s + 1], param[r, s], size) if row[3 * s + 1] in _WARPS else identity.expand(2, 2, 3)
        for s in range(2)]) for r, row in enumerate(_POLICY)])
    return types.SimpleNamespace(
        mean=tensor(MEAN).view(1, 3, 1, 1) * 255, std=tensor(STD).view(1, 3, 1, 1) * 255,
        erase_fill=tensor(MEAN).view(1, 3, 1, 1), identity=identity.to(device), matrix=matrix.to(device),
        levels=torch.arange(256, dtype=torch.float32, device=device).view(1, 1, 256),
        op=tensor([[_OPS.index(row[1]), _OPS.index(row[4])] for row in _POLICY]),
        prob=tensor([[row[0], row[3]] for row in _POLICY]), param=param.to(device))


def normalize(x):
    """uint8 (or float in [0, 255]) images -> float32 normalised with MEAN/STD, on x's device."""
    c = device_constants(x.device)
    return (x.float() - c.mean) / c.std


# ----------------------------------------------------------------------------- augmentations
# AutoAugment ops reproduce PIL (what the paper's code calls) on x float (B,3,H,W) holding uint8
# values, with PIL's argument per image p (B,), float64 like PIL's Python floats; they return
# uint8 values again, so later ops (posterize, equalize) see integers as in PIL. All point ops of
# a stage become one 256-entry table per image and channel, applied with a single gather.

def _gather_pixels(x, index):
    """x (B,C,H,W), index (B,N) into the flattened H*W plane -> (B,C,N)."""
    B, C = x.shape[:2]
    return x.reshape(B, C, -1).gather(2, index.reshape(B, 1, -1).expand(B, C, -1))


def _blend(degenerate, x, factor):
    # PIL Image.blend: float lerp from degenerate towards x, clipped, truncated to uint8
    factor = factor.to(x.dtype).view(-1, *[1] * (x.dim() - 1))  # PIL's alpha is a C float
    return (degenerate + factor * (x - degenerate)).clamp_(0, 255).floor_()


def _grey(x):
    # PIL convert("L"): 0.299 R + 0.587 G + 0.114 B in 16-bit fixed point, rounded (exact in float32)
    r, g, b = x.unbind(1)
    return (r * 19595).add_(g, alpha=38470).add_(b, alpha=7471).add_(32768).div_(65536).floor_().unsqueeze(1)


def _smooth(x):
    # PIL's SMOOTH filter [[1,1,1],[1,5,1],[1,1,1]]/13, rounded, border kept; integer sums never tie
    rows = (x[..., :-2, :] + x[..., 1:-1, :]).add_(x[..., 2:, :])
    inner = (rows[..., :-2] + rows[..., 1:-1]).add_(rows[..., 2:]).add_(x[..., 1:-1, 1:-1], alpha=4)
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner.div_(13).add_(0.5).floor_()
    return out


def _lut_autocontrast(x, levels):
    # PIL ImageOps.autocontrast per channel, in float64 like PIL: int(v * scale + offset), clipped
    lo, hi = x.amin((2, 3))[..., None].double(), x.amax((2, 3))[..., None].double()
    span = (hi - lo).clamp_min(1)
    scale = torch.full_like(span, 255.0) / span  # a true division: `255 / span` multiplies by 1/span
    stretched = torch.trunc(levels.double() * scale + -lo * scale).clamp_(0, 255).to(x.dtype)
    return torch.where(hi > lo, stretched, levels)  # a flat channel stays as it is


def _lut_equalize(x, levels):
    # PIL ImageOps.equalize per channel: histograms of all B*3 planes at once with one scatter_add
    B, C, H, W = x.shape
    planes = x.reshape(B * C, H * W).long()
    ones = torch.ones(1, dtype=torch.long, device=x.device).expand_as(planes)
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device).scatter_add_(1, planes, ones)
    bins = torch.arange(256, device=x.device)
    last = ((hist > 0) * bins).amax(1, keepdim=True)
    step = (H * W - hist.gather(1, last)) // 255  # PIL leaves out the last non-empty bin
    lut = (hist.cumsum(1) - hist + step // 2) // step.clamp_min(1)
    return torch.where(step > 0, lut.clamp_max(255), bins).view(B, C, 256).to(x.dtype)


def _point_table(x, chosen, p):
    """(B,C,256) lookup table of the point op each image chose ({name: (B,) bool}), else identity.

    An image has at most one op, so the ops chain with identity arguments where not chosen:
    blend with black or the mean grey (factor 1), posterize (8 bits), solarize (threshold 256).
    """
    levels, p = device_constants(x.device).levels, p.to(x.dtype)
    pick = lambda name, value, other: torch.where(chosen[name], value, other) if name in chosen else other
    factor = pick("contrast", p, pick("brightness", p, torch.ones_like(p)))
    mean = torch.floor(_grey(x).mean((1, 2, 3)) + 0.5) if "contrast" in chosen else None  # PIL rounds it
    degenerate = pick("contrast", mean, torch.zeros_like(p)).view(-1, 1, 1)  # brightness: black
    table = _blend(degenerate, levels, factor)
    step = torch.exp2(8 - pick("posterize", p, torch.full_like(p, 8))).view(-1, 1, 1)
    table = torch.floor(table / step) * step  # keeping the top bits = rounding down to a multiple
    threshold = pick("invert", torch.zeros_like(p), pick("solarize", p, torch.full_like(p, 256)))
    table = torch.where(table >= threshold.view(-1, 1, 1), 255 - table, table)  # invert: threshold 0
    table = table.expand(x.shape[0], x.shape[1], 256)
    for name, make in (("autocontrast", _lut_autocontrast), ("equalize", _lut_equalize)):
        if name in chosen:
            table = torch.where(chosen[name].view(-1, 1, 1), make(x, levels), table)
    return table


def _apply_lut(x, lut):
    B, C = x.shape[:2]
    return lut.expand(B, C, 256).gather(2, x.reshape(B, C, -1).long()).view_as(x)


def _shear(x, p, vertical=False):
    """PIL shearX (shearY: transposed) with bicubic resampling and grey fill.

    Row y reads the input shifted by p*(y+0.5): a 1-D resampling, so one gather fetches each
    row's 4-tap window at its integer shift (taps clamped at the border, fill outside, as PIL).
    """
    if vertical:
        return _shear(x.transpose(2, 3), p, False).transpose(2, 3)
    B, C, H, W = x.shape
    # float64 as PIL: float32 moves the fill edge and turns exact integers into x.99999 (floored)
    shift = p.double().view(B, 1) * torch.arange(0.5, H, device=x.device, dtype=torch.float64)
    whole = shift.floor()
    window = (whole[..., None] + torch.arange(-1, W + 2, device=x.device)).clamp(0, W - 1).long()
    taps = x.gather(3, window[:, None].expand(B, C, H, W + 3)).double()
    v1, v2, v3, v4 = (taps[..., t:t + W] for t in range(4))
    source = torch.arange(0.5, W, device=x.device, dtype=torch.float64) + shift[..., None]  # PIL's x_in
    d = (source - 0.5 - (source - 0.5).floor())[:, None]
    # PIL's cubic (a = -1) in its Horner form: integer coefficients keep flat areas exact
    out = (v2 - v1 + v4 - v3).mul_(d).add_(2 * (v1 - v2) + v3 - v4).mul_(d).add_(v3 - v1).mul_(d).add_(v2)
    inside = (source >= 0) & (source < W)
    return torch.where(inside[:, None], out.clamp_(0, 255).floor_().to(x.dtype), 128.0)


def _inverse_map(op, p, size):
    """PIL's AFFINE data (B,2,3) for op: output pixel centre (x, y) reads input (a x + b y + c, d x + e y + f)."""
    H, W = size
    one, zero = torch.ones_like(p), torch.zeros_like(p)
    if op == "translateX":
        rows = (one, zero, p * W, zero, one, zero)
    elif op == "translateY":
        rows = (one, zero, zero, zero, one, p * H)
    else:  # rotate p degrees counter-clockwise about the centre, as PIL's Image.rotate
        cos, sin, cx, cy = torch.cos(torch.deg2rad(p)), torch.sin(torch.deg2rad(p)), W / 2, H / 2
        rows = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    return torch.stack(rows, 1).view(-1, 2, 3)


def _warp(x, matrix):
    """PIL Image.transform(AFFINE, NEAREST) per image: floor of the mapped centre, grey 128 outside."""
    B, C, H, W = x.shape
    centre_x = torch.arange(0.5, W, device=x.device, dtype=matrix.dtype)
    centre_y = torch.arange(0.5, H, device=x.device, dtype=matrix.dtype).view(H, 1)
    m = matrix.reshape(B, 6, 1, 1).unbind(1)
    src_x = torch.floor(m[0] * centre_x + m[1] * centre_y + m[2])
    src_y = torch.floor(m[3] * centre_x + m[4] * centre_y + m[5])
    inside = (src_x >= 0) & (src_x < W) & (src_y >= 0) & (src_y < H)
    index = (src_y.clamp(0, H - 1) * W + src_x.clamp(0, W - 1)).long()
    return torch.where(inside[:, None], _gather_pixels(x, index).view(B, C, H, W), 128.0)


_DEGENERATE = {"color": _grey, "sharpness": _smooth}  # what PIL's ImageEnhance blends with
# every op as image -> image, for tests and for anyone reading: AA_OPS[name](x, p)
AA_OPS = {"shearX": _shear, "shearY": functools.partial(_shear, vertical=True)}
AA_OPS |= {op: lambda x, p, op=op: _warp(x, _inverse_map(op, p, x.shape[-2:])) for op in _WARPS}
AA_OPS |= {op: lambda x, p, op=op: _blend(_DEGENERATE[op](x), x, p) for op in _BLENDS}
AA_OPS |= {op: lambda x, p, op=op: _apply_lut(x, _point_table(x, {op: torch.ones_like(p, dtype=torch.bool)}, p))
           for op in _LUTS}


def _autoaugment(x, draws):
    """One uniformly drawn sub-policy per image; each op of it fires with its own probability.

    An image runs at most one op per stage, so each op kind runs once on the whole batch with
    per-image arguments that make it the exact identity where it was not chosen (shear 0,
    identity matrix, blend factor 1, identity table): no host sync, no per-image loop.
    """
    B, dev = x.shape[0], x.device
    c = device_constants(dev, tuple(x.shape[-2:]))
    policy = draws.randint(0, len(_POLICY), (B,))
    coin = draws.rand(B, 2)
    sign = draws.randint(0, 2, (B, 2))
    for s in range(2):
        op = torch.where(coin[:, s] < c.prob[policy, s], c.op[policy, s], -1)
        param = c.param[policy, s, sign[:, s]]  # float64 like PIL's geometry; ops cast as PIL does
        chosen = {name: op == _OPS.index(name) for name in _STAGE_OPS[s]}
        for name in _SHEARS:
            if name in chosen:
                x = _shear(x, torch.where(chosen[name], param, 0.0), vertical=name == "shearY")
        if any(name in chosen for name in _WARPS):  # translate and rotate share one warp
            fired = (op >= 0).view(B, 1, 1)  # the matrix table is the identity for other ops
            x = _warp(x, torch.where(fired, c.matrix[policy, s, sign[:, s]], c.identity))
        if any(name in chosen for name in _BLENDS):  # color and sharpness share one blend
            factor, degenerate = torch.ones_like(param), None
            for name in (name for name in _BLENDS if name in chosen):
                factor = torch.where(chosen[name], param, factor)
                image, keep = _DEGENERATE[name](x), chosen[name].view(B, 1, 1, 1)
                degenerate = image if degenerate is None else torch.where(keep, image, degenerate)
            x = _blend(degenerate, x, factor)
        if any(name in chosen for name in _LUTS):  # all point ops: one table per image and channel
            x = _apply_lut(x, _point_table(x, chosen, param))
    return x


def _flip_crop(x, draws, flip, pad):
    """Random mirror, then a random crop of the zero-padded image: one gather for both."""
    B, _, H, W = x.shape
    rows = torch.arange(H, device=x.device).expand(B, H)
    cols = torch.arange(W, device=x.device).expand(B, W)
    mirror = draws.rand(B, 1) < 0.5 if flip else None
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
        offset = draws.randint(0, 2 * pad + 1, (2, B, 1))
        rows, cols = rows + offset[0], cols + offset[1]
    if flip:  # a mirrored padded image is the padded image read right to left
        cols = torch.where(mirror, W + 2 * pad - 1 - cols, cols)
    index = rows[:, :, None] * (W + 2 * pad) + cols[:, None, :]
    return _gather_pixels(x, index).view(B, -1, H, W)


def _random_erase(x, draws, prob, tries=100):
    """Random erasing as the reference code: first of `tries` boxes that fits, filled with MEAN."""
    B, _, H, W = x.shape
    dev = x.device
    u = draws.rand(4, B, tries)
    area = H * W * (0.02 + 0.38 * u[0])
    aspect = 0.3 + (1 / 0.3 - 0.3) * u[1]  # uniform, as REFERENCE.md and the reference code
    h, w = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (h < H) & (w < W)
    first = fits.int().argmax(1)  # argmax returns the first maximum
    picked = torch.stack((h, w, u[2], u[3]), -1)[torch.arange(B, device=dev), first]
    h, w, uy, ux = picked.view(B, 4, 1, 1).unbind(1)
    top, left = torch.floor(uy * (H - h + 1)), torch.floor(ux * (W - w + 1))
    erase = (draws.rand(B) < prob) & fits.any(1)
    ys = torch.arange(H, device=dev, dtype=x.dtype).view(1, H, 1)
    xs = torch.arange(W, device=dev, dtype=x.dtype).view(1, 1, W)
    box = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & erase.view(B, 1, 1)
    return torch.where(box[:, None], device_constants(dev).erase_fill, x)


def augment(x, draws, *, flip=True, crop_pad=4, autoaugment=True, erase_prob=0.25):
    """uint8 (B,3,32,32) on the device -> float32 normalised, augmented per image from `draws`.

    Order of the paper: flip -> crop from the zero-padded image -> AutoAugment -> normalise -> erasing.
    """
    x = _flip_crop(x, draws, flip, crop_pad).float()
    if autoaugment:
        x = _autoaugment(x, draws)
    x = normalize(x)
    return _random_erase(x, draws, erase_prob) if erase_prob > 0 else x


def mix(x, y, num_classes, draws, *, mix_prob=0.5, cutmix=True, mixup=True, partner="flip"):
    """CutMix or MixUp on a float batch -> (x, soft targets (B, num_classes) without smoothing).

    Per batch, as the paper's code: mixed with probability mix_prob, then CutMix or MixUp with
    equal odds (the one allowed, if only one is), lam ~ Beta(1, 1), a box centred uniformly.
    Every outcome is computed and one chosen with torch.where: no branch depends on a draw, so
    the host never waits and a graph holds the whole decision. The partner of image i is image
    perm[i] with partner="randperm" (the paper's code: a random permutation, here the argsort of
    uniform draws), or image B-1-i with "flip" (fixed pairs; the sampler already shuffles).
    """
    B, _, H, W = x.shape
    coin, pick, lam = draws.rand(3).unbind()
    centre = draws.randint(0, 1 << 20, (2,))
    centre_y, centre_x = centre[0] % H, centre[1] % W
    onehot = torch.zeros(B, num_classes, device=y.device).scatter_(1, y[:, None], 1.0)
    perm = draws.rand(B).argsort() if partner == "randperm" else torch.arange(B - 1, -1, -1,
                                                                              device=x.device)
    partner_x, partner_onehot = x[perm], onehot[perm]
    # CutMix: the box of side sqrt(1 - lam) clipped to the image; lam becomes the kept share
    cut = (1 - lam).sqrt()
    half_h, half_w = (H * cut).floor().long() // 2, (W * cut).floor().long() // 2
    y0, y1 = (centre_y - half_h).clamp(0, H), (centre_y + half_h).clamp(0, H)
    x0, x1 = (centre_x - half_w).clamp(0, W), (centre_x + half_w).clamp(0, W)
    rows = torch.arange(H, device=x.device).view(H, 1)
    cols = torch.arange(W, device=x.device).view(1, W)
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam_cut = 1 - ((y1 - y0) * (x1 - x0)).float() / (H * W)
    use_cut = pick < (0.5 if cutmix and mixup else float(cutmix))  # pick < 1 always holds
    mixed = coin < (mix_prob if (cutmix or mixup) else 0.0)
    x = torch.where(mixed & use_cut, torch.where(box, partner_x, x),
                    torch.where(mixed, torch.lerp(partner_x, x, lam), x))
    lam = torch.where(mixed, torch.where(use_cut, lam_cut, lam), 1.0)
    return x, lam * onehot + (1 - lam) * partner_onehot


# ----------------------------------------------------------------------------- sampler

class RepeatedPassSampler:
    """Batch indices as a pure function of (seed, step): the stream is shuffled pass after pass.

    Pass p is torch.randperm(n) seeded from (seed, p); global batch s is stream positions
    [s*B, (s+1)*B), possibly spanning passes; rank r takes every world_size-th of them.
    `indices(step)` serves a host step; `stream(steps)` lays the whole run's stream on the device
    once, so that `indices_at(stream, step)` serves a step counter that lives there.

    repeats N > 1 (batch augmentation, the paper's DDP rows): every image of a pass fills N
    consecutive places of one rank's share, so that its copies share a batch and are augmented
    independently. As the paper's sampler (each rank repeats each index of its DistributedSampler
    share N times in a row), rank r's share of pass p is p[r::W] with every entry N times, the
    pass padded with its first images up to a multiple of W.
    epoch_samples: each epoch is a stream of its own (fresh passes) of that many samples whose
    last partial batch is dropped, as the paper's drop_last loader; None: one endless stream.
    """

    def __init__(self, n, batch_size, seed, device, rank=0, world_size=1, repeats=1,
                 epoch_samples=None):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size}")
        if repeats < 1 or (epoch_samples is not None and epoch_samples < batch_size):
            raise ValueError(f"repeats {repeats} must be >= 1 and an epoch ({epoch_samples} "
                             f"samples) must hold a batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.repeats = n, batch_size, seed, repeats
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        # stream positions per pass: N copies of each image of the (rank-padded) pass
        self.pass_len = n if repeats == 1 else repeats * world_size * -(-n // world_size)
        self.epoch_samples = epoch_samples
        self._passes = {}

    def _host_permutation(self, p):
        state = np.random.SeedSequence([self.seed, p]).generate_state(1, np.uint64)[0]
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(int(state)))

    def _pass(self, p):
        """Pass p as stream positions (host): its permutation, each image N times in a row of
        one rank's share."""
        perm, W, N = self._host_permutation(p), self.world_size, self.repeats
        if N == 1:
            return perm
        q = torch.arange(self.pass_len)
        return perm[((q // (W * N)) * W + q % W) % self.n]  # % n: the padding wraps to the start

    def _device_pass(self, p):
        if p not in self._passes:
            positions = self._pass(p)
            if self.device.type == "cuda":  # pinned memory: the copy does not stall the device stream
                positions = positions.pin_memory()
            self._passes[p] = positions.to(self.device, non_blocking=True)
        return self._passes[p]

    def indices(self, step):
        B, L = self.batch_size, self.pass_len
        first_pass = 0  # the stream's first pass number
        if self.epoch_samples is not None:
            epoch, step = divmod(step, self.epoch_samples // B)
            first_pass = epoch * -(-self.epoch_samples // L)
        start, stop = step * B, (step + 1) * B
        passes = range(start // L, (stop - 1) // L + 1)
        parts = [self._device_pass(first_pass + p)[max(start - p * L, 0):min(stop - p * L, L)]
                 for p in passes]
        kept = {first_pass + p for p in passes}  # the current (and next) pass only
        self._passes = {p: positions for p, positions in self._passes.items() if p in kept}
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        return batch[self.rank::self.world_size]

    def stream(self, steps: int) -> torch.Tensor:
        """The image indices of the first `steps` batches, pass after pass (epoch after epoch),
        int32 on the device (the full 100-epoch recipe: 300 passes, 60 MB)."""
        B, L = self.batch_size, self.pass_len
        if self.epoch_samples is None:
            parts = [self._pass(p) for p in range(-(-steps * B // L))]
        else:
            per_epoch, passes = self.epoch_samples // B, -(-self.epoch_samples // L)
            parts = [torch.cat([self._pass(e * passes + k) for k in range(passes)])[:per_epoch * B]
                     for e in range(-(-steps // per_epoch))]
        return torch.cat(parts)[:steps * B].int().to(self.device)

    def indices_at(self, stream: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """indices(step) for a step held in a device tensor: a gather, no host in the loop."""
        offsets = torch.arange(self.rank, self.batch_size, self.world_size, device=stream.device)
        return stream[step * self.batch_size + offsets].long()


def steps_for(epochs, batch_size, n=50000, passes_per_epoch=3, drop_last=True):
    """Optimizer steps for `epochs` paper epochs (an epoch: passes_per_epoch·n samples, its last
    partial batch dropped with drop_last, as the paper's loader: 585 steps of 256)."""
    per_epoch = passes_per_epoch * n / batch_size
    return math.floor(epochs * (math.floor(per_epoch) if drop_last else per_epoch))
