"""Train one model from the command line.

    python training/train.py --config configs/train.yaml [--data-dir D] [--split S] [--epochs N]
                             [--out DIR] [--set key=value ...] [--json] [--resume]

Writes TensorBoard events and checkpoints under results/runs/<name>/, evaluates the best
checkpoint on the test split at the end, and prints test accuracy and the most confused pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.checkpoint import CheckpointError
from training.config import ConfigError, check_device, load_yaml, make_config, parse_set
from training.data import REPO_ROOT, DataNotFoundError, check_split, load_for_config
from training.fileio import write_atomic
from training.idx import IdxError
from training.metrics import format_pairs

DEFAULT_CONFIG = REPO_ROOT / "configs" / "train.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train one EMNIST model.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML file of config keys")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="folder with the EMNIST files (else $EMNIST_DATA_DIR, then data/)"
    )
    p.add_argument("--split", default=None, help="EMNIST split (balanced, byclass, bymerge, letters, digits, mnist)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="run folder (default results/runs/<model>-<time>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set lr=3e-3 --set model=resnet (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--no-test", action="store_true", help="skip the final test-split evaluation")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    return p.parse_args(argv)


def _progress_printer(epochs: int):
    tty = sys.stderr.isatty()

    def progress(epoch: int, step: int, steps: int, loss: float) -> None:
        if tty:
            filled = int(30 * step / steps)
            bar = "#" * filled + "." * (30 - filled)
            print(
                f"\repoch {epoch}/{epochs} [{bar}] {step}/{steps} loss {loss:.4f}", end="", file=sys.stderr, flush=True
            )

    return progress, tty


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = parse_set(args.overrides)
        if args.split:
            overrides["split"] = args.split
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        # Validate everything before touching data or the GPU.
        config = make_config(overrides, base=load_yaml(args.config))
        check_device(config.device)
        out = args.out or REPO_ROOT / "results" / "runs" / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        resume = None
        if args.resume:
            resume = out / "last.pt"
            if not resume.is_file():
                raise ConfigError(f"--resume: {resume} does not exist")
        elif (out / "last.pt").exists() or (out / "best.pt").exists():
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        data = load_for_config(config, args.data_dir)
        if not args.no_test:  # read only at the end, so checked now: a bad file must not waste the training
            check_split(config.split, "test", args.data_dir, data.classes)
    except (ConfigError, DataNotFoundError, IdxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from training.trainer import train  # torch-heavy import after the cheap checks

    print(
        f"data: {data.split} from {data.source}: {len(data.train_x)} train / {len(data.val_x)} val images, "
        f"{data.num_classes} classes"
    )
    print(f"run:  {out}")
    progress, tty = _progress_printer(config.epochs)

    def report(m: dict, _ckpt) -> None:
        if tty:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
        if m["diverged"]:
            print(f"epoch {m['epoch']:3d}  diverged (non-finite loss): stopping")
            return
        print(
            f"epoch {m['epoch']:3d}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
            f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}  lr {m['lr']:.2e}  "
            f"{m['epoch_seconds']:.1f}s  {m['images_per_sec']:,.0f} img/s",
            flush=True,
        )

    try:
        result = train(config, data, reporter=report, out_dir=out, resume=resume, progress=progress)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved; continue with --out {out} --resume", file=sys.stderr)
        return 130

    summary = {
        "val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "diverged": result.diverged,
        "stopped_early": result.stopped_early,
        "checkpoint": result.checkpoint,
        "test_acc": None,
        "run_dir": str(out),
    }
    if result.diverged:
        print("training diverged: try a lower learning rate")
    print(f"best val accuracy {result.best_val_acc:.4f} at epoch {result.best_epoch}")
    if result.checkpoint and not args.no_test:
        from training.evaluate import evaluate_checkpoint

        test = evaluate_checkpoint(result.checkpoint, args.data_dir, config.device)
        summary["test_acc"] = test["accuracy"]
        summary["most_confused"] = test["most_confused"]
        print(f"test accuracy {test['accuracy']:.4f} on {test['n']} images")
        print(f"most confused: {format_pairs(test['most_confused'])}")
    write_atomic(out / "result.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))  # whole or not at all
    print(f"checkpoint: {result.checkpoint}")
    print(f"tensorboard --logdir {out}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
