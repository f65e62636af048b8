"""Strict reader for the IDX files EMNIST ships in (the MNIST format).

Header, big-endian: two zero bytes, a type code (0x08 = uint8), the number of
dimensions, then one uint32 per dimension. Images are magic 2051 (3 dims),
labels 2049 (1 dim). Every way a file can be wrong gets an error naming the
file and what is wrong, because a silently misread dataset trains garbage.

Why not torchvision's reader (torchvision.datasets.mnist.read_image_file): in torchvision 0.29 it
opens uncompressed files only (`open(path)`; NIST's files and ../shared/emnist are .gz) and checks
with `assert`s, so a truncated file, one with trailing bytes or a labels file given as images all
fail as "shape '[5, 28, 28]' is invalid for input of size 3910" from .view() (measured). Its
parsing, past those checks, is the one `np.frombuffer(...).reshape(...)` line below; it is the
reference our arrays are tested against (tests/test_data.py).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim
IMAGE_SIZE = (28, 28)  # every EMNIST image; the models are built for it
_CHUNK = 1 << 20


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


def _parse_header(path: Path, head: bytes, length: int, expect_magic: int | None) -> tuple[tuple[int, ...], int]:
    """(declared shape, data offset) from the first bytes of a file of `length` bytes (decompressed),
    checking that the file holds exactly the data the header declares."""
    if length < 8:
        raise IdxError(f"{path}: too short for an IDX header ({length} bytes)")
    (magic,) = struct.unpack(">I", head[:4])
    if magic >> 8 != 0x08:
        raise IdxError(f"{path}: wrong magic number {magic}: not an IDX file of uint8 data (only uint8 is supported)")
    if expect_magic is not None and magic != expect_magic:
        kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(expect_magic, "?")
        raise IdxError(f"{path}: wrong magic number {magic} (expected {expect_magic} for an IDX {kind} file)")
    ndim = magic & 0xFF
    if ndim == 0 or length < 4 + 4 * ndim:
        raise IdxError(f"{path}: header declares {ndim} dimensions but the file is too short for them")
    shape = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64))
    actual = length - offset
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IdxError(
            f"{path}: {what}: header declares shape {tuple(shape)} = {expected} bytes of data, found {actual}"
        )
    return tuple(shape), offset


def read_idx(path: str | Path, expect_magic: int | None = None) -> np.ndarray:
    """Read an uint8 IDX file (optionally .gz) into a numpy array of its declared shape."""
    path = Path(path)
    data = _read_bytes(path)
    shape, offset = _parse_header(path, data[: 4 + 4 * 255], len(data), expect_magic)
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx_header(path: str | Path, expect_magic: int | None = None) -> tuple[int, ...]:
    """The shape an IDX file declares, after the same checks `read_idx` makes (magic, sizes, a
    whole gzip stream), without keeping its contents: a raw file's size comes from the file
    system; a .gz file is decompressed in chunks (verifying its checksum) and only counted."""
    path = Path(path)
    if path.suffix != ".gz":
        with path.open("rb") as f:
            head = f.read(4 + 4 * 255)
        return _parse_header(path, head, path.stat().st_size, expect_magic)[0]
    with path.open("rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raise IdxError(f"{path}: not a gzip file (the name ends in .gz but the gzip magic bytes are missing)")
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4 + 4 * 255)
            length = len(head)
            while chunk := f.read(_CHUNK):
                length += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        raise IdxError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return _parse_header(path, head, length, expect_magic)[0]


def check_images_shape(path: str | Path, shape: tuple[int, ...]) -> None:
    """An EMNIST images file: (count > 0, 28, 28)."""
    if len(shape) != 3:
        raise IdxError(f"{Path(path)}: expected 3 dimensions (count, rows, cols), found shape {tuple(shape)}")
    if tuple(shape[1:]) != IMAGE_SIZE:
        raise IdxError(f"{Path(path)}: images are {shape[1]}x{shape[2]} pixels; EMNIST images are "
                       f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} (the header declares shape {tuple(shape)})")
    if shape[0] == 0:
        raise IdxError(f"{Path(path)}: holds no images (the header declares 0)")


def check_labels_shape(path: str | Path, shape: tuple[int, ...]) -> None:
    """An EMNIST labels file: (count > 0,)."""
    if len(shape) != 1:
        raise IdxError(f"{Path(path)}: expected 1 dimension (count), found shape {tuple(shape)}")
    if shape[0] == 0:
        raise IdxError(f"{Path(path)}: holds no labels (the header declares 0)")


def read_images(path: str | Path) -> np.ndarray:
    x = read_idx(path, IMAGES_MAGIC)
    check_images_shape(path, x.shape)
    return x


def read_labels(path: str | Path) -> np.ndarray:
    y = read_idx(path, LABELS_MAGIC)
    check_labels_shape(path, y.shape)
    return y


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip if the name ends in .gz). Used by tests and tools."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)
