"""Benchmark: one training step in bf16 autocast against fp32, per model, on one device, side by side.

    python -m benchmarks.precision [--models small_cnn,mobile_cnn] [--threads 1] [--batch 128] [--steps 20]
                                   [--repeats 5] [--device cpu] [--width 1.0] [--compile]

It decides what `precision: auto` means on a CPU with native bf16 (training.inference.use_bf16): bf16 is ~2x
faster for the plain convolutions of small_cnn, vgg and resnet, but the depthwise convolutions of mobile_cnn can
be slower in bf16 than in fp32 (issue 19: 0.6x on an AMD EPYC). The two precisions alternate, `--repeats` times
each, in one process at `--threads` threads (a trial's one thread by default), and the median of each is printed
with their ratio and what `auto` picks for the model. Random images: the time does not depend on the pixels.

--compile measures instead what `torch.compile` would cost and buy a trial (issue 19: only worth it where its
compile time fits inside the first rung of a budget): per model, at the precision `auto` picks, the seconds of
the first compiled steps (the compilation), then eager and compiled images/s alternating, and the seconds of
training after which the compilation has paid for itself.
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
from training.inference import resolve_device, use_bf16
from training.optim import make_optimizer, train_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="bf16 autocast vs fp32: training images/s per model.")
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile: compile seconds and speed vs eager")
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


def compiled_step(model, opt, c, channels_last: bool = True):
    """The project's training step (train_step) compiled whole: forward, loss, backward and the optimizer."""
    import torch._dynamo

    torch._dynamo.reset()  # (each model compiles from nothing: its compile time is what a trial would pay)
    return torch.compile(lambda x, y: train_step(model, opt, x, y, c, channels_last))


def compile_row(name: str, a, dev, x, y) -> str:
    c = make_config({"model": name, "width": a.width, "split": "bymerge"})
    model = build_model(name, 47, **c.model_kwargs()).to(dev).to(memory_format=torch.channels_last)
    opt = make_optimizer(c, model)
    step = compiled_step(model, opt, c)
    t0 = time.perf_counter()
    for _ in range(3):  # the first calls compile (and recompile once the optimizer's state exists)
        step(x, y)
    compile_s = time.perf_counter() - t0
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(a.repeats):
        for kind, fn in (("eager", lambda: train_step(model, opt, x, y, c, True)), ("compiled", lambda: step(x, y))):
            fn()
            t1 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            rates[kind].append(a.steps * len(x) / (time.perf_counter() - t1))
    eager, comp = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    gain = 1 / eager - 1 / comp  # seconds saved per image
    pays = f"{compile_s / (gain * eager):.0f} s" if gain > 0 else "never"
    return f"{name:12s} {compile_s:10.1f} {eager:11,.0f} {comp:13,.0f} {comp / eager:8.2f}x  {pays}"


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
    if a.compile:
        print(f"{'model':12s} {'compile s':>10s} {'eager img/s':>11s} {'compiled img/s':>13s} {'ratio':>9s}  "
              "pays for itself after (eager training seconds)")
        for name in a.models:
            print(compile_row(name, a, dev, x, y), flush=True)
        return 0
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
