"""Prediction latency of the dashboard's Predictor page, on CPU, through the page's own code path:
the cached model (dashboard.predictor.load_predictor -> Predictor.from_checkpoint) and the
page's input handling (upload bytes -> safe decode -> EMNIST preprocessing -> model -> top-5).

    python -m benchmarks.predict [--results DIR] [--experiment NAME] [--trial ID] [--n 50]

"first" is a cold start: model load from disk plus the first prediction (what the first user
of a trial waits for); "subsequent" is every later prediction (model cached): median and p90.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dashboard import predictor as page
from dashboard.common import experiment_names, open_experiment, results_root


def sample_upload(size: int = 400) -> bytes:
    """A phone-photo-like upload: dark '7' on light paper, RGB PNG."""
    img = Image.new("RGB", (size, size), (235, 232, 225))
    ImageDraw.Draw(img).text((size * 0.3, size * 0.1), "7", fill=(30, 30, 40),
                             font=ImageFont.load_default(size=int(size * 0.7)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def sample_canvas() -> np.ndarray:
    """What the page's drawing canvas returns: 280x280 RGBA, white 20 px strokes on black."""
    img = Image.new("RGBA", (page.CANVAS_SIZE, page.CANVAS_SIZE), "#000000")
    ImageDraw.Draw(img).line([(70, 60), (210, 60), (120, 230)], fill="#FFFFFF", width=page.STROKE_WIDTH)
    return np.asarray(img)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=None, help="results root (default: as the dashboard: $EMNIST_TUNE_RESULTS "
                   "or results/)")
    p.add_argument("--experiment", default=None, help="default: the newest experiment")
    p.add_argument("--trial", default=None, help="default: the best trial with a checkpoint")
    p.add_argument("--n", type=int, default=50, help="subsequent predictions to time")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, as `streamlit run` has them)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Streamlit's cache works outside `streamlit run` (in-memory), but warns about the missing runtime.
    logging.getLogger("streamlit").setLevel(logging.ERROR)

    root = results_root(["--results", args.results] if args.results else [])
    names = experiment_names(root)
    name = args.experiment or (names[0] if names else None)
    if name is None:
        print(f"error: no experiment under {root}; run a search first", file=sys.stderr)
        return 2
    exp = open_experiment(root, name)
    available, _ = page.trial_options(exp)
    option = next((o for o in available if o.trial_id == args.trial), None) if args.trial else \
        (available[0] if available else None)
    if option is None:
        print(f"error: no usable trial {args.trial or ''} with a checkpoint in {name}", file=sys.stderr)
        return 2

    upload, canvas = sample_upload(), sample_canvas()
    t0 = time.perf_counter()
    predictor = page.load_predictor(root, option.checkpoint)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred, message = page.predict_upload(predictor, upload)
    t_first = time.perf_counter() - t0
    if pred is None:
        print(f"error: the sample upload was not predicted: {message}", file=sys.stderr)
        return 1

    def timed(fn) -> list[float]:
        out = []
        for _ in range(args.n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    t0 = time.perf_counter()
    again = page.load_predictor(root, option.checkpoint)
    t_cached_load = time.perf_counter() - t0
    assert again is predictor, "the model cache missed"
    ups = timed(lambda: page.predict_upload(page.load_predictor(root, option.checkpoint), upload))
    cans = timed(lambda: page.predict_input(page.load_predictor(root, option.checkpoint), page.read_canvas(canvas)))
    model_only = timed(lambda: predictor.probabilities(pred.image[None]))

    cfg = predictor.config
    print(f"experiment {name}, trial {option.trial_id} ({cfg.get('model')}, width {cfg.get('width')}, "
          f"{len(predictor.classes)} classes), CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"first call:  model load {_ms(t_load)} + first prediction {_ms(t_first)} = {_ms(t_load + t_first)}")
    print(f"cached model lookup:      {_ms(t_cached_load)}")

    def line(label: str, xs: list[float]) -> str:
        return (f"{label:<26}median {_ms(statistics.median(xs))}  p90 {_ms(float(np.percentile(xs, 90)))}  "
                f"min {_ms(min(xs))}  (n={len(xs)})")

    print(line("upload 400x400 PNG:", ups))
    print(line("canvas 280x280 RGBA:", cans))
    print(line("model forward only:", model_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
