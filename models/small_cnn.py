"""The classic small CNN: two conv blocks, then a fully connected head with dropout.

~0.43M parameters at width 1, most of them in the first linear layer. Cheap enough to
train an epoch of EMNIST on two CPU cores in well under a minute.
"""

from torch import nn

from models.layers import WIDTH, channels
from models.registry import register


@register(size={"width": WIDTH})
def small_cnn(num_classes: int, width: float = 1.0, dropout: float = 0.25) -> nn.Module:
    c1, c2, hidden = channels(32, width), channels(64, width), channels(128, width)
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 7x7
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
