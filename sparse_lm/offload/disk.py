"""The disk tier's file and reads: neuron bundles on disk (written atomically, identified by a hash), O_DIRECT reads.

A bundle is one FFN neuron's rows back to back in float32: its gate row (gated FFNs only), its up row and its down
row, [rows, D]; a layer's F bundles are contiguous, so a neuron is one read and a layer is one sequential range
(PowerInfer-2 and LLM-in-a-Flash bundle the rows of a neuron because they are used together). Bundles are not
padded: with 512-byte O_DIRECT blocks, SmolLM2's 6,912-byte bundle (13.5 blocks) is always read as the 14 whole
blocks around it (7,168 bytes), 3.7% more than the bundle, where padding to 8 KiB would read 18.5% more and make the
file as much larger. The header (a JSON block before the data) names the layout and the sha256 of the data, which is
also the model's identity: a bundle written from other weights is stale and gets rewritten, never read.

Reads bypass the page cache (O_DIRECT into page-aligned mmap buffers); batches go through io_uring in the C++ part
(`disk_tier.cc`). A filesystem refusing O_DIRECT (tmpfs) raises `DirectIOUnsupported` naming it.
Legend: L layers, F d_ff, D d_model, N neurons read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.machinery
import json
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jaxtyping import Float

from sparse_lm.utils.io import atomic_writer

MAGIC = b"SLMNBUN1"
FORMAT_VERSION = 1
DATA_OFFSET = 4096  # the header's block: O_DIRECT blocks up to 4 KiB stay aligned
STRIDE_ALIGN = 4096  # layers start on 4 KiB boundaries, whatever the block size of the disk reading them
LIBRARY_STEM = "_disk_tier"
ERROR_BYTES = 1024
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")


class DirectIOUnsupported(OSError):
    """The filesystem holding the bundle refuses O_DIRECT (tmpfs does): reads would come from the page cache."""


class StaleBundle(ValueError):
    """A bundle file that does not hold the expected model's FFN rows in the expected layout."""


# ------------------------------------------------------------------------------------------------ the library


def library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (path := here / f"{LIBRARY_STEM}{suffix}").exists():
            return path
    return None


