"""`train(config, data, reporter)`: the one training function used by the CLI, by Ray
trials and by the tests.

The whole training set sits on the device as a uint8 tensor; each epoch draws batches
with `randperm`, converts to float and augments on the device (cifar10-airbench style).
There is no DataLoader and no per-sample Python in the hot path, which is what makes
small CNNs fast, and what lets several trials share one GPU.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from training.augment import AugmentParams, augment
from training.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_state, save_checkpoint
from training.config import TrainConfig, make_config
from training.data import EmnistData, normalize
from training.metrics import confusion_matrix, summarize

# reporter(metrics_of_this_epoch, path_of_this_epoch's_checkpoint_or_None)
Reporter = Callable[[dict[str, Any], Path | None], None]
Progress = Callable[[int, int, int, float], None]  # epoch, step, steps, running loss

DIVERGENCE_CHECK_EVERY = 20  # steps; a GPU sync each time, so not every step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but MPS is not available")
    return torch.device(name)


def make_optimizer(c: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0)
    if c.optimizer == "adam":
        return torch.optim.Adam(groups, lr=c.lr)
    return torch.optim.AdamW(groups, lr=c.lr)


def make_scheduler(c: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Returns (scheduler or None, when it steps: 'step' | 'epoch' | 'plateau')."""
    total = c.epochs * steps_per_epoch
    if c.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=c.step_size, gamma=c.gamma), "epoch"
    if c.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=c.plateau_factor, patience=c.plateau_patience
        )
        return sched, "plateau"
    if c.scheduler == "cosine":
        warm = int(c.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor), "step"
    if c.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=c.pct_start)
        return sched, "step"
    return None, "none"


