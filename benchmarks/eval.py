"""Benchmark: evaluation throughput by batch size, per model, on one device.

    python -m benchmarks.eval [--data-dir D] [--split bymerge] [--limit 4096] [--models small_cnn,vgg]
                              [--batch-sizes 1024,512,256,128,64] [--repeats 3] [--device auto]

Every evaluation in the project (validation each epoch, the search's test summary, the final stage,
the Predictor) goes through `training.inference.predict_logits`, which runs at most CPU_EVAL_BATCH
images at a time on the CPU. This prints, side by side in one process:

  - images/s of predict_logits at each raw batch size (the CPU cap lifted, so each size is really run);
  - the project's default (eval_batch_size 1024, capped on the CPU) against the same 1024 uncapped.

Inputs are real validation images with --data-dir, else random uint8 images (the time does not
depend on the pixels). Sizes run in rotation, `--repeats` times, and the median is printed, so
every size sees the same machine state. fp32, channels_last as in training, no gradients.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from benchmarks.train import device_name
from models import build_model, list_models
from training import inference
from training.inference import predict_logits, resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluation images/s by batch size, per model.")
    p.add_argument("--data-dir", default=None, help="EMNIST folder (default: random images)")
    p.add_argument("--split", default="bymerge")
    p.add_argument("--limit", type=int, default=4096, help="images per timed pass")
    p.add_argument("--models", default=",".join(list_models()), help="comma-separated registered models")
    p.add_argument("--batch-sizes", default="1024,512,256,128,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    a = p.parse_args(argv)
    try:
        a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes takes comma-separated integers, got {a.batch_sizes!r}")
    unknown = [m for m in a.models.split(",") if m not in list_models()]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    if a.limit < 1 or a.repeats < 1 or min(a.batch_sizes) < 1:
        p.error("--limit, --repeats and every batch size must be >= 1")
    a.models = a.models.split(",")
    return a


def images(a: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, int, str]:
    if a.data_dir is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (a.limit, 28, 28), dtype=torch.uint8, generator=g).to(device), 47, "random"
    from training.data import DataNotFoundError, load_dataset

    try:
        data = load_dataset(a.split, a.data_dir, val_limit=a.limit)
    except (DataNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return data.val_x.to(device), data.num_classes, f"{a.split} validation"


def timed(model: torch.nn.Module, x: torch.Tensor, batch: int, cap: int | None) -> tuple[float, float]:
    """(images/s, system seconds) of one predict_logits pass at `batch` with the CPU cap set to `cap`."""
    saved = inference.CPU_EVAL_BATCH
    inference.CPU_EVAL_BATCH = cap if cap is not None else sys.maxsize
    try:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        predict_logits(model, x, batch, channels_last=x.device.type != "mps", precision="fp32")
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        inference.CPU_EVAL_BATCH = saved
    return len(x) / seconds, r1.ru_stime - r0.ru_stime


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = resolve_device(a.device)
    x, n_classes, source = images(a, device)
    cap = inference.CPU_EVAL_BATCH
    print(f"device: {device_name(device)}, {torch.get_num_threads()} CPU threads; {len(x)} {source} images; "
          f"median of {a.repeats}; CPU_EVAL_BATCH = {cap}")
    # (label, raw batch, cap): every raw size with the cap lifted, then the project's default as it runs
    sizes = a.batch_sizes if 1024 in a.batch_sizes else [1024, *a.batch_sizes]  # (1024 uncapped: the baseline)
    runs = [(f"bs {b}", b, None) for b in sizes] + [("default", 1024, cap)]
    for model_name in a.models:
        model = build_model(model_name, n_classes).to(device).eval()
        if x.device.type != "mps":
            model = model.to(memory_format=torch.channels_last)
        predict_logits(model, x[: 2 * max(a.batch_sizes)], max(a.batch_sizes), precision="fp32")  # warm-up
        rates, sys_s = {r[0]: [] for r in runs}, {r[0]: [] for r in runs}
        for _ in range(a.repeats):
            for label, batch, c in runs:
                rate, s = timed(model, x, batch, c)
                rates[label].append(rate)
                sys_s[label].append(s)
        med = {k: statistics.median(v) for k, v in rates.items()}
        cells = "  ".join(f"{k} {med[k]:7.0f}/s (sys {statistics.median(sys_s[k]):4.1f} s)" for k, _, _ in runs[:-1])
        print(f"{model_name:<11} {cells}")
        print(f"{'':<11} project default (eval_batch_size 1024 -> {inference.eval_batch_size(1024, device)} on "
              f"{device.type}): {med['default']:.0f}/s vs 1024 uncapped {med['bs 1024']:.0f}/s: "
              f"{med['default'] / med['bs 1024']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
