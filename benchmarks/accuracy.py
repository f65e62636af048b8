"""What each accuracy change is worth, measured side by side on real EMNIST (issue #9).

    EMNIST_DATA_DIR=../shared/emnist python -m benchmarks.accuracy --train-limit 30000 --epochs 5 --seeds 2

Trains the same config once per variant (and per seed) on one fixed, stratified training subset,
and prints one table: change, validation accuracy (what decides), test accuracy (reported only,
never used to choose), seconds. Variants:

- baseline      configs/train.yaml as shipped (augmentation on, no weight average)
- +EMA          ema_decay (weight average of the last steps, BatchNorm statistics included)
- +erase        aug_erase (random erasing probability)
- +elastic      aug_elastic (smooth elastic displacement, pixels)
- +TTA          no training: the baseline's delivered model, softmax averaged over the identity and
                small shifts / rotations of each image (`--tta`); its seconds are the extra inference

Runs on one CPU thread by default (`--threads`), so it can share a machine. Each row is the
mean +- std over seeds; with one seed the noise is at least the binomial std of the validation
accuracy, sqrt(p (1 - p) / n), printed under the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The repository instead of this folder (whose concurrent.py would shadow the standard library's).
import torch

from training.augment import TTA_VIEWS, shift_rotate
from training.checkpoint import build_from_checkpoint, load_checkpoint
from training.config import load_yaml, make_config, parse_set
from training.data import load_dataset, load_test
from training.inference import predict_logits
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]

TTA_SETS = {"5 shifts": 5, "5 shifts + 2 rotations": 7}  # the first k of training.augment.TTA_VIEWS


@torch.no_grad()
def view_probs(model, x: torch.Tensor, views) -> list[torch.Tensor]:
    return [predict_logits(model, shift_rotate(x, *v), 1024).softmax(1) for v in views]


def acc(probs: torch.Tensor, y: torch.Tensor) -> float:
    return (probs.argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="bymerge")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--train-limit", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--erase", type=float, default=0.25)
    p.add_argument("--elastic", type=float, default=1.0)
    p.add_argument("--variants", default="baseline,ema,erase,elastic",
                   help="comma-separated: baseline, ema, erase, elastic, all (ema+erase+elastic)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training-config overrides for every variant (e.g. scheduler=none)")
    p.add_argument("--tta", type=int, default=1, help="1: also measure test-time augmentation on the baseline")
    p.add_argument("--json", default=None, help="also write the rows here (updated after every run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = load_yaml(REPO / "configs" / "train.yaml")
    common = {"split": args.split, "model": args.model, "width": args.width, "train_limit": args.train_limit,
              "epochs": args.epochs, "device": "cpu", "hist_every": 0, "ema_decay": 0.0, "aug_erase": 0.0,
              "aug_elastic": 0.0}
    changes = {"baseline": {}, "ema": {"ema_decay": args.ema_decay}, "erase": {"aug_erase": args.erase},
               "elastic": {"aug_elastic": args.elastic},
               "all": {"ema_decay": args.ema_decay, "aug_erase": args.erase, "aug_elastic": args.elastic}}
    common.update(parse_set(args.set))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in changes]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(changes)}")

    t0 = time.perf_counter()
    data = load_dataset(args.split, args.data_dir, train_limit=args.train_limit)
    x_test, y_test, _ = load_test(args.split, args.data_dir)
    print(f"data: {args.split}, {len(data.train_x)} train, {len(data.val_x)} val, {len(x_test)} test images "
          f"(read in {time.perf_counter() - t0:.0f} s); {args.model} width {args.width}, {args.epochs} epochs, "
          f"{args.seeds} seed(s), {args.threads} thread(s); overrides {parse_set(args.set) or 'none'}", flush=True)

    rows: dict[str, list[dict]] = {}

    def record(name: str, row: dict) -> None:
        rows.setdefault(name, []).append(row)
        paired = f"  (val: {row['val_fixed']} fixed, {row['val_broken']} broken)" if "val_fixed" in row else ""
        print(f"  {name:<22} seed {row['seed']}: val {row['val']:.4f}  test {row['test']:.4f}  "
              f"{row['seconds']:.0f} s{paired}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in variants:
                cfg = make_config({**base, **common, **changes[name], "seed": seed})
                t = time.perf_counter()
                result = train(cfg, data, checkpoint_dir=Path(tmp) / f"{name}-{seed}")
                seconds = time.perf_counter() - t
                model = build_from_checkpoint(load_checkpoint(result.checkpoint))
                pv = predict_logits(model, data.val_x, 1024).softmax(1)
                pt = predict_logits(model, x_test, 1024).softmax(1)
                record(name, {"seed": seed, "val": result.best_val_acc, "test": acc(pt, y_test),
                              "seconds": seconds, "best_epoch": result.best_epoch,
                              "val_check": acc(pv, data.val_y)})
                if name == "baseline" and args.tta:
                    # every view once (the identity is the plain prediction); each TTA set averages a prefix
                    t = time.perf_counter()
                    views = TTA_VIEWS
                    val_v = [pv] + view_probs(model, data.val_x, views[1:])
                    test_v = [pt] + view_probs(model, x_test, views[1:])
                    seconds = time.perf_counter() - t
                    for tta, k in TTA_SETS.items():
                        val_tta = torch.stack(val_v[:k]).mean(0).argmax(1) == data.val_y
                        val_one = pv.argmax(1) == data.val_y
                        # paired: the same model on the same images, so what counts is how many flip
                        record(f"baseline+TTA({tta})", {
                            "seed": seed, "val": val_tta.float().mean().item(),
                            "test": acc(torch.stack(test_v[:k]).mean(0), y_test),
                            "seconds": seconds * (k - 1) / (len(views) - 1),
                            "val_fixed": int((val_tta & ~val_one).sum()),
                            "val_broken": int((~val_tta & val_one).sum())})

    print("\n| change | val acc | test acc | seconds | seeds |\n| --- | --- | --- | --- | --- |")
    def fmt(rs: list[dict], key: str, scale: float = 100.0, digits: int = 2) -> str:
        vals = [r[key] * scale for r in rs]
        mean = statistics.fmean(vals)
        return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else f"{mean:.{digits}f}"

    for name, rs in rows.items():
        print(f"| {name} | {fmt(rs, 'val')} | {fmt(rs, 'test')} | {fmt(rs, 'seconds', 1.0, 0)} | {len(rs)} |")
    base_val = statistics.fmean(r["val"] for r in rows.get("baseline", rows[next(iter(rows))]))
    n = len(data.val_x)
    print(f"\nval images: {n}; binomial std of one val accuracy near {base_val:.3f}: "
          f"{100 * math.sqrt(base_val * (1 - base_val) / n):.2f} points (test: {len(x_test)} images, "
          f"{100 * math.sqrt(base_val * (1 - base_val) / len(x_test)):.2f}); total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
