"""Bad input is refused early, in one line, naming what is wrong: IDX files that are not 28x28
EMNIST images, strict mapping files, a damaged test split (checked before the first epoch),
configs that cannot run here (non-finite numbers, a device this machine lacks, a model too large
to allocate), every command line's refusal as a user sees it, and an extended run (new schedule length).
Storage that cannot be written: tests/test_storage.py; the printed resume command: tests/test_run.py;
checkpoints of random or damaged bytes: tests/test_checkpoint.py."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_idx_dataset
from tests.helpers import PREDICT, REPO, SEARCH, TRAIN, one_line_error, one_trial_space, run
from training.checkpoint import load_checkpoint
from training.config import ConfigError, check_device, load_yaml, make_config, parse_set
from training.data import check_split, load_dataset, read_split
from training.idx import IdxError, write_idx

TINY = ["--set", "batch_size=32", "--set", "hist_every=0", "--set", "eval_batch_size=256"]


@pytest.fixture
def small_dir(tmp_path) -> Path:
    return make_idx_dataset(tmp_path / "data", n_train=120, n_test=40)


def _images(folder: Path, part: str, split: str = "digits") -> Path:
    return next(folder.glob(f"emnist-{split}-{part}-images-idx3-ubyte*"))


def _labels(folder: Path, part: str, split: str = "digits") -> Path:
    return next(folder.glob(f"emnist-{split}-{part}-labels-idx1-ubyte*"))


# --- 3. images other than 28x28, zero images, strict mapping files ---------------------------------

@pytest.mark.parametrize("shape", [(14, 56), (28, 27), (32, 32), (1, 784), (56, 14)])
def test_images_other_than_28x28_are_refused_naming_the_file(small_dir, shape):
    path = _images(small_dir, "train")
    write_idx(path, np.zeros((120, *shape), np.uint8))
    with pytest.raises(IdxError, match="28x28") as e:
        read_split("digits", "train", small_dir)
    assert str(path) in str(e.value) and f"{shape[0]}x{shape[1]}" in str(e.value)
    with pytest.raises(IdxError, match="28x28"):
        check_split("digits", "train", small_dir)


def test_mobile_cnn_on_14x56_images_is_refused_by_the_cli(small_dir, tmp_path):
    """The issue's case: mobile_cnn (adaptive pooling) trained on 14x56 images and reported accuracy."""
    path = _images(small_dir, "train")
    write_idx(path, np.random.default_rng(0).integers(0, 255, (120, 14, 56), dtype=np.uint8))
    r = run(TRAIN, "--data-dir", small_dir, "--split", "digits", "--epochs", "1", "--out", tmp_path / "run",
            "--set", "model=mobile_cnn", *TINY)
    line = one_line_error(r)
    assert str(path) in line and "14x56" in line and "28x28" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("part", ["train", "test"])
def test_zero_images_name_the_file(small_dir, part):
    images, labels = _images(small_dir, part), _labels(small_dir, part)
    write_idx(images, np.zeros((0, 28, 28), np.uint8))
    write_idx(labels, np.zeros(0, np.uint8))
    with pytest.raises(IdxError, match="holds no images") as e:
        read_split("digits", part, small_dir)
    assert str(images) in str(e.value)
    with pytest.raises(IdxError, match="holds no images"):
        check_split("digits", part, small_dir)
    write_idx(images, np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(IdxError, match="holds no labels") as e:
        read_split("digits", part, small_dir)
    assert str(labels) in str(e.value)


GOOD_DIGITS = [f"{i} {48 + i}" for i in range(10)]


@pytest.mark.parametrize("content, message", [
    ("\n".join(GOOD_DIGITS[:9] + ["3 57"]), "label 3 appears twice"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 48"]), "class '0' appears twice"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 0"]), "NUL"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 5\x0057"]), "NUL"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 7"]), "control"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 32"]), "space"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 55296"]), "not a character"),  # a lone surrogate
    ("\n".join(GOOD_DIGITS[:9] + ["9 1114112"]), "out of range"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 99999999999999999999"]), "expected 'label ascii_code"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 -57"]), "expected 'label ascii_code"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 \u0665\u0667"]), "expected 'label ascii_code"),  # Arabic-Indic digits
    ("\n".join(GOOD_DIGITS[:9] + ["9 5_7"]), "expected 'label ascii_code"),
    ("\n".join(GOOD_DIGITS[:9] + ["9"]), "expected 'label ascii_code"),
    ("\n".join(GOOD_DIGITS[:9] + ["9 57 58 59"]), "expected 'label ascii_code"),
    ("\n".join(f"{i + 1} {48 + i}" for i in range(10)), "labels must run 0..9"),
    ("\n".join(GOOD_DIGITS[:5] + [f"{i + 1} {48 + i}" for i in range(5, 10)]), "missing 5"),
    ("", "no mapping lines"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
    (b"0 48\n1 49\n\xff\xfe 50\n", "not a text file"),
])
def test_bad_mapping_files_are_refused_naming_the_file(small_dir, content, message):
    path = small_dir / "emnist-digits-mapping.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as e:
        read_split("digits", "train", small_dir)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match=message):
        check_split("digits", "test", small_dir)


