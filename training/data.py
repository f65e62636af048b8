"""EMNIST loading: find the official files, read them strictly, carve a validation split.

Everything is kept as uint8 tensors (N, 28, 28), upright, so the trainer can put the
whole training set on its device once and batch it with randperm (no DataLoader).
The test split is only read by `load_test`, which is called for final evaluation.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.idx import (
    IMAGES_MAGIC,
    IdxError,
    check_images_shape,
    read_idx_header,
    read_images,
    read_labels,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "data"
ENV_VAR = "EMNIST_DATA_DIR"

_DIGITS = [chr(c) for c in range(ord("0"), ord("9") + 1)]
_UPPER = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_LOWER = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_MERGED_LOWER = list("abdefghnqrt")  # the lowercase letters that differ from their capitals

# Used only when a folder has no mapping file (torchvision's EMNIST/raw/ drops them);
# these are the official mapping files' contents. The file always wins when present.
BUILTIN_CLASSES: dict[str, list[str]] = {
    "balanced": _DIGITS + _UPPER + _MERGED_LOWER,
    "bymerge": _DIGITS + _UPPER + _MERGED_LOWER,
    "byclass": _DIGITS + _UPPER + _LOWER,
    "letters": [u + lo for u, lo in zip(_UPPER, _LOWER, strict=True)],  # case-merged: "Aa", "Bb", ...
    "digits": _DIGITS,
    "mnist": _DIGITS,
}
SPLITS = tuple(BUILTIN_CLASSES)


class DataNotFoundError(FileNotFoundError):
    """No EMNIST files where we looked, and downloading was not possible."""


@dataclass(frozen=True)
class EmnistData:
    """Training and validation tensors of one split (uint8 images, int64 labels, CPU).

    `key` names this dataset, and travels with it when it is pickled (a Ray trial gets its own
    copy of the driver's object): `on_device` keeps one resident copy per process by it. A dataset
    derived from another (`dataclasses.replace`, a new EmnistData) gets a key of its own."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    split: str
    source: str
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", uuid.uuid4().hex)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# device -> (dataset key, its four tensors there): what `on_device` keeps resident in this process.
_RESIDENT: dict[str, tuple[str, tuple[torch.Tensor, ...]]] = {}


def on_device(data: EmnistData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, val_x, val_y) on `device`, copied there once per process and dataset.

    A Ray actor runs trial after trial (reused actors) on the same dataset: its images stay
    resident on the GPU instead of being copied again (~75 MB for bymerge) for every trial. One
    dataset per device is kept, the newest; the CPU needs no copy. Callers must not modify the
    returned tensors in place (the next run gets the same ones)."""
    tensors = (data.train_x, data.train_y, data.val_x, data.val_y)
    if device.type == "cpu":
        return tensors
    name = str(device)
    kept = _RESIDENT.get(name)
    if kept is not None and kept[0] == data.key:
        return kept[1]  # type: ignore[return-value]
    _RESIDENT.pop(name, None)  # the old copy goes before the new one takes its memory
    moved = tuple(t.to(device) for t in tensors)
    _RESIDENT[name] = (data.key, moved)
    return moved  # type: ignore[return-value]


def file_names(split: str, part: str) -> dict[str, str]:
    stem = f"emnist-{split}-{part}"
    return {"images": f"{stem}-images-idx3-ubyte", "labels": f"{stem}-labels-idx1-ubyte"}


def _find_in(folder: Path, split: str, part: str) -> dict[str, Path] | None:
    for base in (folder, folder / "EMNIST" / "raw"):
        found = {}
        for key, name in file_names(split, part).items():
            for candidate in (base / name, base / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == 2:
            return found
    return None


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where to look, in order: explicit dir, $EMNIST_DATA_DIR, then data/ in the repo."""
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataNotFoundError(f"data dir {data_dir} does not exist or is not a directory")
        return [data_dir]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(DEFAULT_DATA_DIR)
    return dirs


def _not_found_message(split: str, part: str, dirs: list[Path], download_error: str) -> str:
    names = file_names(split, part)
    return (
        f"EMNIST '{split}' {part} files not found and the download failed ({download_error}).\n"
        f"Looked in: {', '.join(str(d) for d in dirs)} (each directly and under EMNIST/raw/).\n"
        f"Put these files (optionally .gz) in one of them, e.g. {DEFAULT_DATA_DIR}, or point "
        f"--data-dir / ${ENV_VAR} at their folder:\n"
        f"  {names['images']}\n  {names['labels']}\n  emnist-{split}-mapping.txt (optional)\n"
        "They are in NIST's gzip.zip (https://www.nist.gov/itl/products-and-services/emnist-dataset)."
    )


def locate(split: str, part: str, data_dir: str | Path | None = None, download: bool = True) -> dict[str, Path]:
    """Paths of the images/labels files for split/part, downloading via torchvision if absent."""
    if split not in SPLITS:
        raise ValueError(f"unknown EMNIST split {split!r}; choose one of {', '.join(SPLITS)}")
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', not {part!r}")
    dirs = candidate_dirs(data_dir)
    for d in dirs:
        found = _find_in(d, split, part)
        if found:
            return found
    if not download:
        raise DataNotFoundError(_not_found_message(split, part, dirs, "download disabled"))
    target = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    try:
        import torchvision  # only needed for this fallback

        target.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.EMNIST(str(target), split=split, train=(part == "train"), download=True)
    except Exception as e:  # offline, DNS, checksum, disk: all mean "put the files there yourself"
        raise DataNotFoundError(_not_found_message(split, part, dirs, f"{type(e).__name__}: {e}")) from None
    found = _find_in(target, split, part)
    if not found:
        raise DataNotFoundError(_not_found_message(split, part, dirs, "downloaded archive lacked the files"))
    return found


def _mapping_path(folder: Path, split: str) -> Path | None:
    for base in (folder, folder / "EMNIST" / "raw", folder.parent):
        path = base / f"emnist-{split}-mapping.txt"
        if path.is_file():
            return path
    return None


def first_label(split: str) -> int:
    """Official 'letters' labels run 1..26, all others start at 0."""
    return 1 if split == "letters" else 0


_MAPPING_LINE = re.compile(r"[0-9 \t]*")
_MAX_MAPPING_BYTES = 1 << 20  # the official files are < 1 KB


def _mapping_char(path: Path, n: int, code: int) -> str:
    if code > 0x10FFFF:
        raise ValueError(f"{path}:{n}: character code {code} is out of range (Unicode ends at {0x10FFFF})")
    ch = chr(code)
    if 0xD800 <= code <= 0xDFFF or not ch.isprintable() or ch.isspace():
        what = "NUL" if code == 0 else "a control, space or unassigned character"
        raise ValueError(f"{path}:{n}: character code {code} is {what}, not a character a class can be")
    return ch


def read_mapping(folder: Path, split: str) -> tuple[list[str], int]:
    """(class names in label order, first label). The official mapping file wins when present;
    otherwise the built-in copy. Official 'letters' labels run 1..26, all others start at 0.
    The file is read strictly: lines of 'label code [code]' in ASCII digits, labels first..first+n-1
    each once, every code a printable character, no two labels with the same class."""
    path = _mapping_path(folder, split)
    start = first_label(split)
    if path is None:
        return list(BUILTIN_CLASSES[split]), start
    raw = path.read_bytes()
    if len(raw) > _MAX_MAPPING_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes is far too large for a class mapping file")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file (byte {e.start} is not UTF-8): expected lines of "
                         "'label ascii_code'") from None
    rows: list[tuple[int, str, int]] = []
    label_line: dict[int, int] = {}
    class_line: dict[str, tuple[int, int]] = {}
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if "\x00" in line:
            raise ValueError(f"{path}:{n}: contains a NUL character; expected 'label ascii_code [ascii_code]'")
        if not line.strip():
            continue
        parts = line.split()
        if not _MAPPING_LINE.fullmatch(line) or not 2 <= len(parts) <= 3 or any(len(p) > 9 for p in parts):
            raise ValueError(f"{path}:{n}: expected 'label ascii_code [ascii_code]' (2 or 3 columns of ASCII "
                             f"digits), got {line!r}")
        label, codes = int(parts[0]), [int(p) for p in parts[1:]]
        name = "".join(dict.fromkeys(_mapping_char(path, n, c) for c in codes))
        if label in label_line:
            raise ValueError(f"{path}:{n}: label {label} appears twice (also on line {label_line[label]})")
        if name in class_line:
            other, m = class_line[name]
            raise ValueError(f"{path}:{n}: class {name!r} appears twice (also label {other} on line {m})")
        label_line[label], class_line[name] = n, (label, n)
        rows.append((label, name, n))
    if not rows:
        raise ValueError(f"{path}: no mapping lines (expected 'label ascii_code' per class)")
    rows.sort()
    labels = [r[0] for r in rows]
    if labels != list(range(start, start + len(rows))):
        missing = sorted(set(range(start, start + len(rows))) - set(labels))
        raise ValueError(f"{path}: labels must run {start}..{start + len(rows) - 1} without gaps for the "
                         f"{split!r} split, found {labels[0]}..{labels[-1]}"
                         + (f" (missing {', '.join(map(str, missing[:5]))})" if missing else ""))
    return [r[1] for r in rows], start


