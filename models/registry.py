"""Model registry: `@register` a builder, `build_model(name, num_classes, **kwargs)` to make one.

Builders are plain functions/classes with explicit keyword arguments, so a bad search
space (a kwarg the model doesn't take) fails with a clear message instead of being ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__.lower() if isinstance(fn, type) else fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_kwargs(name: str) -> list[str]:
    """The keyword arguments a registered model accepts (besides num_classes)."""
    params = inspect.signature(_get(name)).parameters
    return [p for p in params if p not in ("self", "num_classes")]


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    builder = _get(name)
    unknown = set(kwargs) - set(model_kwargs(name))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take {', '.join(sorted(unknown))}; it takes {', '.join(model_kwargs(name))}"
        )
    return builder(num_classes=num_classes, **kwargs)
