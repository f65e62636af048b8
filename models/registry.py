"""Model registry: `@register` a builder, `build_model(name, num_classes, **kwargs)` to make one.

Builders are plain functions/classes with explicit keyword arguments, so a bad search
space (a kwarg the model doesn't take) fails with a clear message instead of being ignored.

A model declares its own size knobs where it is registered:

    @register(size={"width": WIDTH, "depth": (1, 100)})
    def vgg(num_classes: int, width: float = 1.0, dropout: float = 0.3, depth: int = 2): ...

A size knob is a keyword its parameter count grows with (tests/test_models.py checks that it does), and its
range is the values a config may give it. Everything else reads them from here: the config's checks and the
keys it accepts (training/config.py: a keyword with no TrainConfig field of its own is carried in the config as
it is), and the largest and cheapest models of a search space (search/space.py).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

CONFIG_TYPES = (bool, int, float, str)  # what a keyword's default may be: a config carries it as a plain value


@dataclass(frozen=True)
class Range:
    """The valid values of a size knob: low <= value <= high (low itself excluded where low_open)."""

    low: float
    high: float = math.inf
    low_open: bool = False

    def problem(self, key: str, value: float) -> str | None:
        """Why `value` is not a valid `key`, in one line; None where it is."""
        if self.low_open and not value > self.low:
            return f"{key} must be > {self.low:g}, got {value}"
        if not self.low_open and not value >= self.low:
            return f"{key} must be >= {self.low:g}, got {value}"
        if not value <= self.high:
            return f"{key} must be <= {self.high:g}, got {value}"
        return None

    def union(self, other: Range) -> Range:
        """The smallest range holding both (what a key's value may be when some model declares it)."""
        low = min(self.low, other.low)
        low_open = all(r.low_open for r in (self, other) if r.low == low)
        return Range(low, max(self.high, other.high), low_open)


@dataclass(frozen=True)
class Model:
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any]  # every keyword it takes (besides num_classes) -> its default
    size: dict[str, Range]  # its size knobs


_MODELS: dict[str, Model] = {}


def register(fn: Callable[..., nn.Module] | None = None, /, *,
             size: Mapping[str, Range | tuple[float, float]] | None = None):
    """Register a model builder under its name (a class's lowercased). `@register` or `@register(size=...)`:
    `size` maps each keyword the parameter count grows with to its valid range, a Range or (low, high)."""
    if fn is None:
        return lambda f: _add(f, size or {})
    return _add(fn, size or {})


def _add(fn: Callable[..., nn.Module], size: Mapping[str, Range | tuple[float, float]]) -> Callable[..., nn.Module]:
    name = fn.__name__.lower() if isinstance(fn, type) else fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    defaults = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("self", "num_classes"):
            continue
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or type(p.default) not in CONFIG_TYPES:
            raise ValueError(f"model {name!r}: keyword {p.name!r} needs a default of type "
                             f"{'/'.join(t.__name__ for t in CONFIG_TYPES)} (a config carries it), got {p.default!r}")
        for other, m in _MODELS.items():
            if p.name in m.defaults and type(m.defaults[p.name]) is not type(p.default):
                raise ValueError(f"model {name!r}: keyword {p.name!r} defaults to a {type(p.default).__name__}, "
                                 f"model {other!r}'s to a {type(m.defaults[p.name]).__name__}: one key, one type")
        defaults[p.name] = p.default
    ranges = {}
    for key, bounds in size.items():
        r = bounds if isinstance(bounds, Range) else Range(*bounds)
        if key not in defaults or type(defaults[key]) not in (int, float):
            raise ValueError(f"model {name!r}: size knob {key!r} is not one of its numeric keywords "
                             f"({', '.join(defaults)})")
        problem = r.problem(key, defaults[key])
        if problem:
            raise ValueError(f"model {name!r}: its default is outside its declared range: {problem}")
        ranges[key] = r
    _MODELS[name] = Model(fn, defaults, ranges)
    return fn


def unregister(name: str) -> None:
    """Remove a registered model (a test's or a plugin's own)."""
    _get(name)
    del _MODELS[name]


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_kwargs(name: str) -> list[str]:
    """The keyword arguments a registered model accepts (besides num_classes)."""
    return list(_get(name).defaults)


def model_defaults(name: str) -> dict[str, Any]:
    """{keyword: default} of a registered model (besides num_classes)."""
    return dict(_get(name).defaults)


def size_ranges(name: str) -> dict[str, Range]:
    """{size knob: valid range} a registered model declares."""
    return dict(_get(name).size)


def model_keywords() -> dict[str, Any]:
    """Every keyword some registered model takes -> its default (the first registered model's)."""
    out: dict[str, Any] = {}
    for m in _MODELS.values():
        out.update({k: v for k, v in m.defaults.items() if k not in out})
    return out


def widest_ranges() -> dict[str, Range]:
    """Every size knob some registered model declares -> the union of the ranges declared for it."""
    out: dict[str, Range] = {}
    for m in _MODELS.values():
        for k, r in m.size.items():
            out[k] = out[k].union(r) if k in out else r
    return out


def builder(name: str) -> Callable[..., nn.Module]:
    return _get(name).builder


def _get(name: str) -> Model:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    model = _get(name)
    unknown = set(kwargs) - set(model.defaults)
    if unknown:
        raise ValueError(
            f"model {name!r} does not take {', '.join(sorted(unknown))}; it takes {', '.join(model.defaults)}"
        )
    return model.builder(num_classes=num_classes, **kwargs)
