"""A MobileNet-style CNN: depthwise-separable convs. Few FLOPs per image, so it is the
cheapest model to search over on CPU-only machines."""

from torch import nn

from models.layers import WIDTH, channels
from models.registry import register


def _separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


@register(size={"width": WIDTH})
def mobile_cnn(num_classes: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    c = [channels(b, width) for b in (32, 64, 128, 128, 256)]
    layers: list[nn.Module] = [
        nn.Conv2d(1, c[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(c[0]),
        nn.ReLU(inplace=True),
    ]
    for cin, cout, stride in ((c[0], c[1], 2), (c[1], c[2], 1), (c[2], c[3], 2), (c[3], c[4], 1)):
        layers += _separable(cin, cout, stride)  # 28 -> 14 -> 14 -> 7 -> 7
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c[4], num_classes)
    )
