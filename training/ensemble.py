"""The modules of a delivered model: several models averaged in probability space (Ensemble), and one
model's prediction averaged over views of its input (TestTimeAugment). Only modules: their file format
(`save_model`, and how a file is rebuilt into them) is training/checkpoint.py's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TestTimeAugment(nn.Module):
    """A model whose prediction is averaged over `views` of its input (augment.TTA_VIEWS: the
    identity, one-pixel shifts, +-8 degree rotations), in probability space like an ensemble.
    Takes and gives what the model does (normalised images in, log-probabilities out), so every
    caller (evaluate, Predictor, export) uses it unchanged. The sampling grids are fixed buffers
    (28x28 images), so an exported graph needs only GridSample."""

    def __init__(self, model: nn.Module, views: int, size: int = 28):
        from training.augment import TTA_VIEWS, view_theta

        super().__init__()
        if not 2 <= views <= len(TTA_VIEWS):
            raise ValueError(f"test-time augmentation takes 2..{len(TTA_VIEWS)} views, got {views}")
        self.model, self.views = model, views
        thetas = torch.stack([view_theta(*v, size, size) for v in TTA_VIEWS[1:views]])
        grids = F.affine_grid(thetas, [len(thetas), 1, size, size], align_corners=False)
        self.register_buffer("grids", grids, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from training.data import PIXEL_MEAN, PIXEL_STD

        # the views move the ink over a black (0) background, as shift_rotate does on raw images
        raw = x * PIXEL_STD + PIXEL_MEAN
        probs = self.model(x).float().softmax(1)
        # one grid per image: broadcast against a zero of x's batch, so that an exported graph keeps a
        # dynamic batch size (expand(len(x), ...) would freeze the batch size it was traced with)
        zero = x[:, :1, :1, :1].permute(0, 2, 3, 1) * 0
        for grid in self.grids.unbind(0):  # (a fixed number of views: a traced graph unrolls them)
            view = F.grid_sample(raw, grid + zero, mode="bilinear", padding_mode="zeros", align_corners=False)
            probs = probs + self.model((view - PIXEL_MEAN) / PIXEL_STD).float().softmax(1)
        return (probs / self.views).log()


class Ensemble(nn.Module):
    """Members averaged in probability space. The output is the log of the mean probabilities, so
    anything that treats it as logits (softmax, argmax, cross-entropy) sees the ensemble exactly:
    softmax(log p) = p when p sums to 1."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return probs.log()


def one_view(model: nn.Module) -> nn.Module | None:
    """The cheapest single pass of a delivered model: a TestTimeAugment's model on the identity view, an ensemble's
    first member (so), or None when the model is one pass already. Reading a line screens its many candidate
    characters with it and gives the full model only those the decoder may choose (training/reading.py)."""
    if isinstance(model, TestTimeAugment):
        inner = model.model
    elif isinstance(model, Ensemble):
        inner = model.members[0]
    else:
        return None
    deeper = one_view(inner)
    return inner if deeper is None else deeper
