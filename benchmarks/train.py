"""Benchmark: a conventional DataLoader epoch vs. the project's device-resident `train()`.

    python -m benchmarks.train [--data-dir D] [--split bymerge] [--limit N] [--model small_cnn]
                             [--batch-size 128] [--synthetic N] [--device auto] [--workers W] [--repeats R]

Both methods train the same model for one epoch with the same batch size, optimizer (AdamW,
lr from the default config), scheduler (none), augmentation magnitudes, channels_last and
bf16 autocast (CUDA, and CPUs with native bf16). They differ only in how batches are made:

  (a) conventional: a Dataset that hands out one PIL image at a time, per-sample torchvision
      transforms in DataLoader worker processes, batches collated and copied to the device;
  (b) resident:     `training.trainer.train`, with the whole uint8 training set on the device,
      randperm batches and one batched `grid_sample` augmentation per batch.

Data is loaded once; (a) and (b) run alternately in one process, so both see the same
machine state. Prints images/s of both, their ratio, and whether the project's targets are met.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from models import build_model
from training.config import ConfigError, TrainConfig, make_config
from training.data import (
    BUILTIN_CLASSES,
    PIXEL_MEAN,
    PIXEL_STD,
    DataNotFoundError,
    EmnistData,
    load_for_config,
)
from training.idx import IdxError
from training.inference import resolve_device, use_bf16
from training.optim import make_optimizer, train_step
from training.trainer import train

# The project's targets: one resident epoch of small_cnn over the full training set
# (~89k images) in under a minute on 2 CPU cores, and a resident/conventional speed-up of at
# least 2.5x on 2 CPU cores and 3.5x on a GPU.
TARGET_EPOCH_SECONDS = 60.0
TARGET_RATIO = {"cpu": 2.5, "cuda": 3.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Images/s of a DataLoader epoch vs. the device-resident trainer.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the EMNIST files")
    p.add_argument("--split", default="bymerge", help="EMNIST split")
    p.add_argument("--limit", type=int, default=0,
                   help="training images (0 = all, after the validation carve-out)")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="use N random 28x28 uint8 images instead of files (machines without the data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers for (a) (default 2 on CPU, 8 on CUDA)")
    p.add_argument("--repeats", type=int, default=1, help="run (a) and (b) alternately this many times")
    return p.parse_args(argv)


class PilDataset(Dataset):
    """The textbook EMNIST Dataset: one uint8 image -> PIL -> per-sample transforms -> tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        # numpy views (no copy): PIL reads numpy arrays, as in torchvision's MNIST/EMNIST classes,
        # and indexing numpy per sample is cheaper than indexing a tensor.
        self.images = images.numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])  # 2-D uint8 -> mode "L"
        return self.transform(img), int(self.labels[i])


def pil_transform(c: TrainConfig) -> transforms.Compose:
    """torchvision transforms with the magnitudes `training.augment` uses (knob x aug_strength)."""
    s = c.aug_strength
    return transforms.Compose([
        transforms.RandomAffine(
            degrees=c.aug_rotate * s,
            translate=(c.aug_translate * s, c.aug_translate * s),
            scale=(1 - c.aug_scale * s, 1 + c.aug_scale * s),
            shear=c.aug_shear * s,
            # Bilinear like the resident path's grid_sample (torchvision's default is nearest,
            # which would be cheaper but is not the same augmentation).
            interpolation=transforms.InterpolationMode.BILINEAR,
        ),
        transforms.ToTensor(),
        transforms.Normalize((PIXEL_MEAN,), (PIXEL_STD,)),
    ])


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this the clock stops before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_conventional(c: TrainConfig, data: EmnistData, device: torch.device, workers: int) -> dict:
    """(a) One epoch through a DataLoader, with the same model, optimizer and loss as train()."""
    torch.manual_seed(c.seed)  # same initial weights as train() builds
    model = build_model(c.model, data.num_classes, **c.model_kwargs()).to(device)
    cl = c.channels_last and device.type != "mps"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(c, model)
    pin = device.type == "cuda"
    loader = DataLoader(
        PilDataset(data.train_x, data.train_y, pil_transform(c)),
        batch_size=c.batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
        persistent_workers=False, drop_last=True, generator=torch.Generator().manual_seed(c.seed),
    )
    model.train()
    loss_sum = torch.zeros((), device=device)
    steps = 0
    sync(device)
    # The clock starts before iter(): starting the workers is paid every epoch when
    # persistent_workers is off, so it belongs in the epoch's cost.
    t0 = time.perf_counter()
    for xb, yb in loader:
        xb = xb.to(device, non_blocking=pin)
        yb = yb.to(device, non_blocking=pin)
        loss, _ = train_step(model, opt, xb, yb, c, cl)  # the very step train() takes
        loss_sum += loss.detach()  # kept on the device, as train() does: no per-step sync
        steps += 1
    sync(device)
    seconds = time.perf_counter() - t0
    images = steps * c.batch_size
    loss = loss_sum.item() / max(1, steps)
    return {"images_per_sec": images / seconds, "seconds": seconds, "train_loss": loss}


