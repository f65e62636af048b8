"""Augmentation as batched tensor ops on the training device.

One random affine (rotation, shear, scale, translation) per image, optionally plus a
smooth elastic displacement, applied with a single `grid_sample` over the whole batch;
then optional random erasing. No flips: a mirrored character is another character
(or none). Every knob is the maximum magnitude at strength 1; `strength` scales them all,
and strength 0 returns the input untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    strength: float = 1.0
    rotate: float = 10.0  # degrees
    translate: float = 0.08  # fraction of image size
    scale: float = 0.1  # +- fraction
    shear: float = 8.0  # degrees
    elastic: float = 0.0  # pixels
    erase: float = 0.0  # probability

    @classmethod
    def from_config(cls, c) -> AugmentParams:
        return cls(c.aug_strength, c.aug_rotate, c.aug_translate, c.aug_scale, c.aug_shear, c.aug_elastic, c.aug_erase)

    @property
    def is_identity(self) -> bool:
        s = self.strength
        return s == 0 or not any((self.rotate, self.translate, self.scale, self.shear, self.elastic, self.erase))


def _uniform(n: int, bound: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device=device) * 2 - 1) * bound


def augment(x: torch.Tensor, p: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """x: (B, 1, H, W) float images with background 0. Returns a new tensor of the same shape."""
    if p.is_identity:
        return x
    b, _, h, w = x.shape
    dev, s = x.device, p.strength
    out = x
    if any((p.rotate, p.translate, p.scale, p.shear, p.elastic)):
        rot = _uniform(b, math.radians(p.rotate * s), generator, dev)
        shear = _uniform(b, math.radians(p.shear * s), generator, dev)
        # affine_grid maps output to input coordinates, so dividing by the scale enlarges.
        inv_scale = 1.0 / (1.0 + _uniform(b, p.scale * s, generator, dev))
        tx = _uniform(b, 2 * p.translate * s, generator, dev)  # normalised coords span 2
        ty = _uniform(b, 2 * p.translate * s, generator, dev)
        cos, sin, tan = torch.cos(rot), torch.sin(rot), torch.tan(shear)
        # rotation @ x-shear, then scale
        theta = torch.stack(
            [
                torch.stack([cos * inv_scale, (cos * tan - sin) * inv_scale, tx], 1),
                torch.stack([sin * inv_scale, (sin * tan + cos) * inv_scale, ty], 1),
            ],
            1,
        ).to(x.dtype)
        grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
        if p.elastic:
            # Smooth displacement: coarse noise upsampled, so strokes bend instead of fraying.
            coarse = torch.randn(b, 2, 4, 4, generator=generator, device=dev, dtype=x.dtype)
            field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
            grid = grid + field.permute(0, 2, 3, 1) * (p.elastic * s * 2 / max(h, w))
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if p.erase:
        prob = min(1.0, p.erase * s)
        eh = (torch.rand(b, generator=generator, device=dev) * 0.3 + 0.2) * h  # 20-50 % of each side
        ew = (torch.rand(b, generator=generator, device=dev) * 0.3 + 0.2) * w
        cy = torch.rand(b, generator=generator, device=dev) * h
        cx = torch.rand(b, generator=generator, device=dev) * w
        on = torch.rand(b, generator=generator, device=dev) < prob
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        box = ((ys - cy.view(b, 1, 1)).abs() < eh.view(b, 1, 1) / 2) & (
            (xs - cx.view(b, 1, 1)).abs() < ew.view(b, 1, 1) / 2
        )
        out = out.masked_fill((box & on.view(b, 1, 1)).unsqueeze(1), 0.0)
    return out


# Test-time augmentation: the identity, one-pixel shifts, then small rotations (dx px, dy px, degrees).
# `training.inference.predict_probs(..., tta=k)` averages the softmax over the first k views.
TTA_VIEWS = ((0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 8), (0, 0, -8))


def view_theta(dx: float, dy: float, degrees: float, h: int = 28, w: int = 28) -> torch.Tensor:
    """The (2, 3) affine_grid matrix of a view: content moved by (dx, dy) pixels and rotated."""
    a = math.radians(degrees)
    # affine_grid maps output to input coordinates: content moved by +dx is sampled at -dx
    return torch.tensor([[math.cos(a), -math.sin(a), -2 * dx / w], [math.sin(a), math.cos(a), -2 * dy / h]])


def shift_rotate(x: torch.Tensor, dx: float, dy: float, degrees: float, chunk: int = 4096) -> torch.Tensor:
    """uint8 images (N, H, W) with their content moved by (dx, dy) pixels (right, down) and rotated
    by `degrees`, bilinear, background 0; back as uint8. The identity returns `x` itself."""
    if (dx, dy, degrees) == (0, 0, 0):
        return x
    n, h, w = x.shape
    theta = view_theta(dx, dy, degrees, h, w).to(x.device)
    out = []
    for i in range(0, n, chunk):
        xb = x[i : i + chunk].unsqueeze(1).float()
        grid = F.affine_grid(theta.expand(len(xb), 2, 3), list(xb.shape), align_corners=False)
        out.append(F.grid_sample(xb, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    if not out:
        return x
    return torch.cat(out).squeeze(1).round_().clamp_(0, 255).to(torch.uint8)
