"""Every registered model: output shape, finite outputs, gradients reach every parameter."""

from __future__ import annotations

import pytest
import torch

from models import build_model, list_models, model_kwargs


def test_registry_has_the_variants():
    assert {"small_cnn", "vgg", "resnet", "mobile_cnn"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("width", [0.5, 1.0])
def test_model_forward_backward(name, width):
    torch.manual_seed(0)
    model = build_model(name, num_classes=47, width=width)
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 47)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient at {pname}"


@pytest.mark.parametrize("name", list_models())
def test_model_channels_last_and_eval(name):
    model = build_model(name, num_classes=10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10)


def test_width_changes_parameter_count():
    small = sum(p.numel() for p in build_model("vgg", 47, width=0.5).parameters())
    big = sum(p.numel() for p in build_model("vgg", 47, width=2.0).parameters())
    assert big > 4 * small


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'.*small_cnn"):
        build_model("nope", 10)
    with pytest.raises(ValueError, match="does not take depth"):
        build_model("small_cnn", 10, depth=3)
    assert "width" in model_kwargs("resnet") and "blocks" in model_kwargs("resnet")