def test_good_mapping_variants_still_read(tmp_path):
    folder = make_idx_dataset(tmp_path / "l", split="letters", n_train=52, n_test=26)
    path = folder / "emnist-letters-mapping.txt"
    # the official letters file: three columns, labels from 1; CRLF line ends, blank lines, tabs
    path.write_bytes(("\r\n".join(f"{i + 1}\t{65 + i} {97 + i}" for i in range(26)) + "\r\n\r\n").encode())
    classes = read_split("letters", "train", folder)[2]
    assert classes[0] == "Aa" and classes[-1] == "Zz" and len(classes) == 26
    digits = make_idx_dataset(tmp_path / "d", n_train=20, n_test=10)
    (digits / "emnist-digits-mapping.txt").write_text("\n".join(reversed(GOOD_DIGITS)))  # order of lines is free
    assert read_split("digits", "train", digits)[2] == list("0123456789")


# --- 4. the test split is checked before the first epoch ------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "truncated-gz", "trailing", "labels-count", "not-28x28",
                                    "mapping", "label-range"])
def test_check_split_finds_test_file_problems_without_reading_images(tmp_path, damage):
    gz = damage != "truncated"
    folder = make_idx_dataset(tmp_path / "d", n_train=60, n_test=30, gz=gz)
    images, labels = _images(folder, "test"), _labels(folder, "test")
    data = images.read_bytes()
    if damage == "truncated":
        images.write_bytes(data[:-100])
    elif damage == "truncated-gz":
        images.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "trailing":
        images.write_bytes(gzip.compress(gzip.decompress(data) + b"\x00" * 7))
    elif damage == "labels-count":
        write_idx(labels, np.zeros(29, np.uint8))
    elif damage == "not-28x28":
        write_idx(images, np.zeros((30, 14, 56), np.uint8))
    elif damage == "label-range":
        write_idx(labels, np.full(30, 10, np.uint8))
    else:  # the test files elsewhere (torchvision's layout), with another class list
        raw = folder / "EMNIST" / "raw"
        raw.mkdir(parents=True)
        for p in folder.glob("emnist-digits-test-*"):
            p.replace(raw / p.name)
        (raw / "emnist-digits-mapping.txt").write_text("\n".join(f"{i} {97 + i}" for i in range(10)))
    classes = load_dataset("digits", folder, val_fraction=0.2).classes  # the train files are fine
    with pytest.raises(ValueError) as e:
        check_split("digits", "test", folder, classes)
    assert str(folder) in str(e.value)


def test_check_split_accepts_good_files(digits_dir):
    assert check_split("digits", "test", digits_dir, list("0123456789")) == 200
    assert check_split("digits", "train", digits_dir) == 600


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_test_file_fails_the_train_cli_before_the_first_epoch(tmp_path, gz, refuse):
    folder = make_idx_dataset(tmp_path / "d", n_train=120, n_test=40, gz=gz)
    images = _images(folder, "test")
    images.write_bytes(images.read_bytes()[:-500])
    out = tmp_path / "run"
    r = refuse(TRAIN, "--data-dir", folder, "--split", "digits", "--epochs", "1", "--out", out, *TINY)
    line = one_line_error(r)
    assert str(images) in line and ("truncated" in line or "corrupt" in line)
    assert "epoch" not in r.stdout and not out.exists()  # refused before any training
    # --no-test needs no test files
    r = run(TRAIN, "--data-dir", folder, "--split", "digits", "--epochs", "1", "--out", out, "--no-test", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]