def run_resident(c: TrainConfig, data: EmnistData) -> dict:
    """(b) The project's train() for one epoch; its reporter's images_per_sec times training only."""
    metrics: list[dict] = []
    train(c, data, reporter=lambda m, _path: metrics.append(m))
    m = metrics[-1]
    steps = max(1, len(data.train_x) // min(c.batch_size, len(data.train_x)))
    images = steps * min(c.batch_size, len(data.train_x))
    return {"images_per_sec": m["images_per_sec"], "seconds": images / m["images_per_sec"],
            "epoch_seconds": m["epoch_seconds"], "train_loss": m["train_loss"]}


def warm_up(c: TrainConfig, num_classes: int, device: torch.device) -> None:
    """A few throwaway steps, so one-time costs (kernel selection, allocator, lazy CUDA init)
    are not charged to whichever method happens to run first."""
    torch.manual_seed(c.seed)
    model = build_model(c.model, num_classes, **c.model_kwargs()).to(device)
    if c.channels_last and device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(c, model)
    x = torch.randn(c.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, num_classes, (c.batch_size,), device=device)
    for _ in range(5):
        train_step(model, opt, x, y, c, c.channels_last and device.type != "mps")
    sync(device)


def synthetic_data(n: int, split: str, seed: int) -> EmnistData:
    """N random EMNIST-shaped images for machines without the files; speed does not depend on content."""
    g = torch.Generator().manual_seed(seed)
    classes = list(BUILTIN_CLASSES[split])
    n_val = max(1, n // 10)
    x = torch.randint(0, 256, (n + n_val, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, len(classes), (n + n_val,), generator=g)
    return EmnistData(x[:n], y[:n], x[n:], y[n:], classes, split, f"synthetic ({n} random images)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = platform.processor() or platform.machine()
    try:  # Linux: the CPU's marketing name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device} ({model}, {os.cpu_count()} logical cores)"


def load_average() -> str:
    try:
        return f"1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except (AttributeError, OSError):  # not on Windows
        return "unknown"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1 or args.limit < 0 or args.synthetic < 0 or (args.workers or 0) < 0:
        print("error: --repeats must be >= 1; --limit, --synthetic and --workers >= 0", file=sys.stderr)
        return 2
    try:
        # One config for both methods; scheduler none so (a) needs no scheduler to be identical.
        c = make_config({"split": args.split, "model": args.model, "batch_size": args.batch_size, "epochs": 1,
                         "scheduler": "none", "device": args.device, "train_limit": args.limit,
                         "hist_every": 0})
        device = resolve_device(c.device)
        if args.synthetic:
            data = synthetic_data(args.synthetic, c.split, c.seed)
        else:
            data = load_for_config(c, args.data_dir)
    except (ConfigError, DataNotFoundError, IdxError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 2)
    n = len(data.train_x)
    if n < c.batch_size:  # (a) drops the last partial batch: it would train on nothing
        print(f"error: {n} training images is less than one batch of {c.batch_size}", file=sys.stderr)
        return 2
    full = not args.synthetic and not args.limit

    print(f"device:  {device_name(device)}")
    print(f"torch:   {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"{torch.get_num_interop_threads()} inter-op threads")
    print(f"load:    {load_average()}")
    print(f"data:    {data.split} from {data.source}: {n} train / {len(data.val_x)} val images, "
          f"{data.num_classes} classes")
    print(f"setup:   {c.model}, batch {c.batch_size}, AdamW lr {c.lr:g}, scheduler none, 1 epoch, "
          f"channels_last {c.channels_last}, bf16 autocast {use_bf16(device, c.precision)}, "
          f"(a) with {workers} DataLoader workers")
    if c.aug_elastic or c.aug_erase:
        print("note:    aug_elastic/aug_erase are on in the resident path only; (a) does the affine part")
    print(flush=True)

    warm_up(c, data.num_classes, device)
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for r in range(1, args.repeats + 1):
        # Alternate, so slow drifts of the machine (thermal, other load) hit both methods alike.
        a = run_conventional(c, data, device, workers)
        runs["a"].append(a)
        print(f"repeat {r}/{args.repeats}  (a) conventional {a['images_per_sec']:8,.0f} img/s  "
              f"{a['seconds']:7.1f} s  loss {a['train_loss']:.3f}", flush=True)
        b = run_resident(c, data)
        runs["b"].append(b)
        print(f"repeat {r}/{args.repeats}  (b) resident     {b['images_per_sec']:8,.0f} img/s  "
              f"{b['seconds']:7.1f} s  loss {b['train_loss']:.3f}  "
              f"({b['epoch_seconds']:.1f} s with validation)", flush=True)

    a_ips, a_ips_sd = mean_std([x["images_per_sec"] for x in runs["a"]])
    b_ips, b_ips_sd = mean_std([x["images_per_sec"] for x in runs["b"]])
    a_sec, a_sec_sd = mean_std([x["seconds"] for x in runs["a"]])
    b_sec, b_sec_sd = mean_std([x["seconds"] for x in runs["b"]])
    b_epoch, _ = mean_std([x["epoch_seconds"] for x in runs["b"]])
    pairs = zip(runs["a"], runs["b"], strict=True)
    ratio, ratio_sd = mean_std([b["images_per_sec"] / a["images_per_sec"] for a, b in pairs])

    print()
    print(f"{'method':<34} {'images/s':>20} {'epoch seconds':>18}")
    print(f"{'(a) conventional DataLoader, W=' + str(workers):<34} {a_ips:>10,.0f} ± {a_ips_sd:<7,.0f} "
          f"{a_sec:>8.1f} ± {a_sec_sd:<6.1f}")
    print(f"{'(b) resident train()':<34} {b_ips:>10,.0f} ± {b_ips_sd:<7,.0f} "
          f"{b_sec:>8.1f} ± {b_sec_sd:<6.1f}")
    print(f"ratio b/a: {ratio:.2f}x ± {ratio_sd:.2f} (mean of per-repeat ratios, {args.repeats} repeat(s))")
    print("(epoch seconds = training only; train() also validates, which it excludes from images/s)")
    print()

    # Other processes on the machine slow both methods, the DataLoader one more (its workers
    # and the training threads already oversubscribe 2 cores): check the load before trusting.
    print(f"load:    {load_average()} at the end")
    # The targets are defined for the full training set (and 2 CPU cores on the CPU).
    if full:
        verdict = "MET" if b_epoch < TARGET_EPOCH_SECONDS else "NOT MET"
        print(f"target: resident epoch over the full training set ({n} images) < "
              f"{TARGET_EPOCH_SECONDS:.0f} s: {b_epoch:.1f} s with validation ({b_sec:.1f} s training) "
              f"-> {verdict}")
    else:
        print(f"target: resident epoch over the full training set < {TARGET_EPOCH_SECONDS:.0f} s: "
              f"not measured (--limit/--synthetic: {n} images; {b_epoch:.1f} s with validation)")
    want = TARGET_RATIO.get(device.type)
    if want is not None:
        caveat = ""
        if device.type == "cpu" and os.cpu_count() != 2:
            caveat = f" (the CPU target assumes 2 cores; this machine has {os.cpu_count()})"
        if not full:  # small runs are dominated by fixed costs such as starting the workers
            caveat += " (indicative only: not the full training set)"
        print(f"target: ratio b/a >= {want}x on {device.type}: {ratio:.2f}x -> "
              f"{'MET' if ratio >= want else 'NOT MET'}{caveat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
