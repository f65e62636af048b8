"""Small building blocks shared by the models."""


def channels(base: int, width: float) -> int:
    """A layer's channel count at width multiplier `width` (never below 8: thinner layers stop learning)."""
    return max(8, int(round(base * width)))
