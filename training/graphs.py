"""The training step as one CUDA graph replay (CUDA only; CPU and MPS train eagerly).

A small CNN's training step is ~100 small kernels. Launched one by one from Python, the CPU
takes longer to launch them than the GPU takes to run them (~5 ms per step at batch 128 on an
H100, GPU mostly idle), and several trials sharing a GPU then queue behind each other's
launches. Captured once as a CUDA graph, the whole batch pipeline is a single launch:

    captured:  gather the batch from the resident uint8 images by a static index buffer,
               convert, augment (random draws from the augmentation generator, registered with
               the graph so every replay draws new numbers), normalise, forward under bf16
               autocast, loss, backward, and the step's loss and correct count
    eager:     the optimizer step (fused on CUDA: one kernel per parameter group) and gradient
               clipping, so every optimizer, learning rate schedule and resume works unchanged

The capture needs a few warm-up steps first (cuDNN picks its kernels, autograd builds its
state); their side effects on BatchNorm's running statistics and on the random generators are
undone, so a graphed run trains like an eager one with the same seed.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from training.augment import AugmentParams, augment
from training.data import normalize

WARMUP_STEPS = 3


def graphs_wanted(setting: str, device: torch.device) -> bool:
    """cuda_graphs: auto (on for CUDA), on (CUDA required), off."""
    if setting == "off" or device.type != "cuda":
        return False
    return hasattr(torch.cuda, "CUDAGraph")


class GraphedStep:
    """`step(idx)` = one training step's forward and backward for the batch `x[idx]`, as one replay.
    Returns (loss, correct) device tensors of that step (overwritten by the next replay)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, aug: AugmentParams,
                 g_aug: torch.Generator, label_smoothing: float, bf16: bool, channels_last: bool):
        self.model, self.x, self.y = model, x, y
        self.aug, self.g_aug, self.label_smoothing = aug, g_aug, label_smoothing
        self.bf16, self.channels_last = bf16, channels_last
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=x.device)
        self.graph = torch.cuda.CUDAGraph()
        self._capture()

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        yb = self.y[self.idx]
        xb = normalize(augment(self.x[self.idx].unsqueeze(1).float().div_(255), self.aug, self.g_aug))
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            logits = self.model(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=self.label_smoothing)
        loss.backward()
        return loss.detach(), (logits.argmax(1) == yb).sum()

    def _capture(self) -> None:
        dev = self.x.device
        params = [p for p in self.model.parameters() if p.requires_grad]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        rng = (self.g_aug.get_state(), torch.cuda.get_rng_state(dev))
        try:
            # Warm-up batches: the first images, in order (any valid index would do).
            self.idx.copy_(torch.arange(len(self.idx), device=dev) % len(self.x))
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    for p in params:
                        p.grad = None
                    self._body()
            torch.cuda.current_stream(dev).wait_stream(side)
            # Generators back to where the eager run would start; a capture does not advance them
            # (each replay does, by what the captured kernels draw), so replay 1 draws what eager
            # step 1 would.
            self.g_aug.set_state(rng[0])
            torch.cuda.set_rng_state(rng[1], dev)
            for p in params:
                p.grad = None  # the capture allocates the gradients in the graph's memory; replays rewrite them
            self.graph.register_generator_state(self.g_aug)
            with torch.cuda.graph(self.graph):
                self.loss, self.correct = self._body()
        except BaseException:
            self.g_aug.set_state(rng[0])  # the eager fallback starts where this run was
            torch.cuda.set_rng_state(rng[1], dev)
            raise
        finally:
            # BatchNorm statistics as before the warm-up (in place: the graph holds their addresses)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.idx.copy_(idx, non_blocking=True)
        self.graph.replay()
        return self.loss, self.correct


def try_graphed_step(*args, **kwargs) -> GraphedStep | None:
    """A GraphedStep, or None (with a warning) where this model or PyTorch cannot be captured:
    the run then trains eagerly, as on the CPU."""
    try:
        return GraphedStep(*args, **kwargs)
    except (RuntimeError, AttributeError, TypeError) as e:
        torch.cuda.synchronize()
        warnings.warn(f"CUDA graph capture failed, training eagerly instead: {e}", stacklevel=2)
        return None
