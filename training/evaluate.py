"""The test split's evaluation: every test figure of this project (the training CLI's, the search summary's,
the final stage's report) comes from `class_probs` at `eval_precision()`, so one model has one test accuracy
wherever it is printed.

Why fp32 by default: bf16 autocast (what `precision: auto` means on CUDA and on CPUs with native bf16) is a
training speed-up; a test figure should be the model's, not the machine's. In fp32 it is the same number on
every machine and it is what a user gets from the Predictor, the dashboard and the ONNX export, which all
run in fp32. `EMNIST_TEST_PRECISION=bf16` evaluates in bf16 instead (faster on such hardware); the precision
used is recorded with every figure (summary.json `eval_precision`), and the final stage evaluates at the
precision its experiment's summary recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.checkpoint import build_from_checkpoint, load_checkpoint
from training.data import load_test
from training.inference import predict_logits, resolve_device
from training.metrics import summarize, wilson_interval

PRECISION_ENV = "EMNIST_TEST_PRECISION"
TEST_PRECISIONS = ("fp32", "bf16")


def eval_precision(recorded: str | None = None) -> str:
    """The precision of test evaluations: `recorded` (the one an experiment's earlier figures used) when it is
    one, else $EMNIST_TEST_PRECISION, else fp32. An unknown value in the environment is an error, not a
    silent fallback."""
    if recorded in TEST_PRECISIONS:
        return recorded
    value = os.environ.get(PRECISION_ENV, "").strip() or "fp32"
    if value not in TEST_PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={value!r}: must be one of {', '.join(TEST_PRECISIONS)}")
    return value


@torch.no_grad()
def class_probs(model: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Class probabilities (on the CPU) of uint8 test images: the one forward pass behind every test figure."""
    return predict_logits(model.to(device), x.to(device), batch_size=1024, precision=precision).softmax(1).cpu()


def scored(probs: torch.Tensor, y: torch.Tensor, classes: list[str], precision: str) -> dict:
    """accuracy, its 95 % Wilson interval, n, per-class P/R/F1, most-confused pairs and the precision."""
    s = summarize(y, probs.argmax(1), classes)
    correct = round(s["accuracy"] * s["n"])
    return {**s, "ci95": list(wilson_interval(correct, s["n"])), "precision": precision}


def evaluate_checkpoint(path: str | Path, data_dir: str | Path | None = None, device: str = "auto",
                        precision: str | None = None) -> dict:
    """A checkpoint's test figures (see scored), with its `checkpoint` path and `split`."""
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    precision = eval_precision(precision)
    model = build_from_checkpoint(ckpt, dev, where=str(path))
    split = ckpt["config"]["split"]
    x, y, classes = load_test(split, data_dir)
    if classes != list(ckpt["classes"]):
        raise ValueError(f"{path} was trained on classes {ckpt['classes'][:5]}... but the {split} test files "
                         f"have {classes[:5]}...")
    probs = class_probs(model, x, dev, precision)
    loss = float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y))
    return {"checkpoint": str(path), "split": split, "loss": loss, **scored(probs, y, classes, precision)}
