"""training.export: the exported ONNX file gives PyTorch's probabilities (every registered model and
an ensemble of two architectures, on generated glyphs and on real EMNIST images), carries its class
list, and the CLI refuses bad input in one line. Each model is made once (seeded weights, measured
BatchNorm statistics) and exported once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import build_model, list_models
from training import export
from training.checkpoint import save_checkpoint, save_model
from training.config import make_config
from training.data import load_test, normalize
from training.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
ENSEMBLE = ("resnet", "small_cnn")  # two different architectures
NAMES = [*list_models(), "ensemble", "tta"]  # tta: small_cnn with 7-view test-time augmentation


def _make_checkpoint(name: str, data) -> dict:
    """A checkpoint of `name` with realistic activations, in a fraction of a second (training even a
    few steps costs tens of seconds on a shared CPU): seeded weights, BatchNorm statistics measured on
    generated digits, and the head scaled so that the probabilities are peaked (logits' std ~3)."""
    torch.manual_seed(0)
    config = make_config({"model": name, "split": "digits", "width": 0.5})
    model = build_model(name, len(data.classes), **config.model_kwargs())
    x = normalize(data.train_x[:256].unsqueeze(1).float() / 255)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass gives the batch's statistics
    with torch.no_grad():
        model.train()(x)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(3 / model.eval()(x).std().item())
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return {"model": model.state_dict(), "config": config.to_dict(), "classes": list(data.classes), "epoch": 1}


@pytest.fixture(scope="module")
def exported(digits_data, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint, exported ONNX file), for every registered model and the ensemble."""
    root = tmp_path_factory.mktemp("export")
    ckpts = {name: _make_checkpoint(name, digits_data) for name in list_models()}
    files = {}
    for name, ckpt in ckpts.items():
        files[name] = save_checkpoint(root / name / "best.pt", ckpt)
    files["ensemble"] = save_model(root / "final" / "model.pt", [ckpts[n] for n in ENSEMBLE],
                                   digits_data.classes, "digits", {"members": list(ENSEMBLE)})
    files["tta"] = save_model(root / "tta" / "model.pt", [ckpts["small_cnn"]], digits_data.classes, "digits", tta=7)
    out = {}
    for name, ckpt in files.items():
        onnx_path = root / "out" / "not-yet-there" / f"{name}.onnx"  # missing folders are created
        assert export.main([str(ckpt), "--onnx", str(onnx_path)]) == 0
        out[name] = (ckpt, onnx_path)
    return out


@pytest.fixture(scope="module")
def generated_images(digits_dir) -> np.ndarray:
    x, _, _ = load_test("digits", digits_dir)  # rendered glyphs, upright, white on black
    return x.numpy()


@pytest.fixture(scope="module")
def real_images(real_data_dir) -> np.ndarray:
    x, _, _ = load_test("bymerge", real_data_dir)
    return x[:: max(1, len(x) // 500)][:500].numpy()


def _run(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"image": images.astype(np.float32)[:, None] / 255})[0]


def _parity(ckpt: Path, onnx_path: Path, images: np.ndarray) -> float:
    want = Predictor.from_checkpoint(ckpt).probabilities(images).numpy()
    got = _run(onnx_path, images)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    assert want.max(1).mean() > 2 / want.shape[1]  # not a uniform output: the comparison means something
    one = _run(onnx_path, images[:1])  # dynamic batch: a single image too
    return max(float(np.abs(got - want).max()), float(np.abs(one - want[:1]).max()))


@pytest.mark.parametrize("name", NAMES)
def test_parity_on_generated_glyphs(exported, generated_images, name):
    diff = _parity(*exported[name], generated_images)
    print(f"{name}: max |p_onnx - p_torch| on {len(generated_images)} generated glyphs = {diff:.1e}")
    assert diff < TOL


@pytest.mark.parametrize("name", NAMES)
def test_parity_on_real_emnist(exported, real_images, name):
    diff = _parity(*exported[name], real_images)
    print(f"{name}: max |p_onnx - p_torch| on {len(real_images)} real EMNIST images = {diff:.1e}")
    assert diff < TOL


def test_metadata_and_signature(exported, digits_data):
    ckpt, onnx_path = exported["ensemble"]
    model = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == list(digits_data.classes)
    assert [c["model"] for c in json.loads(meta["members"])] == list(ENSEMBLE)
    assert json.loads(meta["config"])["model"] == ENSEMBLE[0]
    assert meta["split"] == "digits" and meta["source_checkpoint"] == "model.pt"
    # what a deployment without this project reads: onnxruntime's own metadata view
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == list(digits_data.classes)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("image", "tensor(float)", "probs")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28]  # batch dimension is symbolic
    assert isinstance(out.shape[0], str) and out.shape[1] == len(digits_data.classes)
    assert export.opset_of(model) == export.DEFAULT_OPSET


def test_dynamo_exporter(exported, generated_images, tmp_path):
    ckpt, _ = exported["small_cnn"]  # the export takes seconds per model: one model is enough here
    out = tmp_path / "dynamo.onnx"
    assert export.main([str(ckpt), "--onnx", str(out), "--dynamo"]) == 0
    diff = _parity(ckpt, out, generated_images)
    print(f"small_cnn (--dynamo): max |p_onnx - p_torch| = {diff:.1e}")
    assert diff < TOL
    assert not list(tmp_path.glob("*.data"))  # one self-contained file, no external weights


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript(exported, generated_images, tmp_path):
    ckpt, _ = exported["small_cnn"]
    out = tmp_path / "model.ts"
    assert export.main([str(ckpt), "--torchscript", str(out)]) == 0
    extra = {"classes.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    x = torch.from_numpy(generated_images[:64]).float().unsqueeze(1) / 255
    with torch.no_grad():
        got = module(x).numpy()
    want = Predictor.from_checkpoint(ckpt).probabilities(generated_images[:64]).numpy()
    assert float(np.abs(got - want).max()) < TOL
    assert json.loads(extra["classes.json"]) == [str(d) for d in range(10)]


class Payload:
    """Unpickling this runs open(marker, "w"): proof that the file's code never runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_cli_refuses_pickled_payload(tmp_path):
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "model.pt"
    torch.save({"model": {}, "config": {}, "classes": ["0"], "epoch": 0, "x": Payload(marker)}, bad)
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "training.export", str(bad), "--onnx", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load") and "pickled" in lines[0], r.stderr
    assert not marker.exists() and not out.exists()


def test_cli_errors(exported, tmp_path, capsys, monkeypatch):
    ckpt, _ = exported["small_cnn"]
    assert export.main([str(tmp_path / "missing.pt"), "--onnx", str(tmp_path / "a.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert export.main([str(tmp_path / "garbage.pt"), "--onnx", str(tmp_path / "a.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")
    assert export.main([str(ckpt), "--onnx", str(tmp_path)]) == 2  # a folder, not a file name
    assert "is a directory" in capsys.readouterr().err
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    assert export.main([str(ckpt), "--onnx", str(tmp_path / "a.onnx"), "--dynamo"]) == 2
    assert "pip install onnxscript" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()


def test_export_onto_its_own_input_is_refused_and_the_model_survives(exported, tmp_path, capsys):
    """`--onnx X/best.pt` with X/best.pt the input (also through a symlink, `..` or a hard link, and for
    --torchscript) would replace the model by a file no loader reads: refused, exit 2, the checkpoint unchanged."""
    import os
    import shutil

    src, _ = exported["small_cnn"]
    model = tmp_path / "exp" / "best.pt"
    model.parent.mkdir()
    shutil.copy(src, model)
    before = model.read_bytes()
    (tmp_path / "link.pt").symlink_to(model)
    os.link(model, tmp_path / "hard.pt")
    for out in (model, tmp_path / "link.pt", tmp_path / "exp" / ".." / "exp" / "best.pt", tmp_path / "hard.pt"):
        for flag in ("--onnx", "--torchscript"):
            assert export.main([str(model), flag, str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: output") and "would destroy the model" in err and "\n" not in err
            assert model.read_bytes() == before
    assert export.main([str(tmp_path / "link.pt"), "--onnx", str(model)]) == 2  # the input named through a link
    assert export.main([str(model), "--onnx", str(tmp_path / "a.out"), "--torchscript", str(tmp_path / "a.out")]) == 2
    assert "name the same file" in capsys.readouterr().err
    assert model.read_bytes() == before and export.load_checkpoint(model)["epoch"] >= 0
