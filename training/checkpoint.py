"""Checkpoints: one file holding the model's state dict, the full config, the class list,
the epoch and its metrics (plus optimizer/scheduler/RNG state for resuming).

Only tensors and plain containers go in, so `torch.load(weights_only=True)` can read it
and a file carrying a pickled object is refused instead of executed.

The one module that knows the file format, for both kinds of file:
- a trial's checkpoint (`save_checkpoint`; a `last.pt` adds optimizer, scheduler, RNG and history);
- the delivered model of a search (`save_model`: `results/<name>/final/model.pt`), an ordinary checkpoint whose
  `model`/`config` are the first member's, plus `members` (each member's weights, config, epoch) when it is an
  ensemble and `tta` when its prediction is averaged over views of the input (training/ensemble.py's modules).
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.augment import TTA_VIEWS
from training.ensemble import Ensemble, TestTimeAugment
from training.fileio import write_atomic

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def member_of(ckpt: dict) -> dict[str, Any]:
    """What an ensemble file keeps of a member checkpoint: weights, config, epoch, metrics."""
    keep = ("model", "config", "epoch", "metrics")
    return {k: ckpt[k] for k in keep if k in ckpt}


def save_model(path: str | Path, members: list[dict], classes: list[str], split: str,
               info: dict | None = None, tta: int = 1) -> Path:
    """Write the delivered model: `members` are loaded checkpoints (or member_of() of them), all
    trained on the same classes. One member makes a plain single-model checkpoint. tta > 1: its
    prediction is averaged over that many views of the input (TestTimeAugment)."""
    if not members:
        raise ValueError("save_model needs at least one member")
    members = [member_of(m) for m in members]
    first = members[0]
    state: dict[str, Any] = {"model": first["model"], "config": first["config"], "classes": list(classes),
                             "epoch": int(first["epoch"]), "split": split, "final": dict(info or {})}
    if len(members) > 1:
        state["members"] = members
    if tta > 1:
        state["tta"] = int(tta)
    return save_checkpoint(path, state)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash or full disk mid-write leaves the previous file intact."""
    return write_atomic(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint. Any file that is not a usable checkpoint (missing, truncated,
    random bytes, damaged inside, pickled objects, the wrong structure) raises CheckpointError,
    never another exception, so callers can fall back on an older file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # torch warns about odd pickle protocols etc. in damaged files; the error says enough
            warnings.simplefilter("ignore", UserWarning)
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
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler fail in any way (KeyError, IndexError, ...)
        raise CheckpointError(
            f"checkpoint {path} is unreadable (corrupt or not a checkpoint): {type(e).__name__}: {e}"[:500]
        ) from None
    required = ("model", "config", "classes", "epoch")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        have = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an emnist-tune checkpoint (needs {', '.join(required)}; has {have})")
    problem = _structure_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    return ckpt


def _is_str_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _structure_problem(ckpt: dict) -> str | None:
    """What is wrong with the contents of a loaded checkpoint (None: nothing). A file damaged
    inside its pickle can still load, as a structure no code expects; refuse it here."""
    model = ckpt["model"]
    if not _is_str_dict(model) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        return "'model' is not a mapping of parameter names to tensors"
    if not _is_str_dict(ckpt["config"]):
        return "'config' is not a mapping of config keys"
    classes = ckpt["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of class names"
    if not all(classes):
        return "'classes' has an empty class name"
    if len(set(classes)) != len(classes):  # (a prediction could not say which class it means)
        twice = sorted({c for c in classes if classes.count(c) > 1})[:5]
        return f"'classes' names a class more than once ({', '.join(map(repr, twice))})"
    epoch = ckpt["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"'epoch' is not a count of epochs ({epoch!r})"
    if "metrics" in ckpt and not _is_str_dict(ckpt["metrics"]):
        return "'metrics' is not a mapping"
    if "tta" in ckpt:  # test-time augmentation views (training/ensemble.py)
        tta = ckpt["tta"]
        views = len(TTA_VIEWS)
        if isinstance(tta, bool) or not isinstance(tta, int) or not 1 <= tta <= views:
            return f"'tta' is not a number of views between 1 and {views} ({tta!r})"
    if "members" in ckpt:  # an ensemble (training/ensemble.py): each member is a small checkpoint
        members = ckpt["members"]
        if not isinstance(members, list) or not members:
            return "'members' is not a list of ensemble members"
        for i, m in enumerate(members):
            if not _is_str_dict(m) or not all(k in m for k in ("model", "config", "epoch")):
                return f"ensemble member {i} is not a checkpoint (needs model, config, epoch)"
            if not _is_str_dict(m["model"]) or not all(isinstance(v, torch.Tensor) for v in m["model"].values()):
                return f"ensemble member {i}: 'model' is not a mapping of parameter names to tensors"
            if not _is_str_dict(m["config"]):
                return f"ensemble member {i}: 'config' is not a mapping of config keys"
    if "optimizer" in ckpt:  # a last.pt: what resuming reads must have its shape too
        opt, rng = ckpt["optimizer"], ckpt.get("rng")
        if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
                and isinstance(opt.get("param_groups"), list)):
            return "'optimizer' is not an optimizer state"
        if not all(isinstance(g, dict) for g in opt["param_groups"]):
            return "'optimizer' has damaged parameter groups"
        if ckpt.get("scheduler") is not None and not isinstance(ckpt["scheduler"], dict):
            return "'scheduler' is not a scheduler state"
        if not (isinstance(rng, dict) and all(isinstance(rng.get(k), torch.Tensor) for k in ("order", "aug", "torch"))):
            return "'rng' is not a random-generator state"
        history = ckpt.get("history")
        if not isinstance(history, list) or not all(_is_str_dict(m) for m in history):
            return "'history' is not a list of epoch results"
        if not _is_str_dict(ckpt.get("best")):
            return "'best' is not a mapping"
        bad = ckpt.get("bad_epochs")
        if isinstance(bad, bool) or not isinstance(bad, int):
            return "'bad_epochs' is not a count"
    return None


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
    """Rebuild the model a checkpoint was trained with, weights loaded, in eval mode; for an
    ensemble file (training/ensemble.py) the members averaged in probability space, and with
    `tta` its prediction averaged over that many views of the input."""
    if not ckpt["classes"]:
        raise CheckpointError(f"{where} has no classes")
    if "members" in ckpt:
        model = Ensemble([_build_one(m, len(ckpt["classes"]), f"{where} (member {i})")
                          for i, m in enumerate(ckpt["members"])])
    else:
        model = _build_one(ckpt, len(ckpt["classes"]), where)
    if ckpt.get("tta", 1) > 1:
        model = TestTimeAugment(model, ckpt["tta"])
    return model.to(device).eval()


def _build_one(ckpt: dict, num_classes: int, where: str) -> nn.Module:
    from models import build_model
    from training.config import make_config

    try:
        config = make_config(ckpt["config"])
        model = build_model(config.model, num_classes, **config.model_kwargs())
    except ValueError as e:  # ConfigError: a damaged or foreign config
        raise CheckpointError(f"{where} holds an unusable config: {e}") from None
    load_state(model, ckpt, where)
    return model