@functools.cache
def library() -> ctypes.CDLL:
    """The C++ part (built by setup.py), its C functions typed and its FFI handler registered with XLA, once."""
    path = library_path()
    if path is None:
        raise RuntimeError(f"the disk tier's C++ library ({LIBRARY_STEM}*.so) is not built in {Path(__file__).parent}; "
                           "reinstall the package (`pip install -e .` builds it with g++)")
    lib = ctypes.CDLL(str(path))
    p, i64, cstr = ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p
    signatures = {
        "dt_cache_create": (p, [cstr, p, i64, i64, p, i64, i64, p, i64]),
        "dt_naive_create": (p, [cstr, p, i64, i64, p, p, i64]),
        "dt_destroy": (None, [p]),
        "dt_resolve": (ctypes.c_int, [p, i64, p, i64, p, p, i64]),
        "dt_reset": (None, [p]),
        "dt_stats": (None, [p, p]),
        "dt_where": (i64, [p, i64, i64]),
        "dt_lru_order": (i64, [p, p]),
        "dt_pinned_layers": (i64, [p]),
        "dt_read_ranges": (ctypes.c_int, [cstr, i64, p, p, p, i64, p, p, i64]),
        "dt_prefetch": (None, [p, i64, p, i64]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    jax.ffi.register_ffi_target("sparse_lm_disk_tier_ffn", jax.ffi.pycapsule(lib.DiskTierFfn), platform="cpu")
    jax.ffi.register_ffi_target("sparse_lm_disk_tier_prefetch", jax.ffi.pycapsule(lib.DiskTierPrefetch),
                                platform="cpu")
    return lib


def error_buffer() -> ctypes.Array:
    return ctypes.create_string_buffer(ERROR_BYTES)


def pointer(array: np.ndarray) -> int:
    return array.ctypes.data


# ------------------------------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class BundleLayout:
    """Where every neuron's bundle is in a bundle file (byte offsets from the file's start)."""

    n_layers: int
    d_ff: int
    d_model: int
    rows: tuple[str, ...]  # ("gate", "up", "down") or ("up", "down")
    sha256: str  # of the data region: the model's FFN rows in this layout
    model: str = ""
    dtype: str = "float32"
    data_offset: int = DATA_OFFSET

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))
        if self.rows not in (("gate", "up", "down"), ("up", "down")):
            raise ValueError(f"bundle rows must be gate, up, down or up, down; got {self.rows}")
        if self.dtype != "float32":
            raise ValueError(f"bundles hold float32 rows, got dtype {self.dtype}")
        if min(self.n_layers, self.d_ff, self.d_model) < 1:
            raise ValueError(f"bundle shape {self.n_layers} x {self.d_ff} x {self.d_model} must be positive")

    @property
    def neuron_bytes(self) -> int:
        return len(self.rows) * self.d_model * 4

    @property
    def layer_bytes(self) -> int:
        return self.d_ff * self.neuron_bytes

    @property
    def layer_stride(self) -> int:
        return -(-self.layer_bytes // STRIDE_ALIGN) * STRIDE_ALIGN

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.n_layers * self.layer_stride

    @property
    def ffn_bytes(self) -> int:
        """The model's FFN weights (every bundle once): what a RAM budget fraction is a fraction of."""
        return self.n_layers * self.layer_bytes

    def offset(self, layer: int, neuron: int) -> int:
        return self.data_offset + layer * self.layer_stride + neuron * self.neuron_bytes

    def window_bytes(self, align: int) -> int:
        """The longest read of one neuron: the whole `align`-byte blocks around its bundle."""
        starts = np.arange(self.d_ff, dtype=np.int64) * self.neuron_bytes
        ends = -(-(starts + self.neuron_bytes) // align) * align
        return int((ends - starts // align * align).max())

    def geometry(self, align: int) -> np.ndarray:
        """The C++ part's Geometry: L, F, D, rows, neuron bytes, layer stride, data offset, block, window."""
        return np.array([self.n_layers, self.d_ff, self.d_model, len(self.rows), self.neuron_bytes,
                         self.layer_stride, self.data_offset, align, self.window_bytes(align)], np.int64)

    def header(self) -> bytes:
        fields = {"format": "sparse_lm neuron bundles", "version": FORMAT_VERSION} | dataclasses.asdict(self)
        text = json.dumps(fields, sort_keys=True).encode()
        block = MAGIC + len(text).to_bytes(4, "little") + text
        if len(block) > self.data_offset:
            raise ValueError(f"bundle header of {len(block)} bytes does not fit before the data at {self.data_offset}")
        return block.ljust(self.data_offset, b"\0")


def ffn_bundles(model) -> Iterator[Float[np.ndarray, "F R"]]:
    """Per layer, its neurons' bundles [F, rows * D] in float32 (the model stores W_gate and W_up [D, F])."""
    for block in model.blocks:
        ffn = block.ffn
        rows = [] if ffn.w_gate is None else [np.asarray(ffn.w_gate[...]).T]
        rows += [np.asarray(ffn.w_up[...]).T, np.asarray(ffn.w_down[...])]
        yield np.ascontiguousarray(np.concatenate(rows, axis=1), dtype=np.float32)


def expected_layout(model) -> BundleLayout:
    """The layout and hash a bundle of `model` has (hashes the FFN rows: ~0.3 s for SmolLM2-135M)."""
    digest = hashlib.sha256()
    for bundles in ffn_bundles(model):
        digest.update(memoryview(bundles).cast("B"))
    config = model.config
    rows = ("gate", "up", "down") if config.activation.gated else ("up", "down")
    return BundleLayout(config.n_layers, config.d_ff, config.d_model, rows, digest.hexdigest(), config.name)


def write_bundle(path: str | os.PathLike, model) -> BundleLayout:
    """Writes `model`'s FFN bundles to `path` atomically: a temporary file in the same folder, fsynced, then renamed
    over `path` (a reader sees the old file or the new one). Returns the layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    placeholder = expected_layout(model)  # the header carries the hash, so it is computed before writing
    with atomic_writer(path) as f:
        f.write(placeholder.header())
        padding = b"\0" * (placeholder.layer_stride - placeholder.layer_bytes)
        for bundles in ffn_bundles(model):
            f.write(memoryview(bundles).cast("B"))
            f.write(padding)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
    drop_page_cache(path)
    return placeholder


def drop_page_cache(path: str | os.PathLike) -> None:
    """Evicts the file's pages from the page cache (just written, they would sit there; O_DIRECT ignores them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_layout(path: str | os.PathLike) -> BundleLayout:
    """The layout in a bundle file's header; StaleBundle if it is not a readable bundle of this format."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            block = f.read(DATA_OFFSET)
    except FileNotFoundError:
        raise StaleBundle(f"{path}: no such bundle file") from None
    if not block.startswith(MAGIC):
        raise StaleBundle(f"{path}: not a neuron bundle file (bad magic)")
    length = int.from_bytes(block[len(MAGIC) : len(MAGIC) + 4], "little")
    try:
        fields = json.loads(block[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StaleBundle(f"{path}: unreadable bundle header") from None
    if fields.pop("version", None) != FORMAT_VERSION:
        raise StaleBundle(f"{path}: bundle format version is not {FORMAT_VERSION}")
    fields.pop("format", None)
    try:
        layout = BundleLayout(**fields)
    except (TypeError, ValueError) as e:
        raise StaleBundle(f"{path}: bad bundle header ({e})") from None
    if path.stat().st_size != layout.file_bytes:
        raise StaleBundle(f"{path}: {path.stat().st_size} bytes where the header implies {layout.file_bytes}")
    return layout


def ensure_bundle(path: str | os.PathLike, model) -> tuple[BundleLayout, str]:
    """The bundle of `model` at `path`, written if missing or stale (another model's, another layout, truncated).

    Returns:
      (layout, what happened): "reused", or "written: <why the old one could not be used>".
    """
    expected = expected_layout(model)
    try:
        found = read_layout(path)
        if found != expected:
            raise StaleBundle(f"{path}: holds {found.model or 'another model'} (sha256 {found.sha256[:12]}, "
                              f"{found.n_layers}x{found.d_ff}x{found.d_model}), not {expected.model} "
                              f"(sha256 {expected.sha256[:12]})")
        return found, "reused"
    except StaleBundle as e:
        reason = str(e)
    return write_bundle(path, model), f"written: {reason}"


# ------------------------------------------------------------------------------------------------ O_DIRECT reads


def filesystem_of(path: str | os.PathLike) -> str:
    """The filesystem type of the mount holding `path` (from /proc/mounts; "unknown" elsewhere)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def aligned_buffer(n_bytes: int) -> tuple[mmap.mmap, int]:
    """A page-aligned anonymous mapping of at least `n_bytes` and its address (an O_DIRECT destination)."""
    buffer = mmap.mmap(-1, max(n_bytes, mmap.PAGESIZE))
    return buffer, ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def direct_io_alignment(path: str | os.PathLike) -> int:
    """The smallest block (512, 1024, ..., 4096 bytes) that O_DIRECT reads of `path` accept for offset, length and
    buffer address, found by trying: Linux reports it only through statx, which Python does not expose.

    Raises:
      DirectIOUnsupported: naming the filesystem, if it refuses O_DIRECT or holds files in RAM (tmpfs).
    """
    kind = filesystem_of(path)
    if kind in MEMORY_FILESYSTEMS:  # Linux >= 6.6 accepts O_DIRECT on tmpfs, but its files are RAM
        raise DirectIOUnsupported(0, f"{path} is on {kind}, which keeps files in RAM: reads there cannot measure a "
                                     "disk; put the bundle on a disk-backed filesystem (bundle_dir)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        raise DirectIOUnsupported(e.errno, f"O_DIRECT refused for {path} on a {filesystem_of(path)} filesystem "
                                           f"({e.strerror}): put the bundle on a disk-backed filesystem "
                                           "(bundle_dir)") from None
    buffer, _ = aligned_buffer(2 * 4096)
    try:
        for block in (512, 1024, 2048, 4096):
            try:  # a block-sized read, at a block offset, into a block- (not page-) aligned address
                if os.preadv(fd, [memoryview(buffer)[block : 2 * block]], block) >= 0:
                    return block
            except OSError:
                continue
    finally:
        os.close(fd)
        buffer.close()
    raise DirectIOUnsupported(0, f"O_DIRECT reads of {path} ({filesystem_of(path)}) failed at every block size up "
                                 "to 4 KiB")


def _check_aligned(offsets: np.ndarray, lengths: np.ndarray, align: int) -> None:
    if offsets.shape != lengths.shape or offsets.ndim != 1:
        raise ValueError("offsets and lengths must be 1-d arrays of one length")
    bad = (offsets % align != 0) | (lengths % align != 0) | (lengths <= 0)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"O_DIRECT range {k} (offset {offsets[k]}, length {lengths[k]}) is not aligned to the "
                         f"{align}-byte block")


def _read_into(path: str | os.PathLike, offsets: np.ndarray, lengths: np.ndarray, dests: np.ndarray,
               queue_depth: int) -> bool:
    """Reads range k into address dests[k]; returns whether io_uring was used."""
    uring, error = np.zeros(1, np.int64), error_buffer()
    status = library().dt_read_ranges(os.fsencode(path), queue_depth, pointer(offsets), pointer(lengths),
                                      pointer(dests), len(offsets), pointer(uring), error, ERROR_BYTES)
    if status != 0:
        raise OSError(error.value.decode())
    return bool(uring[0])


def read_ranges(path: str | os.PathLike, offsets: np.ndarray, lengths: np.ndarray, align: int,
                queue_depth: int = 64) -> tuple[list[memoryview], bool]:
    """Reads block-aligned ranges of `path` with O_DIRECT, `queue_depth` in flight (io_uring).

    Returns:
      (one view per range into page-aligned buffers, whether io_uring was used).
    """
    offsets = np.ascontiguousarray(offsets, np.int64)
    lengths = np.ascontiguousarray(lengths, np.int64)
    _check_aligned(offsets, lengths, align)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    buffer, address = aligned_buffer(int(lengths.sum()))
    uring = _read_into(path, offsets, lengths, (address + starts).astype(np.uint64), queue_depth)
    view = memoryview(buffer)
    return [view[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)], uring


def _timed_reads(path: str | os.PathLike, offsets: np.ndarray, lengths: np.ndarray, align: int,
                 queue_depth: int) -> tuple[float, bool]:
    """Seconds to read the ranges into a ring of 2 x queue_depth pre-faulted buffers (no page faults timed)."""
    offsets = np.ascontiguousarray(offsets, np.int64)
    lengths = np.ascontiguousarray(lengths, np.int64)
    _check_aligned(offsets, lengths, align)
    ring = 2 * queue_depth
    size = int(lengths.max())
    buffer, address = aligned_buffer(ring * size)
    buffer.write(b"\1" * len(buffer))  # faults every page in before the clock starts
    dests = (address + np.arange(len(offsets)) % ring * size).astype(np.uint64)
    start = time.perf_counter()
    uring = _read_into(path, offsets, lengths, dests, queue_depth)
    seconds = time.perf_counter() - start
    buffer.close()
    return seconds, uring


def read_neurons(path: str | os.PathLike, layout: BundleLayout, layer: int, neurons: np.ndarray, align: int,
                 queue_depth: int = 64) -> Float[np.ndarray, "N R D"]:
    """The bundles of `neurons` of `layer`, one O_DIRECT read each ([N, rows, D])."""
    neurons = np.asarray(neurons, np.int64)
    if neurons.size and (neurons.min() < 0 or neurons.max() >= layout.d_ff or not 0 <= layer < layout.n_layers):
        raise ValueError(f"neurons of layer {layer} must be in [0, {layout.d_ff}) of {layout.n_layers} layers")
    offsets = layout.data_offset + layer * layout.layer_stride + neurons * layout.neuron_bytes
    starts = offsets // align * align
    ends = -(-(offsets + layout.neuron_bytes) // align) * align
    views, _ = read_ranges(path, starts, ends - starts, align, queue_depth)
    out = np.empty((len(neurons), len(layout.rows), layout.d_model), np.float32)
    for k, (view, skip) in enumerate(zip(views, (offsets - starts).tolist(), strict=True)):
        out[k] = np.frombuffer(view, np.float32, len(layout.rows) * layout.d_model, skip).reshape(out.shape[1:])
    return out


def read_layer(path: str | os.PathLike, layout: BundleLayout, layer: int, align: int, chunk_bytes: int = 1 << 20,
               queue_depth: int = 16) -> Float[np.ndarray, "F R D"]:
    """A whole layer's bundles in chunked sequential O_DIRECT reads ([F, rows, D])."""
    starts = np.arange(0, layout.layer_stride, chunk_bytes, dtype=np.int64)
    lengths = np.minimum(chunk_bytes, layout.layer_stride - starts)
    views, _ = read_ranges(path, layout.data_offset + layer * layout.layer_stride + starts, lengths, align,
                           queue_depth)
    data = b"".join(views)[: layout.layer_bytes]
    return np.frombuffer(data, np.float32).reshape(layout.d_ff, len(layout.rows), layout.d_model).copy()


@dataclasses.dataclass(frozen=True)
class DiskSpeed:
    """O_DIRECT read speed of the bundle file, measured here."""

    sequential_gb_per_s: float  # whole layers in `chunk_bytes` reads
    random_reads_per_s: float  # one neuron window per read, random neurons, `queue_depth` in flight
    random_gb_per_s: float
    queue_depth: int
    read_bytes: int  # of one random read
    chunk_bytes: int
    io_uring: bool


def measure_disk(path: str | os.PathLike, layout: BundleLayout, align: int, *, queue_depth: int,
                 sequential_depth: int, chunk_bytes: int, random_reads: int = 20000, seed: int = 0) -> DiskSpeed:
    """Sequential GB/s over the whole bundle (best of two passes) and random neuron reads per second."""
    layer_starts = np.arange(0, layout.layer_stride, chunk_bytes, dtype=np.int64)
    offsets = (layout.data_offset + layout.layer_stride * np.arange(layout.n_layers, dtype=np.int64)[:, None]
               + layer_starts[None]).reshape(-1)
    lengths = np.tile(np.minimum(chunk_bytes, layout.layer_stride - layer_starts), layout.n_layers)
    passes = [_timed_reads(path, offsets, lengths, align, sequential_depth) for _ in range(2)]
    sequential = lengths.sum() / min(seconds for seconds, _ in passes)
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, layout.n_layers * layout.d_ff, random_reads)
    neuron_offsets = layout.data_offset + keys // layout.d_ff * layout.layer_stride + keys % layout.d_ff * \
        layout.neuron_bytes
    window = layout.window_bytes(align)
    seconds, uring = _timed_reads(path, neuron_offsets // align * align, np.full(random_reads, window, np.int64),
                                  align, queue_depth)
    per_s = random_reads / seconds
    return DiskSpeed(sequential / 1e9, per_s, per_s * window / 1e9, queue_depth, window, chunk_bytes, uring)