def test_truncated_test_file_fails_the_search_before_ray_starts(tmp_path, refuse):
    folder = make_idx_dataset(tmp_path / "d", n_train=120, n_test=40)
    labels = _labels(folder, "test")
    write_idx(labels, np.zeros(39, np.uint8))
    space = one_trial_space(tmp_path)
    r = refuse(SEARCH, "--config", space, "--data-dir", folder, "--storage", tmp_path / "results", "--name", "x")
    line = one_line_error(r)
    assert str(labels) in line and "40 images" in line and "39 labels" in line
    assert "experiment x" not in r.stdout and not list((tmp_path / "results").glob("x/trial_*"))


# --- 5. configs that cannot run: non-finite numbers, a missing device, a model too large ----------

@pytest.mark.parametrize("overrides, message", [
    ({"lr": "inf"}, "lr must be a finite number"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number"),
    ({"aug_rotate": "-inf"}, "aug_rotate must be a finite number"),
    ({"epochs": float("inf")}, "epochs must be a finite number"),
    ({"width": 1e9}, "model too large: small_cnn with width=1e\\+09"),
    ({"width": "1e300"}, "model too large"),
    ({"model": "vgg", "width": 30, "depth": 8}, "model too large: vgg .* 1.3G parameters"),
    ({"model": "resnet", "blocks": 10_000}, "blocks must be <= 100"),
    ({"seed": -1}, "seed must be in"),
    ({"device": "cuda:x"}, "device must be one of"),
])
def test_configs_that_cannot_run_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(overrides)


def test_yaml_infinities_and_sane_models_pass():
    assert parse_set(["lr=.inf"])["lr"] == float("inf")
    with pytest.raises(ConfigError, match="finite"):
        make_config(parse_set(["lr=.inf"]))
    for model in ("small_cnn", "vgg", "resnet", "mobile_cnn"):
        make_config({"model": model, "width": 4.0, "depth": 3, "blocks": 3})  # the big end of a sane space


def test_missing_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ConfigError, match="not available"):
            check_device(device)
    check_device("cpu")
    check_device("auto")
    make_config({"device": "cuda"})  # a checkpoint from a GPU machine still loads on this one


@pytest.mark.parametrize("setting, message", [
    ("lr=inf", "lr must be a finite number"),
    ("lr=nan", "lr must be a finite number"),
    ("width=1e9", "model too large"),
    ("device=cuda", "CUDA is not available"),
])
def test_train_cli_refuses_before_any_work(tmp_path, setting, message, refuse):
    if setting.startswith("device") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = refuse(TRAIN, "--data-dir", tmp_path / "no-data-needed", "--out", tmp_path / "run", "--set", setting)
    assert message in one_line_error(r)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, space, fixed, message", [
    (["--device", "cuda"], None, "", "CUDA is not available"),
    ([], "  width: {uniform: [0.5, 1.0e+9]}\n", "", "model too large"),
    ([], "  model:\n    choice:\n      small_cnn: {}\n      vgg: {depth: {int: [1, 20]}}\n"
         "  width: {uniform: [0.5, 8.0]}\n", "", "largest model it can sample (model=vgg, depth=20, width=8.0)"),
    ([], None, "fixed: {lr: .inf}\n", "lr must be a finite number"),
])
def test_search_refuses_before_ray_starts(tmp_path, digits_dir, args, space, fixed, message, refuse):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = one_trial_space(tmp_path, **({"space": space} if space else {}), fixed=fixed)
    r = refuse(SEARCH, "--config", path, "--data-dir", digits_dir, "--storage", tmp_path / "results", *args)
    assert message in one_line_error(r)  # (and Ray never started: tests/conftest.py::cli)
    assert "experiment" not in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--seed", str(2**70)], "--seed must be between 0 and 4294967295"),
    (["--cpus-per-trial", "nan"], "--cpus-per-trial must be a finite number, got nan"),
    (["--gpus-per-trial", "inf"], "--gpus-per-trial must be a finite number"),
    (["--samples", str(10**9)], "--samples must be between 1 and 100000"),
])
def test_bad_options_are_one_line_and_leave_no_folder(tmp_path, digits_dir, args, message, refuse):
    """Before: a raw ValueError traceback (--seed), an error not naming the option (nan), and a results folder
    holding only .driver.lock."""
    r = refuse(SEARCH, "--config", one_trial_space(tmp_path / "cfg"), "--data-dir", digits_dir, "--storage",
               tmp_path / "results", "--name", "exp", *args)
    assert message in one_line_error(r)
    assert not (tmp_path / "results" / "exp").exists()


