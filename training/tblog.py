"""TensorBoard logging for one training run: scalars, histograms, hparams and images.

Images (confusion matrix, misclassified samples) are drawn with Pillow: a few
milliseconds, no matplotlib, so they can be refreshed at every new best epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "lr": "opt/lr",
    "epoch_seconds": "perf/epoch_seconds",
    "images_per_sec": "perf/images_per_sec",
    "best_val_acc": "hparam/best_val_acc",  # the HParams tab reads its metric from this tag
}


def _hparam_value(v: Any) -> Any:
    return v if isinstance(v, bool | int | float | str) else str(v)


class TBLogger:
    def __init__(self, log_dir: str, config: dict, classes: list[str], purge_step: int | None = None):
        # purge_step drops events past a resumed epoch, so a resumed run does not show duplicates.
        if purge_step is not None:
            _after_existing_files(log_dir)
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)
        self.classes = classes
        # HParams session written up front, so runs that are stopped early still appear.
        exp, ssi, sei = hparams({k: _hparam_value(v) for k, v in config.items()}, {SCALARS["best_val_acc"]: 0.0})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def epoch(self, m: dict) -> None:
        for key, tag in SCALARS.items():
            if key in m and m[key] is not None:
                self.writer.add_scalar(tag, m[key], m["epoch"])

    def histograms(self, model: nn.Module, epoch: int) -> None:
        for name, p in model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), epoch)
            if p.grad is not None:
                self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), epoch)

    def best(
        self, epoch: int, confusion: torch.Tensor, images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor
    ) -> None:
        self.writer.add_image(
            "val/confusion_matrix", confusion_image(confusion, self.classes), epoch, dataformats="HWC"
        )
        if len(images):
            grid = misclassified_grid(images, true, pred, self.classes)
            self.writer.add_image("val/misclassified", grid, epoch, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _after_existing_files(log_dir: str) -> None:
    """TensorBoard reads a folder's event files in the order of their names, and a purge only hides the events of
    files read before it. A name is `events.out.tfevents.<second>.<host>.<pid>.<n>`, with a counter `n` per
    process: within one second, a process's 10th file sorts before its 9th ('.10' < '.9'). So a writer that must
    purge starts in a later second than every file already there (waits below a second, and only when a run
    starts over within the same second as an earlier one: in tests)."""
    import time
    from pathlib import Path

    seconds = []
    for f in Path(log_dir).glob("events.out.tfevents.*"):
        part = f.name.split(".")[3:4]
        if part and part[0].isdigit():
            seconds.append(int(part[0]))
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if 0 < wait <= 2:  # (a clock set back further than that is not waited for)
            time.sleep(wait)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def confusion_image(cm: torch.Tensor, classes: list[str], cell: int = 12) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB heatmap with class labels (sqrt colour scale
    so that the off-diagonal mistakes, not only the diagonal, are visible)."""
    cm = cm.double()
    norm = (cm / cm.sum(1, keepdim=True).clamp(min=1)).sqrt().numpy()
    n, margin = len(classes), 22
    size = margin + n * cell
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    for i in range(n):
        draw.text((2, margin + i * cell), classes[i][:2], fill="black", font=font)  # rows: true
        draw.text((margin + i * cell + 1, 4), classes[i][:2], fill="black", font=font)  # cols: predicted
        for j in range(n):
            v = norm[i, j]
            colour = (
                (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
                if i == j
                else (255, int(255 * (1 - v)), int(255 * (1 - v)))
            )
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour)
    return np.asarray(img)


def misclassified_grid(
    images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, classes: list[str], cols: int = 8, scale: int = 2
) -> np.ndarray:
    """Tiles of misclassified images (uint8, N x 28 x 28) captioned 'true>pred'."""
    n = len(images)
    tile, caption = 28 * scale, 12
    rows = (n + cols - 1) // cols
    img = Image.new("RGB", (cols * (tile + 4), rows * (tile + caption + 4)), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    for k in range(n):
        r, c = divmod(k, cols)
        x0, y0 = c * (tile + 4), r * (tile + caption + 4)
        char = Image.fromarray(images[k].cpu().numpy()).resize((tile, tile), Image.NEAREST).convert("RGB")
        img.paste(char, (x0, y0))
        draw.text((x0 + 2, y0 + tile), f"{classes[int(true[k])]}>{classes[int(pred[k])]}", fill="red", font=font)
    return np.asarray(img)
