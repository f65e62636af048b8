"""One optimisation step and what it updates: the optimizer (its parameter groups) and the weight average that
is evaluated and delivered when the config asks for one (ema_decay)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.inference import autocast


def make_optimizer(c: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CUDA the fused implementations: one kernel per parameter group instead of several per tensor.
    fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0, **fused)
    if c.optimizer == "adam":
        return torch.optim.Adam(groups, lr=c.lr, **fused)
    return torch.optim.AdamW(groups, lr=c.lr, **fused)



def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, c: TrainConfig,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a normalised batch; returns (loss, logits). Shared with the benchmark
    so both pipelines train identically."""
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with autocast(xb.device, c.precision, model):
        logits = model(xb)
    loss = F.cross_entropy(logits.float(), yb, label_smoothing=c.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if c.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    opt.step()
    return loss, logits


class WeightAverage:
    """An exponential moving average of a model's weights *and* buffers (so BatchNorm's running
    statistics match the averaged weights), updated after every optimizer step.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) over the first steps t (as TensorFlow's
    and timm's EMA do): a short run's average then never remembers the random initialisation.
    The update is one `torch._foreach_lerp_` over all floating tensors, outside any CUDA graph
    (the graphed step's parameters keep their addresses, so the pairs stay valid)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))
        self._avg = [(a, b) for a, b in pairs if a.is_floating_point()]
        self._copy = [(a, b) for a, b in pairs if not a.is_floating_point()]  # e.g. num_batches_tracked

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        if self._avg:
            torch._foreach_lerp_([a for a, _ in self._avg], [b for _, b in self._avg], 1.0 - decay)
        for a, b in self._copy:
            a.copy_(b)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average over from the model's current weights."""
        self.steps = 0
        for a, b in self._avg + self._copy:
            a.copy_(b)