def test_a_start_refused_after_the_lock_leaves_no_folder(tmp_path, refuse):
    """The data are read after the experiment's lock is taken: their error must not leave a folder behind."""
    r = refuse(SEARCH, "--config", one_trial_space(tmp_path / "cfg"), "--data-dir", tmp_path / "no-data", "--storage",
               tmp_path / "results", "--name", "exp")
    one_line_error(r)
    assert not (tmp_path / "results" / "exp").exists()


def test_a_huge_yaml_file_is_refused_before_it_is_parsed(tmp_path, digits_dir, refuse):
    """A 14.6 MB space took PyYAML over 120 s and 3.2 GB; any config file over 1 MB is refused by its size."""
    path = one_trial_space(tmp_path / "cfg")
    with path.open("a") as f:
        f.write("# " + "x" * 1000 + "\n" * 1 + ("# padding\n" * 200_000))
    r = refuse(SEARCH, "--config", path, "--data-dir", digits_dir, "--storage", tmp_path / "results")
    assert "too large for a config file" in one_line_error(r)
    big = tmp_path / "big.yaml"
    big.write_text("lr: 0.001\n" + "# x\n" * 400_000)
    r = refuse(TRAIN, "--config", big, "--data-dir", digits_dir, "--out", tmp_path / "run")
    assert "too large for a config file" in one_line_error(r)


# --- 6. one line, no traceback, from a real interpreter (storage: tests/test_storage.py) ----------

def test_refusals_print_one_line_without_traceback(tmp_path, digits_dir):
    """What a user sees, from a real interpreter: each command line refuses bad input with one `error:` line,
    exit 2, no traceback, and (the search and final stage) before Ray starts: a Ray session would have written
    its files under RAY_TMPDIR."""
    from tests.conftest import assert_ray_never_started, ray_tmp_dir

    final = [sys.executable, str(REPO / "search" / "final.py")]
    export = [sys.executable, "-m", "training.export"]
    text = tmp_path / "model.pt"
    text.write_text("not a checkpoint")
    ray_tmp = ray_tmp_dir()  # a Ray session would write its files here
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_tmp)}
    for cmd, args, message in (
        (SEARCH, ["--config", one_trial_space(tmp_path / "cfg"), "--data-dir", digits_dir, "--seed", "-1"],
         "--seed must be"),
        (SEARCH, ["--name", "nope", "--resume", "--storage", tmp_path / "results"], "no experiment at"),
        (TRAIN, ["--data-dir", digits_dir, "--out", tmp_path / "run", "--set", "lr=nan"], "lr must be a finite"),
        (final, ["--name", "nope", "--storage", tmp_path / "results"], "nope"),
        (PREDICT, [text, text], "model.pt"),
        (export, [text, "--onnx", tmp_path / "m.onnx"], "model.pt"),
    ):
        r = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
        assert message in one_line_error(r), (cmd[-1], r.stderr)
    assert_ray_never_started(ray_tmp)
    ray_tmp.parent.rmdir()
    assert not (tmp_path / "results").exists() and not (tmp_path / "run").exists()


# --- 7. extending a finished run ------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_extending_a_finished_run_rebuilds_the_schedule(tmp_path, small_dir, scheduler):
    out = tmp_path / "run"
    common = ["--data-dir", small_dir, "--split", "digits", "--out", out, "--no-test", "--json",
              "--set", f"scheduler={scheduler}", *TINY]
    r = run(TRAIN, *common, "--epochs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(TRAIN, *common, "--epochs", "3", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs_run"] == 3
    history = load_checkpoint(out / "last.pt")["history"]
    assert [m["epoch"] for m in history] == [1, 2, 3]
    # epochs 2 and 3 follow the schedule of a 3-epoch run (the learning rate is not stuck at its end)
    fresh = tmp_path / "fresh"
    r = run(TRAIN, *[a if a != out else fresh for a in common], "--epochs", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    fresh_history = load_checkpoint(fresh / "last.pt")["history"]
    assert [m["lr"] for m in history[1:]] == pytest.approx([m["lr"] for m in fresh_history[1:]], rel=1e-6)


# --- 8. the printed resume command: tests/test_run.py; 9. damaged checkpoints: tests/test_checkpoint.py

def test_shipped_configs_still_pass():
    from search.space import load_search_spec

    make_config(base=load_yaml(REPO / "configs" / "train.yaml"))
    for path in (REPO / "configs" / "search").glob("*.yaml"):
        load_search_spec(path)
