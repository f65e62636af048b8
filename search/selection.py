"""The final stage's selection on the validation split: the top trials' best checkpoints, the ensemble size and
whether test-time augmentation pays, chosen on validation, never on the test split (search/final.py, step 1)."""

from __future__ import annotations

import json
import math

import torch

from search.plan import Candidate
from training import augment
from training.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from training.data import EmnistData

TTA_VIEWS = len(augment.TTA_VIEWS)  # identity, 4 one-pixel shifts, +-8 degrees


def _first_loading(paths) -> tuple[dict | None, object]:
    """(the first of these checkpoints that loads, its path), or (None, None)."""
    for path in paths:
        try:
            return load_checkpoint(path), path
        except CheckpointError:
            continue
    return None, None


def candidates(exp, k: int) -> tuple[list[Candidate], list[dict]]:
    """(the top-k trials by validation accuracy with a readable best checkpoint, one per config (Optuna can suggest
    a config twice; averaging a model with its twin adds nothing); those checkpoints, loaded: each once, here)."""
    t = exp.trials[exp.trials["best_val_acc"].notna() & ~exp.trials["diverged"].fillna(False).astype(bool)]
    t = t[~t["trial_id"].isin(exp.orphans)]
    out: list[Candidate] = []
    loaded: list[dict] = []
    seen: set[str] = set()
    for _, row in t.sort_values(["best_val_acc", "trial_id"], ascending=[False, True]).iterrows():
        ckpt, path = _first_loading(exp.checkpoint_paths(row["trial_id"]))
        if ckpt is None:
            continue
        key = json.dumps({k: v for k, v in ckpt["config"].items() if k != "device"}, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        val = (ckpt.get("metrics") or {}).get("val_acc", row["best_val_acc"])
        out.append(Candidate(str(row["trial_id"]), float(val), int(ckpt["epoch"]), dict(ckpt["config"]), str(path)))
        loaded.append(ckpt)
        if len(out) == k:
            break
    return out, loaded


def _probs(model: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    from training.inference import predict_logits

    # fp32: the probabilities that are averaged and compared should not carry bf16 rounding
    return predict_logits(model.to(dev), x.to(dev), batch_size=1024, precision="fp32").softmax(1).cpu()


def mcnemar_p(a_right: torch.Tensor, b_right: torch.Tensor) -> float:
    """Two-sided exact McNemar p-value of two classifiers on the same images (bool tensors: each right or not):
    among the images exactly one gets right, how unlikely so lopsided a split is if both were as good."""
    a_only, b_only = int((a_right & ~b_right).sum()), int((b_right & ~a_right).sum())
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


SIGNIFICANT_P = 0.05


def choose_k(probs: list[torch.Tensor], y: torch.Tensor, significant: bool = False
             ) -> tuple[int, dict[int, float], dict[int, float]]:
    """(k, accuracy by k, McNemar p-value by k against the single model) for the averages of the first 1, 2, ...
    len(probs) probability tables (ranked best single model first): the k kept is the smallest with the best
    accuracy, so an ensemble must beat the single model, not tie it, to be chosen; with `significant`, by more
    than chance (p < SIGNIFICANT_P), as where an ensemble's members share a fixed time (a budget's refit on
    CPUs: each member more is fewer cores for the others)."""
    by_k, p_by_k = {}, {}
    single = None
    for k in range(1, len(probs) + 1):
        right = torch.stack(probs[:k]).mean(0).argmax(1) == y
        single = right if single is None else single
        by_k[k] = float(right.float().mean())
        p_by_k[k] = 1.0 if k == 1 else mcnemar_p(single, right)
    allowed = [k for k in by_k if k == 1 or not significant or p_by_k[k] < SIGNIFICANT_P]
    return min(allowed, key=lambda k: (-by_k[k], k)), by_k, p_by_k


def select_ensemble(cands: list[Candidate], loaded: list[dict], data: EmnistData, dev: torch.device,
                    tta: str = "auto", significant: bool = False) -> dict:
    """The ensemble size, then whether test-time augmentation pays for it, both chosen on the validation split
    (never the test split), from the candidates' checkpoints as `candidates` loaded them; `significant`: see
    choose_k. Each model is built once, and its test-time augmented version wraps the same model."""
    from training.ensemble import TestTimeAugment

    models = [build_from_checkpoint(ckpt, dev, where=c.checkpoint) for c, ckpt in zip(cands, loaded, strict=True)]
    probs = [_probs(m, data.val_x, dev) for m in models]
    chosen, by_k, p_by_k = choose_k(probs, data.val_y, significant)
    without = by_k[chosen]
    views, with_tta = 1, None
    if tta == "auto":  # the chosen model's prediction averaged over TTA_VIEWS views of each image
        tta_probs = [_probs(TestTimeAugment(m, TTA_VIEWS), data.val_x, dev) for m in models[:chosen]]
        with_tta = float((torch.stack(tta_probs).mean(0).argmax(1) == data.val_y).float().mean())
        views = TTA_VIEWS if with_tta > without else 1  # it must gain, not tie
    return {"metric": "val_acc", "n_val": len(data.val_y), "val_acc_by_k": {str(k): v for k, v in by_k.items()},
            "chosen_k": chosen, "ensemble_pays": chosen > 1,
            **({"p_by_k": {str(k): v for k, v in p_by_k.items()}} if significant else {}),
            "tta": {"views": TTA_VIEWS, "val_acc": with_tta, "val_acc_without": without, "used": views > 1},
            "candidates": [{"trial_id": c.trial_id, "val_acc": c.val_acc, "epoch": c.epoch} for c in cands]}
