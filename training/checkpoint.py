"""Checkpoints: one file holding the model's state dict, the full config, the class list,
the epoch and its metrics (plus optimizer/scheduler/RNG state for resuming).

Only tensors and plain containers go in, so `torch.load(weights_only=True)` can read it
and a file carrying a pickled object is refused instead of executed.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash or full disk mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; checkpoints are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; we never do that, so show only the cause.
        cause = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(e), re.S)
        cause_text = " ".join(cause.group(1).split()) if cause else "rejected by the weights-only loader"
        if "Unsupported global" in str(e):
            # weights_only refuses any global it does not know: this file carries code/objects.
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects, not just tensors ({cause_text})"
            ) from None
        raise CheckpointError(f"checkpoint {path} is unreadable (corrupt or not a checkpoint): {cause_text}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {e}") from None
    required = ("model", "config", "classes", "epoch")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an emnist-tune checkpoint (needs {', '.join(required)}; has {have})")
    return ckpt


def check_compatible(ckpt: dict, model_name: str, num_classes: int, where: str = "checkpoint") -> None:
    have_model, have_classes = ckpt["config"].get("model"), len(ckpt["classes"])
    if have_model != model_name or have_classes != num_classes:
        raise CheckpointError(
            f"{where} holds a {have_model!r} model with {have_classes} classes, but a {model_name!r} model "
            f"with {num_classes} classes was expected"
        )


def load_state(model: nn.Module, ckpt: dict, where: str = "checkpoint") -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # shapes/keys differ: architecture or width changed
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{where} does not fit this model's architecture: {first}") from None


def build_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", where: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint was trained with, weights loaded, in eval mode."""
    from models import build_model
    from training.config import make_config

    config = make_config(ckpt["config"])
    model = build_model(config.model, len(ckpt["classes"]), **config.model_kwargs())
    load_state(model, ckpt, where)
    return model.to(device).eval()
