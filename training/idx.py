"""Strict reader for the IDX files EMNIST ships in (the MNIST format).

Header, big-endian: two zero bytes, a type code (0x08 = uint8), the number of
dimensions, then one uint32 per dimension. Images are magic 2051 (3 dims),
labels 2049 (1 dim). Every way a file can be wrong gets an error naming the
file and what is wrong, because a silently misread dataset trains garbage.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim


class IdxError(ValueError):
    """An IDX file that cannot be read; the message names the file."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        if raw[:2] != b"\x1f\x8b":
            raise IdxError(f"{path}: not a gzip file (the name ends in .gz but the gzip magic bytes are missing)")
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise IdxError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return raw


def read_idx(path: str | Path, expect_magic: int | None = None) -> np.ndarray:
    """Read an uint8 IDX file (optionally .gz) into a numpy array of its declared shape."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 8:
        raise IdxError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 8 != 0x08:
        raise IdxError(f"{path}: wrong magic number {magic}: not an IDX file of uint8 data (only uint8 is supported)")
    if expect_magic is not None and magic != expect_magic:
        kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(expect_magic, "?")
        raise IdxError(f"{path}: wrong magic number {magic} (expected {expect_magic} for an IDX {kind} file)")
    ndim = magic & 0xFF
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise IdxError(f"{path}: header declares {ndim} dimensions but the file is too short for them")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(data) - offset
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IdxError(
            f"{path}: {what}: header declares shape {tuple(shape)} = {expected} bytes of data, found {actual}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_images(path: str | Path) -> np.ndarray:
    x = read_idx(path, IMAGES_MAGIC)
    if x.ndim != 3:
        raise IdxError(f"{Path(path)}: expected 3 dimensions (count, rows, cols), found shape {x.shape}")
    return x


def read_labels(path: str | Path) -> np.ndarray:
    y = read_idx(path, LABELS_MAGIC)
    if y.ndim != 1:
        raise IdxError(f"{Path(path)}: expected 1 dimension (count), found shape {y.shape}")
    return y


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip if the name ends in .gz). Used by tests and tools."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)
