"""Small building blocks shared by the models, and the size ranges they declare (models/registry.py)."""

from models.registry import Range

WIDTH = Range(0.0, low_open=True)  # a channel multiplier: any positive one (config's MAX_PARAMS bounds the top)
MAX_LAYERS = 100  # convs or blocks per stage: beyond it a model trains too slowly to be of any use
LAYERS = Range(1, MAX_LAYERS)


def channels(base: int, width: float) -> int:
    """A layer's channel count at width multiplier `width` (never below 8: thinner layers stop learning)."""
    return max(8, int(round(base * width)))
