"""IDX reading, file discovery, class mappings, orientation and the validation split."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import make_idx_dataset
from training import data as data_mod
from training.data import DataNotFoundError, load_dataset, read_split, stratified_split
from training.idx import IdxError, read_images, read_labels, write_idx


def test_idx_round_trip_raw_and_gz(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, x)
        np.testing.assert_array_equal(read_images(tmp_path / name), x)
    write_idx(tmp_path / "l.gz", np.arange(7, dtype=np.uint8))
    np.testing.assert_array_equal(read_labels(tmp_path / "l.gz"), np.arange(7))



def test_reader_agrees_with_torchvisions_mnist_reader(tmp_path, real_data_dir):
    """torchvision's MNIST-format reader is the reference for the bytes we return. (It is not our reader:
    in torchvision 0.29 it opens uncompressed files only, and a truncated file or one with the other
    magic number fails as "shape [...] is invalid" from .view(); see training/idx.py.)"""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for kind, ours, theirs in (("images", read_images, read_image_file), ("labels", read_labels, read_label_file)):
        packed = real_data_dir / f"emnist-bymerge-test-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        plain = tmp_path / packed.stem
        plain.write_bytes(gzip.decompress(packed.read_bytes()))
        expected = theirs(str(plain)).numpy()
        assert expected.shape[0] > 1000
        np.testing.assert_array_equal(ours(plain), expected)
        np.testing.assert_array_equal(ours(packed), expected)  # .gz: the same array

def _valid_images(tmp_path, n=3):
    path = tmp_path / "img-idx3-ubyte"
    write_idx(path, np.zeros((n, 28, 28), np.uint8))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "wrong magic number 2049"),  # labels magic on an images file
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "only uint8"),  # float32 IDX
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"\x00" * 3, "trailing bytes"),
        (lambda b: b[:6], "too short"),
        (lambda b: b[:12], "too short for them"),
    ],
)
def test_idx_corruptions_name_the_file(tmp_path, mutate, message):
    path = _valid_images(tmp_path)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(IdxError, match=message) as e:
        read_images(path)
    assert str(path) in str(e.value)


def test_idx_gzip_problems(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(IdxError, match="not a gzip file"):
        read_images(path)
    good = gzip.compress(_valid_images(tmp_path).read_bytes())
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IdxError, match="corrupt or truncated gzip"):
        read_images(path)


def test_labels_file_with_images_magic_is_refused(tmp_path):
    path = _valid_images(tmp_path)
    with pytest.raises(IdxError, match="expected 2049"):
        read_labels(path)


def test_images_are_transposed_upright(tmp_path):
    # An upright "L": vertical bar on the left, foot at the bottom. Stored transposed, as EMNIST is.
    upright = np.zeros((1, 28, 28), np.uint8)
    upright[0, 4:24, 6] = 255
    upright[0, 23, 6:20] = 255
    write_idx(tmp_path / "emnist-digits-train-images-idx3-ubyte", upright.transpose(0, 2, 1))
    write_idx(tmp_path / "emnist-digits-train-labels-idx1-ubyte", np.array([3], np.uint8))
    x, y, classes, _ = read_split("digits", "train", tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28)
    assert torch.equal(x[0], torch.from_numpy(upright[0]))
    assert y.tolist() == [3] and classes == list("0123456789")


def test_letters_labels_start_at_one(tmp_path):
    folder = make_idx_dataset(tmp_path, split="letters", n_train=52, n_test=26)
    x, y, classes, _ = read_split("letters", "train", folder)
    assert classes[0] == "Aa" and len(classes) == 26
    assert y.min() == 0 and y.max() == 25
    # without the mapping file, the built-in copy and the same offset apply
    (folder / "emnist-letters-mapping.txt").unlink()
    _, y2, classes2, _ = read_split("letters", "train", folder)
    assert classes2 == classes and torch.equal(y, y2)


def test_mapping_file_wins_and_bad_mapping_is_reported(tmp_path):
    folder = make_idx_dataset(tmp_path, n_train=20, n_test=10)
    (folder / "emnist-digits-mapping.txt").write_text("\n".join(f"{i} {ord('a') + i}" for i in range(10)))
    assert read_split("digits", "train", folder)[2] == list("abcdefghij")
    (folder / "emnist-digits-mapping.txt").write_text("0 48\nzero 49\n")
    with pytest.raises(ValueError, match="mapping.txt:2"):
        read_split("digits", "train", folder)


def test_labels_outside_mapping_and_count_mismatch(tmp_path):
    folder = make_idx_dataset(tmp_path, n_train=20, n_test=10, gz=False)
    write_idx(folder / "emnist-digits-train-labels-idx1-ubyte", np.full(20, 12, np.uint8))
    with pytest.raises(ValueError, match="mapping has 10 classes"):
        read_split("digits", "train", folder)
    write_idx(folder / "emnist-digits-train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match="20 images but .* 19 labels"):
        read_split("digits", "train", folder)


def test_discovery_order_env_var_and_torchvision_layout(tmp_path, monkeypatch):
    a = make_idx_dataset(tmp_path / "a" / "EMNIST" / "raw", n_train=20, n_test=10, gz=False, mapping=False)
    b = make_idx_dataset(tmp_path / "b", n_train=30, n_test=10)
    monkeypatch.setattr(data_mod, "DEFAULT_DATA_DIR", tmp_path / "a")
    monkeypatch.delenv("EMNIST_DATA_DIR", raising=False)
    assert len(read_split("digits", "train")[0]) == 20  # repo data/ with torchvision's EMNIST/raw layout
    monkeypatch.setenv("EMNIST_DATA_DIR", str(b))
    assert len(read_split("digits", "train")[0]) == 30  # env var before data/
    assert len(read_split("digits", "train", a.parent.parent)[0]) == 20  # explicit dir first
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_split("digits", "train", tmp_path / "nope")


def test_missing_files_and_failed_download_give_one_clear_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "EMNIST", offline)
    monkeypatch.delenv("EMNIST_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError) as e:
        read_split("balanced", "train", tmp_path)
    msg = str(e.value)
    assert "emnist-balanced-train-images-idx3-ubyte" in msg and "network unreachable" in msg and str(tmp_path) in msg


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown EMNIST split 'nope'"):
        read_split("nope", "train")


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.repeat(np.arange(5), [100, 50, 30, 10, 3])
    rest, val = stratified_split(labels, 0.2, seed=1)
    rest2, val2 = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(val, val2) and np.array_equal(rest, rest2)
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=2)[1])
    assert len(np.intersect1d(rest, val)) == 0 and len(rest) + len(val) == len(labels)
    counts = np.bincount(labels[val], minlength=5)
    assert counts.tolist() == [20, 10, 6, 2, 1]  # every class, in proportion (rare class still present)


def test_load_dataset_limits_are_subsets(digits_dir):
    full = load_dataset("digits", digits_dir, val_fraction=0.2, seed=0)
    small = load_dataset("digits", digits_dir, val_fraction=0.2, seed=0, train_limit=100, val_limit=30)
    assert len(small.train_x) == 100 and len(small.val_x) == 30
    assert torch.bincount(small.train_y, minlength=10).min() >= 9  # stratified
    # the small validation set is a subset of the full one (same seed)
    full_set = {bytes(x.numpy()) for x in full.val_x}
    assert all(bytes(x.numpy()) in full_set for x in small.val_x)
    assert len(full.train_x) + len(full.val_x) == 600


def test_real_emnist_files(real_data_dir):
    d = load_dataset("bymerge", real_data_dir)
    assert d.num_classes == 47 and d.classes[:3] == ["0", "1", "2"] and d.classes[-1] == "t"
    assert len(d.train_x) + len(d.val_x) == 98874
    # upright: ink mass of a real "7" image (label 7) is heavier at the top than the bottom
    sevens = d.train_x[d.train_y == 7][:200].float()
    assert sevens[:, :10].sum() > sevens[:, 18:].sum()


def test_copy_to_new_folder_still_reads(tmp_path, digits_dir):
    shutil.copytree(digits_dir, tmp_path / "copy")
    assert len(read_split("digits", "test", tmp_path / "copy")[0]) == 200


def test_dataset_stays_resident_on_its_device_across_runs(digits_data):
    """A reused Ray actor trains trial after trial on its own unpickled copy of the driver's dataset:
    the copy on the device is made once, by the dataset's key (here on the 'meta' device, which has
    no memory, standing in for a GPU)."""
    import dataclasses
    import pickle

    from training.data import on_device

    meta = torch.device("meta")
    first = on_device(digits_data, meta)
    assert [t.device.type for t in first] == ["meta"] * 4 and first[0].shape == digits_data.train_x.shape
    again = on_device(pickle.loads(pickle.dumps(digits_data)), meta)  # what the next trial receives
    assert all(a is b for a, b in zip(first, again, strict=True))
    other = dataclasses.replace(digits_data, train_x=digits_data.train_x[:10], train_y=digits_data.train_y[:10])
    assert other.key != digits_data.key and on_device(other, meta)[0].shape[0] == 10  # a new dataset, a new copy
    assert on_device(digits_data, meta)[0] is not first[0]  # one dataset per device is kept
    cpu = on_device(digits_data, torch.device("cpu"))
    assert cpu[0] is digits_data.train_x  # no copy where the data already is
