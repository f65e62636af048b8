"""VGG-style CNN: stacks of 3x3 conv + BN + ReLU, max-pooling between stages.

`width` multiplies every stage's channels; `depth` is the number of convs per stage.
Global average pooling keeps the head small whatever the width.
"""

from torch import nn

from models.layers import LAYERS, WIDTH, channels
from models.registry import register


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register(size={"width": WIDTH, "depth": LAYERS})
def vgg(num_classes: int, width: float = 1.0, dropout: float = 0.3, depth: int = 2) -> nn.Module:
    if depth < 1:
        raise ValueError(f"vgg depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    cin = 1
    for i, base in enumerate((32, 64, 128)):  # 28 -> 14 -> 7 -> 3
        cout = channels(base, width)
        for _ in range(depth):
            layers += _conv_bn(cin, cout)
            cin = cout
        layers.append(nn.MaxPool2d(2))
        if i < 2:
            layers.append(nn.Dropout2d(dropout / 2))
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(cin, num_classes),
    )
