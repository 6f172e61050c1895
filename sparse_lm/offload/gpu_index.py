"""A placement in PowerInfer's gpu-index file, which its llama.cpp fork reads beside the model to split each FFN.
Legend: L layers, F neurons per layer.

The layout (facts of PowerInfer's `powerinfer-py` exporter): a GGUF v3 file of architecture "generic.gpu_index"
whose first 8 bytes are then overwritten with the magic "PWRI" and the version 3; per layer l two int32 tensors,
`blk.{l}.gpu_idx` (1 for a neuron on the GPU, else 0, over all F neurons) and `blk.{l}.gpu_bucket` (the GPU
neurons' indices, ascending); the key `generic.gpu_index.block_count` (L) and `split.vram_capacity` (uint64
bytes of VRAM the split was made for).
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
from jaxtyping import Bool

ARCHITECTURE = "generic.gpu_index"
MAGIC = b"PWRI"
VERSION = 3
VRAM_CAPACITY_KEY = "split.vram_capacity"


def write_gpu_index(path: str | os.PathLike, mask: Bool[np.ndarray, "L F"], vram_capacity: int) -> Path:
    """Writes `mask` as a PowerInfer gpu-index file, atomically (a reader never sees half a file).

    Args:
      path: the output file (PowerInfer names it `<model>.gguf.generated.gpuidx`).
      mask: bool [L, F], True for neurons on the GPU.
      vram_capacity: bytes of GPU memory the placement was made for.
    """
    import gguf

    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"mask must be a bool [layers, d_ff] array, got {mask.dtype} with shape {mask.shape}")
    if vram_capacity < 0:
        raise ValueError(f"vram_capacity must be >= 0 bytes, got {vram_capacity}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(temporary, ARCHITECTURE)
        for layer, row in enumerate(mask):
            writer.add_tensor(f"blk.{layer}.gpu_idx", row.astype(np.int32), raw_dtype=gguf.GGMLQuantizationType.I32)
            bucket = np.flatnonzero(row).astype(np.int32)
            writer.add_tensor(f"blk.{layer}.gpu_bucket", bucket, raw_dtype=gguf.GGMLQuantizationType.I32)
        writer.add_block_count(mask.shape[0])
        writer.add_uint64(VRAM_CAPACITY_KEY, int(vram_capacity))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(temporary, "r+b") as file:
            file.write(MAGIC + struct.pack("<I", VERSION))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_gpu_index(path: str | os.PathLike) -> tuple[Bool[np.ndarray, "L F"], int]:
    """Reads a gpu-index file back: (mask [L, F], vram_capacity bytes). Checks that each layer's bucket is the
    ascending list of its mask's ones."""
    import gguf

    path = Path(path)
    data = path.read_bytes()
    if data[:4] != MAGIC or struct.unpack("<I", data[4:8])[0] != VERSION:
        raise ValueError(f"{path}: not a PowerInfer gpu-index file (magic {data[:4]!r}, want {MAGIC!r} v{VERSION})")
    # The body is plain GGUF v3: read it through gguf with the standard magic restored, from a private copy.
    with tempfile.NamedTemporaryFile(suffix=".gguf") as copy:
        copy.write(b"GGUF" + data[4:])
        copy.flush()
        reader = gguf.GGUFReader(copy.name)
        tensors = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
        capacity_field = reader.get_field(VRAM_CAPACITY_KEY)
        if capacity_field is None:
            raise ValueError(f"{path}: no {VRAM_CAPACITY_KEY} key")
        vram_capacity = int(capacity_field.parts[capacity_field.data[0]][0])
    layers = sum(name.endswith(".gpu_idx") for name in tensors)
    rows = []
    for layer in range(layers):
        try:
            row, bucket = tensors[f"blk.{layer}.gpu_idx"], tensors[f"blk.{layer}.gpu_bucket"]
        except KeyError as e:
            raise ValueError(f"{path}: missing tensor {e.args[0]}") from None
        if not np.array_equal(np.flatnonzero(row), bucket):
            raise ValueError(f"{path}: blk.{layer}.gpu_bucket is not the ascending index list of blk.{layer}.gpu_idx")
        rows.append(row.astype(bool))
    return np.stack(rows), vram_capacity
