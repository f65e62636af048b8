"""N trainers at once on one device, as N search trials sharing a GPU: summed images/s.

    python -m benchmarks.concurrent [--procs 1,4,8] [--data-dir D --split bymerge | --synthetic N]
                                    [--epochs 2] [--set key=value ...]

Each process trains the same config with `training.trainer.train` (its own copy of the data on
the device, as a trial has). All start together behind a barrier; epoch 1 (warm-up: cuDNN
autotuning, graph capture) is left out. The summed throughput is the images of the measured
epochs of all processes over the time from the first of those epochs' start to the last one's
end, so processes that take turns on the device (time slicing without MPS) show up as a sum no
larger than one process alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path
from queue import Empty


def _device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        mps = " (MPS)" if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else ""
        return torch.cuda.get_device_name() + mps
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _load(args) -> object:
    from benchmarks.train import synthetic_data
    from training.data import load_dataset

    if args.synthetic:
        return synthetic_data(args.synthetic, args.split, 0)
    return load_dataset(args.split, args.data_dir, train_limit=args.limit)


def _worker(rank: int, args, overrides: dict, barrier, queue) -> None:
    import torch

    from training.trainer import train

    torch.set_num_threads(max(1, args.threads))
    data = _load(args)
    config = {"split": data.split, "epochs": args.epochs, "hist_every": 0, "device": args.device,
              "seed": rank, **overrides}
    spans = []
    last = [time.perf_counter()]

    def report(m, _path):
        now = time.perf_counter()
        spans.append((last[0], now, m["images_per_sec"] * (m["epoch_seconds"] or 0), m["images_per_sec"]))
        last[0] = now

    barrier.wait()
    last[0] = time.perf_counter()
    train(config, data, reporter=report)
    queue.put((rank, spans))


def run(n: int, args, overrides: dict) -> tuple[float, float]:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, overrides, barrier, queue)) for r in range(n)]
    for p in procs:
        p.start()
    results = []
    try:
        while len(results) < n:
            try:
                results.append(queue.get(timeout=1.0))
            except Empty:
                # A trainer that died (a CUDA error, an MPS daemon refusing it) never reports and leaves
                # the others waiting at the barrier: stop them all instead of waiting for ever.
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:
                    raise SystemExit(f"{len(failed)} of {n} trainer processes failed (exit codes {failed}); "
                                     f"their error is printed above") from None
    finally:
        for p in procs:
            if len(results) < n:
                p.terminate()
            p.join()
    measured = [s for _, spans in results for s in spans[1:]] or [s for _, spans in results for s in spans]
    start, end = min(s[0] for s in measured), max(s[1] for s in measured)
    # images of the measured epochs (the training part: images/s x train seconds, see trainer)
    per_proc = [sum(s[3] for s in spans[1:]) / max(1, len(spans) - 1) for _, spans in results]
    total_images = sum(s[2] for s in measured)
    return sum(per_proc) / n, total_images / (end - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,4,8", help="comma-separated numbers of concurrent trainers")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--split", default="bymerge")
    p.add_argument("--limit", type=int, default=0, help="training images per process (0 = all)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="N random images instead of files")
    p.add_argument("--epochs", type=int, default=2, help="per process; the first is warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    try:
        counts = [int(x) for x in args.procs.split(",")]
    except ValueError:
        p.error(f"--procs must be comma-separated integers, got {args.procs!r}")
    if any(c < 1 for c in counts):
        p.error("--procs values must be >= 1")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    print(f"device: {_device_name(args.device)}; config overrides {overrides or 'none'}; "
          f"{args.epochs} epochs per process (epoch 1 not counted)", flush=True)
    base = None
    for n in counts:
        each, summed = run(n, args, overrides)
        base = base or summed / n
        print(f"{n:2d} trainer(s): {each:9.0f} img/s each, {summed:9.0f} img/s summed "
              f"({summed / base:.2f}x one trainer alone)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