def read_split(
    split: str, part: str, data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """(images uint8 (N,28,28) upright, labels int64 0..C-1, class names, source folder)."""
    paths = locate(split, part, data_dir)
    x = read_images(paths["images"])
    y = read_labels(paths["labels"])
    if len(x) != len(y):
        raise ValueError(f"{paths['images']} has {len(x)} images but {paths['labels']} has {len(y)} labels")
    folder = paths["images"].parent
    classes, first = read_mapping(folder, split)
    y = _check_labels(paths["labels"], y, first, classes)
    # EMNIST stores images transposed (column-major); fix it once here so that training,
    # evaluation and user drawings all share the upright orientation.
    images = torch.from_numpy(x.copy()).transpose(1, 2).contiguous()
    return images, torch.from_numpy(y), classes, str(folder)


def _check_labels(path: Path, y: np.ndarray, first: int, classes: list[str]) -> np.ndarray:
    y = y.astype(np.int64) - first
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(
            f"{path}: labels span {y.min()}..{y.max()} after offset, but the mapping has "
            f"{len(classes)} classes"
        )
    return y


def check_split(split: str, part: str, data_dir: str | Path | None = None,
                classes: list[str] | None = None) -> int:
    """Check, without reading the images, that a split's files will load: both headers (magic,
    28x28 images, a non-empty count, file sizes or the whole gzip stream), equal counts, the
    mapping, the labels in range and, if given, the same classes. Returns the number of images.
    Run before training for the test split, which is only read at the end."""
    paths = locate(split, part, data_dir)
    shape = read_idx_header(paths["images"], IMAGES_MAGIC)
    check_images_shape(paths["images"], shape)
    y = read_labels(paths["labels"])  # small (1 byte per image)
    if len(y) != shape[0]:
        raise IdxError(f"{paths['images']} has {shape[0]} images but {paths['labels']} has {len(y)} labels")
    have, first = read_mapping(paths["images"].parent, split)
    _check_labels(paths["labels"], y, first, have)
    if classes is not None and have != list(classes):
        raise ValueError(f"the {split} {part} files in {paths['images'].parent} have classes {have[:5]}... "
                         f"({len(have)}), but the train files have {list(classes)[:5]}... ({len(classes)})")
    return shape[0]


def stratified_split(labels: np.ndarray | torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping class proportions: returns (rest_idx, picked_idx), picked ~ fraction of each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rest, picked = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if 0 < fraction < 1 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)  # every class present on both sides
        picked.append(idx[:k])
        rest.append(idx[k:])
    rest_idx, picked_idx = np.concatenate(rest), np.concatenate(picked)
    return np.sort(rest_idx), np.sort(picked_idx)


def _limit(idx: np.ndarray, labels: torch.Tensor, limit: int, seed: int) -> np.ndarray:
    if not limit or limit >= len(idx):
        return idx
    _, keep = stratified_split(labels[idx].numpy(), limit / len(idx), seed)
    return idx[keep]


def load_dataset(
    split: str = "balanced",
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_limit: int = 0,
    val_limit: int = 0,
) -> EmnistData:
    """Read the train file and carve a stratified, seeded validation split from it."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    x, y, classes, source = read_split(split, "train", data_dir)
    train_idx, val_idx = stratified_split(y.numpy(), val_fraction, seed)
    # Limits take stratified subsets *after* the split, so the validation images of a
    # small run are a subset of those of a full run with the same seed.
    train_idx = _limit(train_idx, y, train_limit, seed + 1)
    val_idx = _limit(val_idx, y, val_limit, seed + 2)
    ti, vi = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return EmnistData(x[ti], y[ti], x[vi], y[vi], classes, split, source)


def load_for_config(config, data_dir: str | Path | None = None) -> EmnistData:
    """The training data a config asks for (its split, validation fraction, seed and limits): the
    one spelling of that call for the CLI, the search and the benchmarks."""
    c = config if isinstance(config, dict) else vars(config)  # a config dict, or a TrainConfig
    return load_dataset(c["split"], data_dir, c["val_fraction"], c["seed"], c["train_limit"], c["val_limit"])


def load_test(
    split: str = "balanced", data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The test split, for final evaluation only (never for model selection)."""
    x, y, classes, _ = read_split(split, "test", data_dir)
    return x, y, classes


# Pixel statistics of EMNIST (0..1 scale), measured on the training images. Shared by
# training, evaluation and the predictor so a model never sees differently scaled input.
PIXEL_MEAN = 0.1736
PIXEL_STD = 0.3317


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (background 0) -> zero-mean, unit-variance model input."""
    return (x - PIXEL_MEAN) / PIXEL_STD
