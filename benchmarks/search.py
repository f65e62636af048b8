"""Search benchmark: the same small search (same space, samples, epochs, seed, ASHA) run twice,
with the project's trainable and with a tutorial-style trainable, the way Ray Tune's PyTorch
examples write one: every trial loads the dataset itself and trains through a DataLoader with
per-sample torchvision transforms. Prints the wall-clock of both and the ratio.

    python -m benchmarks.search --data-dir ../shared/emnist [--samples 6] [--max-epochs 3] [--limit 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.search_report import budget
from search.space import load_search_spec
from training.data import REPO_ROOT, load_for_config


def tutorial_model(c, num_classes: int) -> tuple[torch.nn.Module, torch.device]:
    """The tutorial's model set-up: the model on the trial's device (CUDA when Ray gave the
    trial a GPU), as `model.to(device)` in Ray Tune's PyTorch example."""
    from models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(c.seed)
    return build_model(c.model, num_classes, **c.model_kwargs()).to(device), device


def tutorial_trainable(config: dict, data_dir: str, workers: int) -> None:
    """A trial written like the Ray Tune PyTorch tutorial (load data, DataLoader, model and each
    batch moved to the trial's device, loop, one report per epoch)."""
    from ray import tune
    from torch.utils.data import DataLoader

    from benchmarks.train import PilDataset, pil_transform
    from training.config import make_config
    from training.optim import make_optimizer
    from training.schedule import make_scheduler

    c = make_config(config)
    data = load_for_config(c, data_dir)  # in every trial
    model, device = tutorial_model(c, data.num_classes)
    pin = device.type == "cuda"
    train_loader = DataLoader(PilDataset(data.train_x, data.train_y, pil_transform(c)), batch_size=c.batch_size,
                              shuffle=True, num_workers=workers, drop_last=True, pin_memory=pin,
                              persistent_workers=workers > 0)
    val_loader = DataLoader(PilDataset(data.val_x, data.val_y, pil_transform(make_config({"aug_strength": 0}))),
                            batch_size=c.eval_batch_size, num_workers=workers, pin_memory=pin,
                            persistent_workers=workers > 0)
    opt = make_optimizer(c, model)
    sched, when = make_scheduler(c, opt, len(train_loader))
    start = 1
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    for epoch in range(start, c.epochs + 1):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=c.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if when == "step":
                sched.step()
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
                total += len(y)
        if when == "epoch":
            sched.step()
        elif when == "plateau":
            sched.step(correct / total)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                       os.path.join(d, "checkpoint.pt"))
            tune.report({"epoch": epoch, "val_acc": correct / total, "val_loss": loss_sum / total},
                        checkpoint=tune.Checkpoint.from_directory(d))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}), no GPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "search" / "smoke.yaml")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=10000, help="training images per trial")
    p.add_argument("--concurrency", type=int, default=None, help="default: CPUs (or 4 per GPU)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the tutorial trainable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, help="EMNIST split (default: the space's)")
    p.add_argument("--order", default="project,tutorial", help="which to run, in order")
    args = p.parse_args(argv)

    from ray import tune

    from search.resources import Resources
    from search.trainable import train_trial
    from search.tuner import init_ray, make_run_config, make_tuner, resources

    spec = load_search_spec(args.config)
    spec.max_epochs = args.max_epochs
    spec.grace_period = min(spec.grace_period, args.max_epochs)
    spec.fixed.update(train_limit=args.limit, hist_every=0, **({"split": args.split} if args.split else {}))
    base = spec.trial_base()
    data_dir = str(Path(args.data_dir or os.environ.get("EMNIST_DATA_DIR", REPO_ROOT / "data")).resolve())
    storage = tempfile.mkdtemp(prefix="search-bench-")
    init_ray(None)
    try:
        cpt, gpt, concurrency = resources(Resources(concurrency=args.concurrency))
        print(f"search: {args.samples} samples, up to {args.max_epochs} epochs, {concurrency} trials at once, "
              f"{args.limit} training images, space {args.config.name}, seed {args.seed}; torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, device: {device_name()}" + (f", {gpt:g} GPU per trial" if gpt else ""))
        walls, epochs_run = {}, {}
        for which in args.order.split(","):
            if which == "project":
                data = load_for_config(base, data_dir)
                fn = tune.with_parameters(train_trial, data=data)  # data read once, shared via the object store
            else:
                fn = tune.with_parameters(tutorial_trainable, data_dir=data_dir, workers=args.workers)
            trainable = tune.with_resources(fn, {"cpu": cpt, "gpu": gpt})
            tuner = make_tuner(trainable, spec, args.samples, concurrency, args.seed,
                               make_run_config(which, storage, []))
            start = time.perf_counter()
            grid = tuner.fit()
            walls[which] = time.perf_counter() - start
            best = grid.get_best_result(metric="val_acc", mode="max", scope="all")
            epochs = sum(len(r.metrics_dataframe) for r in grid if r.metrics_dataframe is not None)
            epochs_run[which] = epochs
            print(f"{which:9s} trainable: {walls[which]:7.1f} s wall-clock, {epochs} trial-epochs "
                  f"({walls[which] / epochs:.2f} s each), best val_acc {best.metrics_dataframe['val_acc'].max():.4f}",
                  flush=True)
            if which == "project":
                print("\n".join("  " + ln for ln in budget([r.metrics_dataframe for r in grid], walls[which],
                                                           concurrency)), flush=True)
    finally:
        import ray

        ray.shutdown()
    if {"project", "tutorial"} <= set(walls):
        per_epoch = {k: walls[k] / epochs_run[k] for k in walls}
        print(f"ratio tutorial/project: {walls['tutorial'] / walls['project']:.2f}x wall-clock (target >= 2x on 2 CPU "
              f"cores); {per_epoch['tutorial'] / per_epoch['project']:.2f}x per trial-epoch "
              "(ASHA may stop different trials in the two runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
