"""Batched augmentation: shapes, identity at strength 0, seeded reproducibility, each knob acts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.augment import AugmentParams, augment


def _batch(n=16):
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0  # a vertical bar
    return x


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


ALL_ON = AugmentParams(strength=1.0, rotate=15, translate=0.1, scale=0.15, shear=10, elastic=2.0, erase=0.5)


def test_shapes_and_range():
    out = augment(_batch(), ALL_ON, _gen())
    assert out.shape == (16, 1, 28, 28) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1.0 + 1e-6 and torch.isfinite(out).all()


def test_strength_zero_is_identity():
    x = _batch()
    out = augment(x, dataclasses.replace(ALL_ON, strength=0.0), _gen())
    assert torch.equal(out, x)


def test_seeded_reproducibility():
    a = augment(_batch(), ALL_ON, _gen(1))
    b = augment(_batch(), ALL_ON, _gen(1))
    c = augment(_batch(), ALL_ON, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("knob", ["rotate", "translate", "scale", "shear", "elastic", "erase"])
def test_each_knob_changes_images_alone(knob):
    value = {"rotate": 20.0, "translate": 0.15, "scale": 0.2, "shear": 15.0, "elastic": 3.0, "erase": 1.0}[knob]
    p = AugmentParams(strength=1.0, rotate=0, translate=0, scale=0, shear=0, elastic=0, erase=0)
    x = _batch(32)
    out = augment(x, dataclasses.replace(p, **{knob: value}), _gen())
    assert not torch.allclose(out, x, atol=1e-3)
    # Different images in the batch get different transforms.
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_strength_scales_magnitude():
    x = _batch(64)
    weak = augment(x, dataclasses.replace(ALL_ON, strength=0.2, erase=0), _gen()).sub(x).abs().mean()
    strong = augment(x, dataclasses.replace(ALL_ON, strength=1.0, erase=0), _gen()).sub(x).abs().mean()
    assert strong > 2 * weak > 0


def test_geometry_keeps_ink_roughly():
    # Affine jitter moves ink, it should not create or destroy much of it (no flips, no fill).
    x = _batch(64)
    out = augment(x, dataclasses.replace(ALL_ON, erase=0, elastic=0), _gen())
    ratio = out.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ratio.min() > 0.6 and ratio.max() < 1.5


def test_no_flip_on_asymmetric_glyph():
    # With the default magnitudes an "L" keeps its foot on the right of its stem (a flip would not).
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 4:24, 8:11] = 1
    x[:, :, 21:24, 8:22] = 1
    out = augment(x, AugmentParams(), _gen())
    cols = torch.arange(28).float()

    def centre(band):  # horizontal centre of mass of each image's ink in a band of rows
        return (band.sum(1) * cols).sum(1) / band.sum((1, 2))

    stem, foot = centre(out[:, 0, :14]), centre(out[:, 0, 19:])
    assert (foot > stem).all()


def test_tta_views_shift_and_rotate():
    from training.augment import TTA_VIEWS, shift_rotate

    x = torch.zeros(2, 28, 28, dtype=torch.uint8)
    x[:, 10:12, 10:12] = 255
    assert shift_rotate(x, 0, 0, 0) is x and TTA_VIEWS[0] == (0, 0, 0)
    right = shift_rotate(x, 1, 0, 0)
    assert right.dtype == torch.uint8 and torch.equal(right[:, 10:12, 11:13], x[:, 10:12, 10:12])
    down = shift_rotate(x, 0, 1, 0)
    assert torch.equal(down[:, 11:13, 10:12], x[:, 10:12, 10:12]) and int(down.sum()) == int(x.sum())
    turned = shift_rotate(x, 0, 0, 8)
    assert not torch.equal(turned, x) and abs(int(turned.sum()) - int(x.sum())) < 0.05 * int(x.sum())


def test_predict_probs_with_tta():
    from models import build_model
    from training.inference import predict_logits, predict_probs

    torch.manual_seed(0)
    model = build_model("small_cnn", 10).eval()
    x = (torch.rand(5, 28, 28) * 255).to(torch.uint8)
    plain = predict_probs(model, x, precision="fp32")
    assert torch.allclose(plain, predict_logits(model, x, 1024, precision="fp32").softmax(1))
    tta = predict_probs(model, x, precision="fp32", tta=7)
    assert tta.shape == (5, 10) and torch.allclose(tta.sum(1), torch.ones(5)) and not torch.allclose(tta, plain)
    with pytest.raises(ValueError, match="tta must be in"):
        predict_probs(model, x, tta=8)
