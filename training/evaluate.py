"""Final evaluation of a checkpoint on the test split (the only place the test split is read)."""

from __future__ import annotations

from pathlib import Path

from training.checkpoint import build_from_checkpoint, load_checkpoint
from training.data import load_test
from training.metrics import summarize
from training.trainer import evaluate, resolve_device


def evaluate_checkpoint(path: str | Path, data_dir: str | Path | None = None, device: str = "auto",
                        batch_size: int = 1024) -> dict:
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    model = build_from_checkpoint(ckpt, dev, where=str(path))
    split = ckpt["config"]["split"]
    x, y, classes = load_test(split, data_dir)
    if classes != list(ckpt["classes"]):
        raise ValueError(f"{path} was trained on classes {ckpt['classes'][:5]}... but the {split} test files "
                         f"have {classes[:5]}...")
    loss, acc, pred = evaluate(model, x.to(dev), y.to(dev), batch_size)
    return {"checkpoint": str(path), "split": split, "loss": loss, **summarize(y, pred.cpu(), classes)}
