"""A compact ResNet for 28x28 inputs: 3x3 stem, three stages of basic blocks (28, 14, 7)."""

import torch
from torch import nn

from models.layers import LAYERS, WIDTH, channels
from models.registry import register


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


@register(size={"width": WIDTH, "blocks": LAYERS})
def resnet(num_classes: int, width: float = 1.0, dropout: float = 0.1, blocks: int = 1) -> nn.Module:
    if blocks < 1:
        raise ValueError(f"resnet blocks per stage must be >= 1, got {blocks}")
    c0 = channels(32, width)
    layers: list[nn.Module] = [nn.Conv2d(1, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)]
    cin = c0
    for stage, base in enumerate((32, 64, 128)):
        cout = channels(base, width)
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1))
            cin = cout
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
    )
