"""`train(config, data, reporter)`: the one training function used by the CLI, by Ray
trials and by the tests.

The whole training set sits on the device as a uint8 tensor; each epoch draws batches
with `randperm`, converts to float and augments on the device (cifar10-airbench style).
There is no DataLoader and no per-sample Python in the hot path, which is what makes
small CNNs fast, and what lets several trials share one GPU.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model
from training.augment import AugmentParams, augment
from training.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_state, save_checkpoint
from training.config import TrainConfig, make_config
from training.data import EmnistData, normalize, on_device
from training.graphs import GraphedStep, graphs_wanted, try_graphed_step
from training.inference import evaluate, resolve_device, use_bf16
from training.metrics import confusion_matrix, summarize
from training.optim import WeightAverage, make_optimizer, train_step
from training.schedule import epoch_schedule, fit_schedule, make_scheduler, position, schedule_steps_per_epoch

# reporter(metrics_of_this_epoch, path_of_this_epoch's_checkpoint_or_None)
Reporter = Callable[[dict[str, Any], Path | None], None]
Progress = Callable[[int, int, int, float], None]  # epoch, step, steps, running loss

DIVERGENCE_CHECK_EVERY = 20  # steps; a GPU sync each time, so not every step


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


@dataclass
class TrainResult:
    """What a run ended with (the model itself stays in its checkpoints)."""

    best_val_acc: float
    best_epoch: int
    epochs_run: int
    diverged: bool
    stopped_early: bool
    history: list[dict]
    val: dict | None  # per-class metrics of the best epoch
    checkpoint: str | None  # best.pt
    last_checkpoint: str | None  # last.pt
    device: str
    graphed: bool  # trained with the CUDA-graphed step


@dataclass
class Run:
    """The live state of one training run: what the parts of `train()` share."""

    c: TrainConfig
    data: EmnistData
    device: torch.device
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    sched_when: str
    aug: AugmentParams
    g_order: torch.Generator  # batch order, on the CPU (the same order on every device)
    g_aug: torch.Generator  # augmentation draws, on the device where the images are
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    batch_size: int
    steps: int
    channels_last: bool
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})
    bad_epochs: int = 0
    start_epoch: int = 1
    graphed: GraphedStep | None = None
    ema: WeightAverage | None = None  # ema_decay > 0: the weight average, what is evaluated and delivered

    @property
    def spent(self) -> float:
        """Seconds of training and validation of the epochs run so far (a timed run's clock)."""
        return sum(h.get("epoch_seconds") or 0.0 for h in self.history)

    @property
    def last_epoch(self) -> int:
        """The last epoch this run may train: `epochs`, or for a timed run as many as its seconds take; none more
        once the run has ended (its patience ran out, or a timed run's seconds were spent)."""
        h = self.history[-1] if self.history else {}
        if h.get("early_stopped") or h.get("schedule_done"):
            return int(h["epoch"])
        return self.c.epochs if self.c.train_seconds <= 0 else sys.maxsize

    @property
    def delivered(self) -> nn.Module:
        """The model validation measures and checkpoints deliver: the weight average when on."""
        return self.ema.model if self.ema is not None else self.model

    def state(self, epoch: int) -> dict[str, Any]:
        return {"model": self.delivered.state_dict(), "config": self.c.to_dict(), "classes": list(self.data.classes),
                "epoch": epoch, "split": self.data.split}


def setup(c: TrainConfig, data: EmnistData) -> Run:
    """Model, optimizer, schedule and the data resident on the training device."""
    if c.split != data.split:
        raise ValueError(f"config split {c.split!r} does not match the data's split {data.split!r}")
    device = resolve_device(c.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels once
    torch.manual_seed(c.seed)
    model = build_model(c.model, data.num_classes, **c.model_kwargs()).to(device)
    cl = c.channels_last and device.type != "mps"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    x_train, y_train, x_val, y_val = on_device(data, device)  # resident once per process (a reused Ray actor)
    n = len(x_train)
    if n == 0 or len(x_val) == 0:
        raise ValueError(f"need training and validation images, got {n} and {len(x_val)}")
    bs = min(c.batch_size, n)
    # An epoch is the whole split, or epoch_images of it drawn afresh (a search under a time budget on a slow
    # machine reports, checkpoints and lets ASHA decide every few seconds instead of every several minutes)
    steps = _batches(min(n, c.epoch_images) if c.epoch_images else n, bs)
    opt = make_optimizer(c, model)
    sched, sched_when = make_scheduler(c, opt, schedule_steps_per_epoch(c, steps))
    return Run(c, data, device, model, opt, sched, sched_when, AugmentParams.from_config(c),
               torch.Generator().manual_seed(c.seed), torch.Generator(device=device).manual_seed(c.seed + 1),
               x_train, y_train, x_val, y_val, bs, steps, cl,
               ema=WeightAverage(model, c.ema_decay) if c.ema_decay > 0 else None)


def restore(run: Run, resume: str | Path | dict) -> None:
    """Continue from a last.pt (path or loaded dict): weights, optimizer, schedule, generators, history."""
    c = run.c
    where = str(resume if not isinstance(resume, dict) else "resume")
    ckpt = resume if isinstance(resume, dict) else load_checkpoint(resume)
    check_compatible(ckpt, c.model, run.data.num_classes, where=where)
    # With a weight average, "model" holds the average and "train_model" the weights being trained.
    load_state(run.model, {"model": ckpt["train_model"]} if "train_model" in ckpt else ckpt, where)
    if run.ema is not None:
        if "train_model" in ckpt:
            load_state(run.ema.model, ckpt, where)
            run.ema.steps = int(ckpt.get("ema_steps", 0))
        else:  # the run so far kept no average: it starts here
            run.ema.reset()
    if "optimizer" not in ckpt:
        raise CheckpointError("cannot resume: checkpoint has no optimizer state (use a last.pt)")
    try:
        # The saved groups carry the implementation of the machine that wrote them (fused on CUDA);
        # this run keeps its own, so a GPU run resumes on a CPU and the other way round.
        kinds = [(g.get("fused"), g.get("foreach")) for g in run.opt.param_groups]
        run.opt.load_state_dict(ckpt["optimizer"])
        for g, (fused, foreach) in zip(run.opt.param_groups, kinds, strict=True):
            g["fused"], g["foreach"] = fused, foreach
        if run.sched is not None and ckpt.get("scheduler"):
            run.sched.load_state_dict(ckpt["scheduler"])
            run.sched = fit_schedule(run.sched, c, run.opt, schedule_steps_per_epoch(c, run.steps))
        _set_rng_state(ckpt["rng"], run.g_order, run.g_aug, run.device)
        run.history, run.best = list(ckpt["history"]), dict(ckpt["best"])
        run.bad_epochs, run.start_epoch = int(ckpt["bad_epochs"]), int(ckpt["epoch"]) + 1
        run.last_epoch  # noqa: B018  (a history whose last epoch has no number is not one)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:  # a damaged or foreign state
        raise CheckpointError(f"cannot resume from {where}: its training state does not fit this run "
                              f"({type(e).__name__}: {e})") from None


def run_epoch(run: Run, epoch: int, progress: Progress | None = None,
              deadline: float | None = None) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """One epoch: (summed loss, correct count) as device tensors, diverged, steps run. With a deadline
    (time.time()), the epoch ends at the first step past it: the steps run are fewer than run.steps.

    On CUDA nothing in here waits for the GPU (each `.item()` or `if tensor` would stall the
    launch queue): the divergence check reads the summed loss once, at the end of the epoch, unless
    a progress display asks for it. On the CPU it is checked every few steps (that costs nothing
    there) so a diverging run stops within the epoch."""
    c, dev = run.c, run.device
    run.model.train()
    perm = torch.randperm(len(run.x_train), generator=run.g_order).to(dev, non_blocking=True)
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    check_every = DIVERGENCE_CHECK_EVERY if dev.type != "cuda" or progress is not None else 0
    bs = run.batch_size
    # a timed run's step-wise schedule follows its seconds (see TIMED_STEPS); else it steps with the batches
    timed = run.sched_when == "step" and c.train_seconds > 0
    spent, t0, total = run.spent, time.perf_counter(), c.epochs * schedule_steps_per_epoch(c, run.steps)
    for step in range(run.steps):
        idx = perm[step * bs : (step + 1) * bs]
        if run.graphed is not None:
            loss, hits = run.graphed.step(idx)
            if c.grad_clip:
                nn.utils.clip_grad_norm_(run.model.parameters(), c.grad_clip)
            run.opt.step()
        else:
            yb = run.y_train[idx]
            xb = augment(run.x_train[idx].unsqueeze(1).float().div_(255), run.aug, run.g_aug)
            loss, logits = train_step(run.model, run.opt, normalize(xb), yb, c, run.channels_last)
            hits = (logits.argmax(1) == yb).sum()
        if run.ema is not None:
            run.ema.update()
        if timed:
            seconds = spent + time.perf_counter() - t0
            position(run.sched, min(total - 1, int(seconds / c.train_seconds * total)))
        elif run.sched_when == "step":
            run.sched.step()
        loss_sum += loss.detach()
        correct += hits
        if check_every and ((step + 1) % check_every == 0 or step == run.steps - 1):
            if not torch.isfinite(loss_sum):
                return loss_sum, correct, True, step + 1
            if progress is not None:
                progress(epoch, step + 1, run.steps, loss_sum.item() / (step + 1))
        if deadline is not None and step + 1 < run.steps and time.time() > deadline:
            return loss_sum, correct, not bool(torch.isfinite(loss_sum)), step + 1
    return loss_sum, correct, not bool(torch.isfinite(loss_sum)), run.steps


def capture_step(run: Run) -> float | None:
    """Capture the run's CUDA-graphed training step where its config and device want one; the seconds
    that took (warm-up steps included), or None where the run trains eagerly."""
    if not graphs_wanted(run.c.cuda_graphs, run.device):
        return None
    t0 = time.perf_counter()
    run.graphed = try_graphed_step(run.model, run.x_train, run.y_train, run.batch_size, run.aug, run.g_aug,
                                   run.c.label_smoothing, use_bf16(run.device, run.c.precision, run.model),
                                   run.channels_last)
    torch.cuda.synchronize(run.device)
    return time.perf_counter() - t0


def save(run: Run, folder: Path, epoch: int, m: dict, val_metrics: dict, improved: bool) -> Path:
    """best.pt when the epoch improved, and last.pt (everything needed to resume) every epoch."""
    metrics = {**m, "val": val_metrics}
    if improved:
        save_checkpoint(folder / "best.pt", {**run.state(epoch), "metrics": metrics})
    return save_checkpoint(folder / "last.pt", {
        **run.state(epoch),
        "metrics": metrics,
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict() if run.sched is not None else None,
        "rng": _rng_state(run.g_order, run.g_aug, run.device),
        "history": run.history,
        "best": {k: v for k, v in run.best.items() if k != "metrics"},
        "bad_epochs": run.bad_epochs,
        **({"train_model": run.model.state_dict(), "ema_steps": run.ema.steps} if run.ema is not None else {}),
    })


def epoch_row(run: Run, epoch: int, t0: float, trained: tuple | None = None, val: tuple[float, float] | None = None,
              eval_seconds: float | None = None) -> dict[str, Any]:
    """An epoch's row of metrics (result.json, TensorBoard, the checkpoint), the same for an epoch that trained
    and was evaluated (`trained` = (loss sum, correct, steps run, seconds of the steps), `val` = (loss, accuracy))
    and for one that diverged (neither: its training loss is NaN and nothing was evaluated)."""
    if trained is not None:
        loss_sum, correct, steps_run, step_seconds = trained
        images = steps_run * run.batch_size
        train_loss, train_acc, per_sec = loss_sum.item() / steps_run, correct.item() / images, images / step_seconds
    else:
        train_loss, train_acc, per_sec = float("nan"), None, None
    m = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
         "val_loss": val[0] if val else None, "val_acc": val[1] if val else None,
         "lr": run.opt.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0, "images_per_sec": per_sec}
    if eval_seconds is not None:
        m["eval_seconds"] = eval_seconds
    m["diverged"] = trained is None
    return m


def train(
    config: TrainConfig | dict,
    data: EmnistData,
    reporter: Reporter | None = None,
    out_dir: str | Path | None = None,
    resume: str | Path | dict | None = None,
    progress: Progress | None = None,
    checkpoint_dir: str | Path | None = None,
    deadline: float | None = None,
    finish_by: float | None = None,
) -> TrainResult:
    """Train one model; returns the run's summary (best/last metrics, history, checkpoint paths).

    out_dir gets TensorBoard events, `last.pt` (every epoch, for resuming) and `best.pt`
    (best validation accuracy); checkpoint_dir, if given, takes the checkpoints instead.
    `resume` continues from a `last.pt` (path or loaded dict). `deadline` (time.time()): the epoch
    running then ends at its next step, is evaluated, checkpointed and reported (`cut_by_deadline`),
    and the run ends there (a search's time budget). `finish_by` (time.time()): a timed run (train_seconds) that
    would end later is given fewer seconds, so that its schedule is done by then (a time budget's refit).
    """
    c = config if isinstance(config, TrainConfig) else make_config(config)
    t_enter = time.perf_counter()
    run = setup(c, data)
    if resume is not None:
        restore(run, resume)
    if finish_by is not None and c.train_seconds > 0:  # (after restore: the seconds already run count)
        c = run.c = dataclasses.replace(c, train_seconds=max(1e-3, min(c.train_seconds,
                                                                       run.spent + finish_by - time.time())))
    out = Path(out_dir) if out_dir is not None else None
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else out
    if resume is not None and ck is not None and (ck / "best.pt").is_file():
        run.best["metrics"] = load_checkpoint(ck / "best.pt").get("metrics", {}).get("val")
    # (after restore: the capture starts from the restored generators and weights)
    capture_seconds = capture_step(run) if run.start_epoch <= run.last_epoch else None
    tb = None
    if out is not None and run.start_epoch <= run.last_epoch:  # (a resumed run that had ended writes nothing)
        from training.tblog import TBLogger  # tensorboard only where logs are wanted

        # A resumed run, or one that starts over in a folder that already has events (a trial restarted from
        # scratch because its checkpoints were unreadable), purges the steps it runs again: each epoch once.
        again = resume is not None or any(out.glob("events.out.tfevents.*"))
        tb = TBLogger(str(out), c.to_dict(), data.classes, purge_step=run.start_epoch if again else None)

    # Start-up accounting, reported with this run's first epoch: model, optimizer and the data on the
    # device, restore, graph capture, the TensorBoard writer (what a search pays per trial before its
    # first step; benchmarks.search adds it up).
    startup = {"setup_seconds": time.perf_counter() - t_enter, "capture_seconds": capture_seconds}
    diverged, stopped_early = False, bool(run.history and run.history[-1].get("early_stopped"))
    last_path = None
    try:
        for epoch in range(run.start_epoch, run.last_epoch + 1):
            t0 = time.perf_counter()
            # a timed run ends its epoch where its seconds are spent (or at the deadline, if sooner)
            timed_end = time.time() + c.train_seconds - run.spent if c.train_seconds > 0 else None
            stop_at = min((t for t in (deadline, timed_end) if t is not None), default=None)
            loss_sum, correct, diverged, steps_run = run_epoch(run, epoch, progress, stop_at)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds = time.perf_counter() - t0
            now = time.time()
            spent_all = timed_end is not None and now >= timed_end  # the timed run's seconds: this is its last epoch
            cut = steps_run < run.steps
            if diverged:
                m = epoch_row(run, epoch, t0)
                m["best_val_acc"] = max(run.best["val_acc"], 0.0)
                run.history.append(m)
                if tb:
                    tb.epoch(m)
                if reporter:
                    reporter(m, None)
                break

            t_eval = time.perf_counter()
            val_loss, val_acc, val_pred = evaluate(run.delivered, run.x_val, run.y_val, c.eval_batch_size,
                                                   run.channels_last, c.precision)
            eval_seconds = time.perf_counter() - t_eval
            m = {**epoch_row(run, epoch, t0, (loss_sum, correct, steps_run, step_seconds), (val_loss, val_acc),
                             eval_seconds), **startup}
            # what this run has cost so far, training and validation (a time-budgeted ASHA compares at it)
            m["run_seconds"] = run.spent + m["epoch_seconds"]
            startup = {}
            # the time budget is spent: this epoch (cut short, or whole) is the run's last
            budget_end = not spent_all and deadline is not None and now > deadline and (cut or epoch < run.last_epoch)
            if budget_end:
                m["cut_by_deadline"] = True
            if spent_all:
                m["schedule_done"] = True  # a timed run trained its seconds, its schedule to the end
            improved = val_acc > run.best["val_acc"]
            if improved:
                run.best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}
                run.bad_epochs = 0
            else:
                run.bad_epochs += 1
            m["best_val_acc"] = run.best["val_acc"]
            stop = bool(c.early_stop_patience and run.bad_epochs >= c.early_stop_patience)
            m["early_stopped"] = stop  # patience ran out: this is the run's last epoch
            run.history.append(m)
            epoch_schedule(run.sched, run.sched_when, c, m, val_acc)

            if tb:
                tb.epoch(m)
                if c.hist_every and (epoch % c.hist_every == 0 or epoch == 1):
                    tb.histograms(run.model, epoch)
            # Per-class metrics every epoch (a bincount): each checkpoint is self-describing.
            val_metrics = summarize(run.y_val, val_pred, data.classes)
            if improved:
                run.best["metrics"] = val_metrics
                if tb:
                    wrong = (val_pred != run.y_val).nonzero().flatten()[:32]
                    tb.best(epoch, confusion_matrix(run.y_val, val_pred, data.num_classes),
                            run.x_val[wrong], run.y_val[wrong], val_pred[wrong])
            if ck is not None:
                t_save = time.perf_counter()
                last_path = save(run, ck, epoch, m, val_metrics, improved)
                m["save_seconds"] = time.perf_counter() - t_save  # (in the history of the next checkpoints)
            if tb:
                tb.flush()
            if reporter:
                reporter(m, last_path)
            if stop:
                stopped_early = True
                break
            if budget_end or spent_all:
                break
    finally:
        if tb:
            tb.close()

    best = run.best
    return TrainResult(
        best_val_acc=max(best["val_acc"], 0.0),
        best_epoch=best["epoch"],
        epochs_run=len(run.history),
        diverged=diverged,
        stopped_early=stopped_early,
        history=run.history,
        val=best.get("metrics"),
        checkpoint=str(ck / "best.pt") if ck is not None and best["epoch"] else None,
        last_checkpoint=str(last_path) if last_path else None,
        device=str(run.device),
        graphed=run.graphed is not None,
    )
