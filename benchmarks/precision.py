"""Benchmark: one training step in bf16 autocast against fp32, per model, on one device, side by side.

    python -m benchmarks.precision [--models small_cnn,mobile_cnn] [--threads 1] [--batch 128] [--steps 20]
                                   [--repeats 5] [--device cpu] [--width 1.0]

It decides what `precision: auto` means on a CPU with native bf16 (training.trainer.use_bf16): bf16 is ~2x
faster for the plain convolutions of small_cnn, vgg and resnet, but the depthwise convolutions of mobile_cnn can
be slower in bf16 than in fp32 (issue 19: 0.6x on an AMD EPYC). The two precisions alternate, `--repeats` times
each, in one process at `--threads` threads (a trial's one thread by default), and the median of each is printed
with their ratio and what `auto` picks for the model. Random images: the time does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.train import device_name
from models import build_model, list_models
from training.config import make_config
from training.trainer import make_optimizer, resolve_device, train_step, use_bf16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="bf16 autocast vs fp32: training images/s per model.")
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    unknown = [m for m in a.models.split(",") if m not in list_models()]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    if min(a.threads, a.batch, a.steps, a.repeats) < 1:
        p.error("--threads, --batch, --steps and --repeats must be >= 1")
    a.models = a.models.split(",")
    return a


def step_rate(model, opt, x, y, c, precision: str, steps: int) -> float:
    """Training images/s over `steps` steps (after two warm-up steps) at one precision."""
    cfg = make_config({**c.to_dict(), "precision": precision})
    for _ in range(2):
        train_step(model, opt, x, y, cfg, channels_last=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, y, cfg, channels_last=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    native = use_bf16(dev, "auto") if dev.type != "cpu" else bool(
        getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    print(f"device {device_name(dev)}, native bf16: {native}, {a.threads} thread(s), batch {a.batch}, "
          f"width {a.width}, {a.steps} steps x {a.repeats} repeats, alternating")
    print(f"{'model':12s} {'fp32 img/s':>11s} {'bf16 img/s':>11s} {'bf16/fp32':>10s}  auto picks")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 1, 28, 28, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 47, (a.batch,), generator=g).to(dev)
    for name in a.models:
        c = make_config({"model": name, "width": a.width, "split": "bymerge"})
        model = build_model(name, 47, **c.model_kwargs()).to(dev).to(memory_format=torch.channels_last)
        opt = make_optimizer(c, model)
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(a.repeats):
            for p in ("fp32", "bf16"):
                rates[p].append(step_rate(model, opt, x, y, c, p, a.steps))
        f32, b16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
        picks = "bf16" if use_bf16(dev, "auto", model) else "fp32"
        print(f"{name:12s} {f32:11,.0f} {b16:11,.0f} {b16 / f32:9.2f}x  {picks}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