def _fit_schedule(sched, c: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """A resumed OneCycle schedule restored from a run planned for another length (`--resume
    --epochs N` extends a finished run) would stop at the old total ("Tried to step N times"):
    rebuild it for this run's length, at the step the run has reached. (The cosine schedule
    reads the length from the config, and the step and plateau ones do not depend on it.)"""
    if not isinstance(sched, torch.optim.lr_scheduler.OneCycleLR):
        return sched
    total, done = c.epochs * steps_per_epoch, sched.last_epoch
    if sched.total_steps == total or done >= total:  # (done >= total: nothing is left to train)
        return sched
    fresh = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=c.pct_start)
    fresh.last_epoch = done - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": positioning, not training
        warnings.simplefilter("ignore", UserWarning)
        fresh.step()  # -> step `done`, learning rate set for it
    return fresh


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int, channels_last: bool = False,
                   precision: str = "auto") -> torch.Tensor:
    """Logits for uint8 images (N, 28, 28) already on the model's device."""
    model.eval()
    dev = x.device
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i : i + batch_size].unsqueeze(1).float().div_(255))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(dev, precision):
            out.append(model(xb).float())
    return torch.cat(out) if out else torch.empty(0, 0, device=dev)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             channels_last: bool = False, precision: str = "auto") -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions) on uint8 images and labels on the model's device."""
    logits = predict_logits(model, x, batch_size, channels_last, precision)
    loss = F.cross_entropy(logits, y).item()
    pred = logits.argmax(1)
    return loss, (pred == y).float().mean().item(), pred


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """bf16 autocast: ~2x on CUDA tensor cores, and ~2x for convolutions on CPUs with native bf16
    (AVX512-BF16/AMX, where oneDNN has bf16 kernels). Never where it would be emulated (slow)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return False


def _autocast(device: torch.device, precision: str = "auto"):
    if use_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, c: TrainConfig,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a normalised batch; returns (loss, logits). Shared with the benchmark
    so both pipelines train identically."""
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with _autocast(xb.device, c.precision):
        logits = model(xb)
    loss = F.cross_entropy(logits.float(), yb, label_smoothing=c.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if c.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    opt.step()
    return loss, logits


def _rng_state(g_order: torch.Generator, g_aug: torch.Generator, device: torch.device) -> dict:
    # Dropout draws from the global generator: saving it too makes a resumed run identical.
    state = {"order": g_order.get_state(), "aug": g_aug.get_state().cpu(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, g_order: torch.Generator, g_aug: torch.Generator, device: torch.device) -> None:
    g_order.set_state(state["order"])
    g_aug.set_state(state["aug"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _batches(n: int, batch_size: int) -> int:
    # Drop the last partial batch (a batch of 1 breaks BatchNorm), but never train on zero.
    return max(1, n // batch_size)


def train(
    config: TrainConfig | dict,
    data: EmnistData,
    reporter: Reporter | None = None,
    out_dir: str | Path | None = None,
    resume: str | Path | dict | None = None,
    progress: Progress | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train one model; returns the run's summary (best/last metrics, history, checkpoint paths).

    out_dir gets TensorBoard events, `last.pt` (every epoch, for resuming) and `best.pt`
    (best validation accuracy); checkpoint_dir, if given, takes the checkpoints instead.
    `resume` continues from a `last.pt` (path or loaded dict).
    """
    c = config if isinstance(config, TrainConfig) else make_config(config)
    if c.split != data.split:
        raise ValueError(f"config split {c.split!r} does not match the data's split {data.split!r}")
    device = resolve_device(c.device)
    torch.manual_seed(c.seed)
    num_classes = data.num_classes
    model = build_model(c.model, num_classes, **c.model_kwargs()).to(device)
    cl = c.channels_last and device.type != "mps"
    if cl:
        model = model.to(memory_format=torch.channels_last)

    x_train, y_train = data.train_x.to(device), data.train_y.to(device)
    x_val, y_val = data.val_x.to(device), data.val_y.to(device)
    n = len(x_train)
    if n == 0 or len(x_val) == 0:
        raise ValueError(f"need training and validation images, got {n} and {len(x_val)}")
    bs = min(c.batch_size, n)
    steps = _batches(n, bs)
    opt = make_optimizer(c, model)
    sched, sched_when = make_scheduler(c, opt, steps)
    aug = AugmentParams.from_config(c)
    # Two generators: batch order on the CPU (same order on every device), augmentation on
    # the device (its random draws happen where the images are).
    g_order = torch.Generator().manual_seed(c.seed)
    g_aug = torch.Generator(device=device).manual_seed(c.seed + 1)

    history: list[dict] = []
    best: dict[str, Any] = {"val_acc": -1.0, "epoch": 0}
    bad_epochs, start_epoch = 0, 1
    if resume is not None:
        where = str(resume if not isinstance(resume, dict) else "resume")
        ckpt = resume if isinstance(resume, dict) else load_checkpoint(resume)
        check_compatible(ckpt, c.model, num_classes, where=where)
        load_state(model, ckpt, where)
        if "optimizer" not in ckpt:
            raise CheckpointError("cannot resume: checkpoint has no optimizer state (use a last.pt)")
        try:
            opt.load_state_dict(ckpt["optimizer"])
            if sched is not None and ckpt.get("scheduler"):
                sched.load_state_dict(ckpt["scheduler"])
                sched = _fit_schedule(sched, c, opt, steps)
            _set_rng_state(ckpt["rng"], g_order, g_aug, device)
            history, best, bad_epochs = list(ckpt["history"]), dict(ckpt["best"]), int(ckpt["bad_epochs"])
            start_epoch = int(ckpt["epoch"]) + 1
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:  # a damaged or foreign state
            raise CheckpointError(f"cannot resume from {where}: its training state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        if history and history[-1].get("early_stopped"):
            start_epoch = c.epochs + 1  # that run had ended: resuming it trains nothing more

    out = Path(out_dir) if out_dir is not None else None
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else out
    if resume is not None and ck is not None and (ck / "best.pt").is_file():
        best["metrics"] = load_checkpoint(ck / "best.pt").get("metrics", {}).get("val")
    tb = None
    if out is not None and start_epoch <= c.epochs:  # (a resumed run that had ended writes nothing)
        from training.tblog import TBLogger  # tensorboard only where logs are wanted

        tb = TBLogger(str(out), c.to_dict(), data.classes, purge_step=start_epoch if resume is not None else None)

    def state(epoch: int) -> dict[str, Any]:
        return {"model": model.state_dict(), "config": c.to_dict(), "classes": list(data.classes),
                "epoch": epoch, "split": data.split}

    diverged, stopped_early = False, bool(history and history[-1].get("early_stopped"))
    last_path = None
    try:
        for epoch in range(start_epoch, c.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=g_order).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for step in range(steps):
                idx = perm[step * bs : (step + 1) * bs]
                xb = augment(x_train[idx].unsqueeze(1).float().div_(255), aug, g_aug)
                yb = y_train[idx]
                loss, logits = train_step(model, opt, normalize(xb), yb, c, cl)
                if sched_when == "step":
                    sched.step()
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == yb).sum()
                if (step + 1) % DIVERGENCE_CHECK_EVERY == 0 or step == steps - 1:
                    if not torch.isfinite(loss_sum):
                        diverged = True
                        break
                    if progress is not None:
                        progress(epoch, step + 1, steps, loss_sum.item() / (step + 1))
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds = time.perf_counter() - t0
            lr = opt.param_groups[0]["lr"]
            if diverged:
                m = {"epoch": epoch, "train_loss": float("nan"), "train_acc": None, "val_loss": None,
                     "val_acc": None, "lr": lr, "epoch_seconds": time.perf_counter() - t0,
                     "images_per_sec": None, "best_val_acc": max(best["val_acc"], 0.0), "diverged": True}
                history.append(m)
                if tb:
                    tb.epoch(m)
                if reporter:
                    reporter(m, None)
                break

            val_loss, val_acc, val_pred = evaluate(model, x_val, y_val, c.eval_batch_size, cl, c.precision)
            m = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / steps,
                "train_acc": correct.item() / (steps * bs),
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr,
                "epoch_seconds": time.perf_counter() - t0,
                "images_per_sec": steps * bs / train_seconds,
                "diverged": False,
            }
            improved = val_acc > best["val_acc"]
            if improved:
                best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}
                bad_epochs = 0
            else:
                bad_epochs += 1
            m["best_val_acc"] = best["val_acc"]
            stop = bool(c.early_stop_patience and bad_epochs >= c.early_stop_patience)
            m["early_stopped"] = stop  # patience ran out: this is the run's last epoch
            history.append(m)
            if sched_when == "epoch":
                sched.step()
            elif sched_when == "plateau":
                sched.step(val_acc)

            if tb:
                tb.epoch(m)
                if c.hist_every and (epoch % c.hist_every == 0 or epoch == 1):
                    tb.histograms(model, epoch)
            # Per-class metrics every epoch (a bincount): each checkpoint is self-describing.
            val_metrics = summarize(y_val, val_pred, data.classes)
            if improved:
                best["metrics"] = val_metrics
                if tb:
                    wrong = (val_pred != y_val).nonzero().flatten()[:32]
                    tb.best(epoch, confusion_matrix(y_val, val_pred, num_classes),
                            x_val[wrong], y_val[wrong], val_pred[wrong])
                if ck is not None:
                    save_checkpoint(ck / "best.pt", {**state(epoch), "metrics": {**m, "val": val_metrics}})
            if ck is not None:
                last_path = save_checkpoint(ck / "last.pt", {
                    **state(epoch),
                    "metrics": {**m, "val": val_metrics},
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "rng": _rng_state(g_order, g_aug, device),
                    "history": history,
                    "best": {k: v for k, v in best.items() if k != "metrics"},
                    "bad_epochs": bad_epochs,
                })
            if tb:
                tb.flush()
            if reporter:
                reporter(m, last_path)
            if stop:
                stopped_early = True
                break
    finally:
        if tb:
            tb.close()

    return {
        "best_val_acc": max(best["val_acc"], 0.0),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "diverged": diverged,
        "stopped_early": stopped_early,
        "history": history,
        "val": best.get("metrics"),
        "checkpoint": str(ck / "best.pt") if ck is not None and best["epoch"] else None,
        "last_checkpoint": str(last_path) if last_path else None,
        "model": model,
        "device": str(device),
    }
