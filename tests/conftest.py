"""Shared fixtures: small EMNIST-format IDX files made on the fly (so the suite runs on a
fresh machine with no data), the real data folder when EMNIST_DATA_DIR is set, and tiny
training configs that keep tests fast."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from training.data import BUILTIN_CLASSES, load_dataset
from training.idx import write_idx


def render_char(ch: str, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """An upright white-on-black glyph with random size, offset and noise: learnable, not trivial."""
    img = Image.new("L", (size, size), 0)
    font = ImageFont.load_default(size=int(rng.integers(16, 22)))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
    x = (size - (right - left)) / 2 - left + rng.integers(-2, 3)
    y = (size - (bottom - top)) / 2 - top + rng.integers(-2, 3)
    draw.text((x, y), ch, fill=255, font=font)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, 12, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def make_idx_dataset(folder: Path, split: str = "digits", n_train: int = 400, n_test: int = 100, seed: int = 0,
                     gz: bool = True, mapping: bool = True) -> Path:
    """Write emnist-<split>-{train,test}-* files in the official format (images transposed)."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = BUILTIN_CLASSES[split]
    rng = np.random.default_rng(seed)
    offset = 1 if split == "letters" else 0
    suffix = ".gz" if gz else ""
    for part, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(classes)
        rng.shuffle(labels)
        images = np.stack([render_char(classes[k][0], rng) for k in labels])
        write_idx(folder / f"emnist-{split}-{part}-images-idx3-ubyte{suffix}", images.transpose(0, 2, 1))
        write_idx(folder / f"emnist-{split}-{part}-labels-idx1-ubyte{suffix}", labels + offset)
    if mapping:
        lines = [f"{i + offset} {' '.join(str(ord(ch)) for ch in name)}" for i, name in enumerate(classes)]
        (folder / f"emnist-{split}-mapping.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("emnist") / "digits", n_train=600, n_test=200)


@pytest.fixture(scope="session")
def digits_data(digits_dir):
    return load_dataset("digits", digits_dir, val_fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def digits_model(digits_data, tmp_path_factory):
    """(Predictor, checkpoint path) of a small CNN trained on the generated digits (>= 80 % on validation): the
    predictor's and the line reader's tests share it."""
    from training.predict import Predictor
    from training.trainer import train

    out = tmp_path_factory.mktemp("digits_model")
    cfg = {"split": "digits", "epochs": 12, "batch_size": 32, "hist_every": 0, "lr": 3e-3, "scheduler": "onecycle"}
    result = train(cfg, digits_data, out_dir=out)
    assert result.best_val_acc > 0.8
    return Predictor.from_checkpoint(out / "best.pt"), out / "best.pt"


@pytest.fixture
def tiny_config() -> dict:
    """Shrunk training config for tests: few epochs, small batches, no histograms."""
    return {"split": "digits", "epochs": 3, "batch_size": 32, "eval_batch_size": 256, "hist_every": 0,
            "lr": 3e-3, "scheduler": "none", "seed": 0}


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    value = os.environ.get("EMNIST_DATA_DIR")
    if not value:
        pytest.skip("EMNIST_DATA_DIR is not set: real-data tests need the EMNIST files (CI sets it)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"EMNIST_DATA_DIR={value} is not a directory")
    return path


@pytest.fixture(scope="session")
def smoke_search(real_data_dir, tmp_path_factory):
    """`python search/run.py --config configs/search/smoke.yaml` as a user runs it, on real EMNIST (4 trials,
    then the final stage), once per session: (results root, the finished process). The experiment is
    named 'smoke'. tests/test_search.py checks what it printed and wrote; the browser test browses it."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("smoke-results")
    r = subprocess.run([sys.executable, "search/run.py", "--config", "configs/search/smoke.yaml", "--data-dir",
                        str(real_data_dir), "--storage", str(root), "--name", "smoke"],
                       capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    return root, r


@pytest.fixture(scope="session")
def real_run(real_data_dir, tmp_path_factory):
    """2 epochs of the small CNN on 20,000 real EMNIST images (CPU), trained once per session."""
    from training.trainer import train

    data = load_dataset("bymerge", real_data_dir, train_limit=20000)
    out = tmp_path_factory.mktemp("real_run")
    result = train({"split": "bymerge", "epochs": 2, "hist_every": 0, "device": "cpu"}, data, out_dir=out)
    return data, result


@pytest.fixture(scope="session")
def tiny_search(digits_dir, tmp_path_factory):
    """A small real experiment (Ray Tune + Optuna + ASHA, 4 trials x 2 epochs on generated digits, then its
    final stage), once per session: (results root, the finished process). The experiment is named 'tiny'."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("dash-results")
    cfg = tmp_path_factory.mktemp("dash-cfg")
    (cfg / "base.yaml").write_text("split: digits\nbatch_size: 32\neval_batch_size: 256\nhist_every: 0\n"
                                   "lr: 3.0e-3\nscheduler: none\n")
    (cfg / "space.yaml").write_text("base: base.yaml\nsamples: 4\nmax_epochs: 2\nasha: {grace_period: 1, "
                                    "reduction_factor: 2}\nspace:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                                    "  width: {uniform: [0.5, 1.5]}\n  aug_strength: {uniform: [0.0, 1.0]}\n")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "search" / "run.py"), "--config", str(cfg / "space.yaml"),
                        "--data-dir", str(digits_dir), "--storage", str(root), "--name", "tiny", "--concurrency", "1"],
                       capture_output=True, text=True, timeout=600,
                       # a fresh local Ray instance, never one another process on this machine started
                       env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root, r


@pytest.fixture(scope="session")
def tiny_experiment(tiny_search) -> Path:
    """The results root of tiny_search, for the dashboard tests."""
    return tiny_search[0]


@pytest.fixture
def loopback_server(monkeypatch):
    """For the dashboard page tests (their modules use it for every test). AppTest runs app.py in this
    process, where the server address is whatever config the current folder has; the page serves only
    on loopback (tests/test_dashboard_server.py tests the refusal)."""
    from streamlit import config

    monkeypatch.delenv("EMNIST_DASHBOARD_ALLOW_REMOTE", raising=False)
    old = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", old)


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run a command line's main(argv) in this process (no interpreter start-up: the refusal tests take
    milliseconds instead of seconds) and show that Ray never started: its temporary folder (RAY_TMPDIR, where a
    Ray session writes its files) stays absent and Ray is not initialized here. One subprocess per command
    (tests/test_inputs.py::test_refusals_print_one_line_without_traceback) shows what the user sees."""
    import signal
    import subprocess
    import sys

    ray_tmp = ray_tmp_dir()

    def call(main, *args) -> subprocess.CompletedProcess:
        handler = signal.getsignal(signal.SIGTERM)  # (search/run.py sets its own)
        try:
            with monkeypatch.context() as m:  # (only for this call: a later real search in the test uses Ray)
                m.setenv("RAY_TMPDIR", str(ray_tmp))
                m.setenv("RAY_ADDRESS", "local")
                code = main([str(a) for a in args])
        finally:
            signal.signal(signal.SIGTERM, handler)
        out = capsys.readouterr()
        assert_ray_never_started(ray_tmp)
        ray = sys.modules.get("ray")
        assert ray is None or not ray.is_initialized(), "Ray started"
        return subprocess.CompletedProcess(args, code, out.out, out.err)  # (as subprocess.run would give)

    yield call
    ray_tmp.parent.rmdir()


@pytest.fixture
def refuse(cli):
    """A refusal of search/run.py or training/train.py, run through its main() in this process, Ray never
    started (tests/conftest.py::cli); tests/test_inputs.py::test_refusals_print_one_line_without_traceback runs
    them as a user does."""
    from search.run import main as search_main
    from tests.helpers import SEARCH
    from training.train import main as train_main

    def call(cmd, *args, timeout=None):
        return cli(search_main if cmd is SEARCH else train_main, *args)

    return call


def ray_tmp_dir() -> Path:
    """A RAY_TMPDIR that does not exist yet, short enough for Ray's socket paths (107 bytes)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp")) / "ray"


def assert_ray_never_started(ray_tmp: Path) -> None:
    assert not ray_tmp.exists(), f"Ray started: {sorted(p.name for p in ray_tmp.rglob('*'))[:5]}"
