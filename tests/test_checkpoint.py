"""training/checkpoint.py (and training/fileio.py under it): checkpoints of random or damaged bytes give
CheckpointError and never another exception (fuzzed: random bytes, truncations, byte flips), whatever loads them
(load_checkpoint, the predictor and its CLI, export, a resumed training run, a resumed trial); a class list that
names a class twice is refused by every loader."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.helpers import PREDICT, REPO, one_line_error, run
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory, digits_data):
    from training.trainer import train

    out = tmp_path_factory.mktemp("ck")
    train({"split": "digits", "epochs": 1, "batch_size": 64, "hist_every": 0, "width": 0.25, "scheduler": "onecycle"},
          digits_data, out_dir=out)
    return out / "best.pt", out / "last.pt"


def _pickle_span(data: bytes) -> tuple[int, int]:
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    return start, start + info.compress_size


def _damaged_files(good: bytes, rng: random.Random):
    yield b"hello world, this is not a checkpoint\n"  # the KeyError: 101
    yield b"\x80"
    yield b"PK\x03\x04"
    yield b""
    for _ in range(150):  # random bytes, some starting like a pickle or a zip
        prefix = rng.choice([b"", b"\x80\x02", b"\x80\x04", b"PK\x03\x04", b"hello"])
        yield prefix + rng.randbytes(rng.randint(0, 4000))
    for cut in sorted({*range(0, len(good), max(1, len(good) // 100)), *(rng.randrange(len(good)) for _ in range(50))}):
        yield good[:cut]  # truncated at many points
    start, end = _pickle_span(good)
    for i in range(400):  # byte flips: half inside the pickled structure, half anywhere
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(start, end) if i % 2 else rng.randrange(len(b))] = rng.randrange(256)
        yield bytes(b)


@pytest.mark.parametrize("which", [0, 1], ids=["best.pt", "last.pt"])
def test_fuzzed_checkpoints_give_checkpoint_error_only(real_checkpoints, tmp_path, which):
    from training.predict import Predictor

    good = real_checkpoints[which].read_bytes()
    path = tmp_path / "fuzz.pt"
    rng = random.Random(which)
    outcomes = {"refused": 0, "loaded": 0}
    for data in _damaged_files(good, rng):
        path.write_bytes(data)
        try:
            ckpt = load_checkpoint(path)
            Predictor.from_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e) or "checkpoint" in str(e)
            outcomes["refused"] += 1
            continue
        # what loads is a checkpoint the code can use
        assert isinstance(ckpt["model"], dict) and isinstance(ckpt["classes"], list)
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 300 and outcomes["loaded"] > 0, outcomes


def test_predict_cli_on_a_text_file_named_pt(tmp_path):
    ck = tmp_path / "model.pt"
    ck.write_text("hello, I am a text file\n")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("L", (28, 28), 255).save(image)
    line = one_line_error(run(PREDICT, ck, image, timeout=60))
    assert str(ck) in line and "unreadable" in line


def test_damaged_resume_state_is_a_checkpoint_error(real_checkpoints, digits_data, tmp_path):
    from training.trainer import train

    config = {"split": "digits", "epochs": 2, "batch_size": 64, "hist_every": 0, "width": 0.25,
              "scheduler": "onecycle"}
    ckpt = load_checkpoint(real_checkpoints[1])
    for damage in (lambda c: c["optimizer"].update(param_groups=[]),
                   lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
                   lambda c: c["rng"].pop("order"),
                   lambda c: c.update(bad_epochs="many")):
        bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
        bad["optimizer"], bad["rng"] = dict(ckpt["optimizer"]), dict(ckpt["rng"])
        damage(bad)
        with pytest.raises(CheckpointError, match="cannot resume"):
            train(config, digits_data, resume=bad)
    for key, value in (("history", "nope"), ("rng", None), ("epoch", -1), ("classes", [1, 2]),
                       ("model", {"w": "not a tensor"}), ("optimizer", [])):
        save_checkpoint(tmp_path / "bad.pt", {**ckpt, key: value})
        with pytest.raises(CheckpointError, match="damaged"):
            load_checkpoint(tmp_path / "bad.pt")


def test_a_class_list_with_duplicates_is_refused_by_every_loader(real_checkpoints, tmp_path):
    """['A'] * 47 as the class list: a prediction could not say which class it means. Refused by load_checkpoint,
    so by predict, export, the dashboard and resume alike, as duplicate classes in a mapping file are."""
    ckpt = load_checkpoint(real_checkpoints[1])
    for classes, message in ((["A"] * len(ckpt["classes"]), "names a class more than once \\('A'\\)"),
                             ([*ckpt["classes"][:-1], ckpt["classes"][0]], "more than once"),
                             (["", *ckpt["classes"][1:]], "empty class name")):
        save_checkpoint(tmp_path / "dup.pt", {**ckpt, "classes": classes})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "dup.pt")
    save_checkpoint(tmp_path / "dup.pt", {**ckpt, "classes": ["A"] * len(ckpt["classes"])})
    for cmd in (["-m", "training.export", str(tmp_path / "dup.pt"), "--onnx", str(tmp_path / "m.onnx")],
                [str(REPO / "training" / "predict.py"), str(tmp_path / "dup.pt"), str(tmp_path / "dup.pt")]):
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert "more than once" in one_line_error(r)
    assert not (tmp_path / "m.onnx").exists()


def test_damaged_newest_trial_checkpoint_falls_back(real_checkpoints, tmp_path):
    """The search's resume path skips a checkpoint of garbage (it raised KeyError before) for the older one."""
    from search.layout import CHECKPOINT_FILE
    from search.repairs import resume_state

    for n, data in ((1, real_checkpoints[1].read_bytes()), (2, b"hello, garbage")):
        (tmp_path / f"checkpoint_00000{n}").mkdir()
        (tmp_path / f"checkpoint_00000{n}" / CHECKPOINT_FILE).write_bytes(data)
    resume = resume_state(None, tmp_path)
    assert resume.path == tmp_path / "checkpoint_000001" / CHECKPOINT_FILE and resume.state["epoch"] == 1
