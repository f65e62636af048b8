"""Inference: which device, which precision, and a model's logits, probabilities and accuracy on a batch of
images. Used by training (validation each epoch), the final stage, the Predictor and the benchmarks; nothing
here trains."""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from training.augment import TTA_VIEWS, shift_rotate
from training.data import normalize


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but MPS is not available")
    return torch.device(name)


# On the CPU a large evaluation batch is slower, not faster: a batch's activations beyond glibc malloc's
# largest mmap threshold (32 MB; small_cnn's first layer at batch 1024 is ~100 MB) are fresh pages from the
# kernel for every batch, and zeroing them shows up as system time. `python -m benchmarks.eval` measures it.
CPU_EVAL_BATCH = 128


def eval_batch_size(batch_size: int, device: torch.device) -> int:
    """The batch an evaluation really runs at: the asked one, at most CPU_EVAL_BATCH on the CPU (the
    logits do not depend on it)."""
    return min(batch_size, CPU_EVAL_BATCH) if device.type == "cpu" else batch_size


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int, channels_last: bool = False,
                   precision: str = "auto") -> torch.Tensor:
    """Logits for uint8 images (N, 28, 28) already on the model's device, `batch_size` at a time (at most
    CPU_EVAL_BATCH on the CPU)."""
    model.eval()
    dev = x.device
    batch_size = eval_batch_size(batch_size, dev)
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i : i + batch_size].unsqueeze(1).float().div_(255))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(dev, precision, model):
            out.append(model(xb).float())
    return torch.cat(out) if out else torch.empty(0, 0, device=dev)


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, channels_last: bool = False,
                  precision: str = "auto", tta: int = 1) -> torch.Tensor:
    """Class probabilities for uint8 images (N, 28, 28) on the model's device. tta > 1: test-time
    augmentation, the softmax averaged over the first `tta` views of `augment.TTA_VIEWS` (the
    identity, one-pixel shifts, +-8 degree rotations); tta costs that many forward passes."""
    if not 1 <= tta <= len(TTA_VIEWS):
        raise ValueError(f"tta must be in [1, {len(TTA_VIEWS)}], got {tta}")
    total = None
    for view in TTA_VIEWS[:tta]:
        p = predict_logits(model, shift_rotate(x, *view), batch_size, channels_last, precision).softmax(1)
        total = p if total is None else total.add_(p)
    return total.div_(tta)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             channels_last: bool = False, precision: str = "auto") -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions) on uint8 images and labels on the model's device."""
    logits = predict_logits(model, x, batch_size, channels_last, precision)
    loss = F.cross_entropy(logits, y).item()
    pred = logits.argmax(1)
    return loss, (pred == y).float().mean().item(), pred


def _has_depthwise(model: nn.Module) -> bool:
    """Whether a model has grouped (depthwise) convolutions: oneDNN's bf16 kernels for them are slower than its fp32
    ones on the CPU (benchmarks.precision: mobile_cnn 0.59x in bf16 on an Intel Xeon with AMX, 0.6x on an AMD EPYC
    with AVX512-BF16, against 1.7-2.5x faster for the plain convolutions of small_cnn, vgg and resnet)."""
    cached = _DEPTHWISE.get(model)
    if cached is None:
        cached = _DEPTHWISE[model] = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    return cached


_DEPTHWISE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_bf16(device: torch.device, precision: str = "auto", model: nn.Module | None = None) -> bool:
    """bf16 autocast: ~2x on CUDA tensor cores, and ~2x for convolutions on CPUs with native bf16
    (AVX512-BF16/AMX, where oneDNN has bf16 kernels). Never where it would be emulated (slow), nor on the
    CPU for a model with depthwise convolutions, which are slower there in bf16 (_has_depthwise)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
        return native and (model is None or not _has_depthwise(model))
    return False


def autocast(device: torch.device, precision: str = "auto", model: nn.Module | None = None):
    if use_bf16(device, precision, model):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
