"""The training config: one flat dataclass, so it is easy to log, search over and store
inside checkpoints (as a plain dict, which `torch.load(weights_only=True)` accepts).

`make_config` is the single gate every entry point goes through (YAML, --set, Ray trial
configs, checkpoints): unknown keys and bad values fail here, before any training starts.

The model's keys come from the model registry (models/registry.py): a keyword a registered model takes is a
config key (those without a field of their own ride in `model_args`, given and stored as top-level keys like
the fields), and each size knob a model declares is checked against its declared range.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "plateau", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
CUDA_GRAPHS = ("auto", "off")
# Sane bounds, checked before any work: a model beyond MAX_PARAMS (counted on PyTorch's "meta"
# device, which allocates nothing) would not fit in memory, or not train in any useful time.
MAX_PARAMS = 100_000_000
MAX_SEED = 2**63 - 1


@dataclass
class TrainConfig:
    # data
    split: str = "balanced"
    val_fraction: float = 0.1
    train_limit: int = 0  # 0 = all training images; else a stratified subset of this size
    val_limit: int = 0
    # model (kwargs the model does not take are refused by the registry; size ranges are the model's own)
    model: str = "small_cnn"
    width: float = 1.0
    dropout: float = 0.25
    depth: int = 2  # vgg: convs per stage
    blocks: int = 1  # resnet: blocks per stage
    # optimisation
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    batch_size: int = 128
    epochs: int = 10
    epoch_images: int = 0  # images per epoch (drawn afresh each epoch); 0 = the whole training split
    # > 0: the run lasts this many seconds of training and validation (its run_seconds), its learning-rate schedule
    # spread over them, instead of `epochs` epochs (a time budget). `epochs` still gives the schedule its shape:
    # step_size, warmup_epochs and plateau_patience count epochs of a schedule `epochs` long, mapped onto the time.
    train_seconds: float = 0.0
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # 0 = off
    ema_decay: float = 0.0  # weight average: EMA of weights and BN statistics, per step (e.g. 0.999); 0 = off
    # schedule
    scheduler: str = "onecycle"
    step_size: int = 3  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    plateau_factor: float = 0.3
    plateau_patience: int = 1
    pct_start: float = 0.25  # onecycle: fraction of steps warming up
    warmup_epochs: float = 0.0  # cosine: linear warm-up
    # augmentation: each knob is the maximum at strength 1; aug_strength scales them all
    aug_strength: float = 1.0
    aug_rotate: float = 10.0  # degrees
    aug_translate: float = 0.08  # fraction of the image size
    aug_scale: float = 0.1  # +- fraction
    aug_shear: float = 8.0  # degrees
    aug_elastic: float = 0.0  # pixels of smooth random displacement
    aug_erase: float = 0.0  # probability of erasing a random rectangle
    # run control
    early_stop_patience: int = 0  # epochs without val-accuracy gain before stopping; 0 = off
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    precision: str = "auto"  # auto = bf16 autocast on CUDA and on CPUs with native bf16 (not for depthwise convs there)
    cuda_graphs: str = "auto"  # auto = each training step one CUDA graph replay on CUDA (training/graphs.py); off
    eval_batch_size: int = 1024  # validation batch (on the CPU at most inference.CPU_EVAL_BATCH: larger is slower)
    hist_every: int = 5  # weight/grad histograms every N epochs (0 = never)
    # A registered model's keywords without a field above (a new model's own knob, e.g. heads): given and stored as
    # top-level keys like the fields (to_dict flattens them in); make_config adds the config's model's defaults.
    model_args: dict[str, Any] = field(default_factory=dict)

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the config's model, for models.build_model."""
        from models import model_defaults

        values = {**model_defaults(self.model), **self.model_args}
        return {k: getattr(self, k) if k in FIELDS else values[k] for k in model_defaults(self.model)}

    def to_dict(self) -> dict[str, Any]:
        """The config as one flat mapping of config keys (what make_config takes back)."""
        values = asdict(self)
        extra = values.pop("model_args")
        return {**values, **extra}


FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "model_args"}  # (a model's own keys: config_keys)


def config_keys() -> list[str]:
    """Every key a config takes: TrainConfig's fields, then each keyword a registered model takes that has no field."""
    from models import model_keywords

    return [*FIELDS, *(k for k in model_keywords() if k not in FIELDS)]


def size_keys() -> list[str]:
    """The config keys a model's parameter count grows with: every size knob a registered model declares."""
    from models import widest_ranges

    return [k for k in config_keys() if k in widest_ranges()]


class ConfigError(ValueError):
    """A config key or value that cannot be used; raised before training starts."""


def _coerce(key: str, value: Any) -> Any:
    from models import model_keywords

    kind = type(getattr(TrainConfig(), key) if key in FIELDS else model_keywords()[key])
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; accept it as the number it plainly is
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if kind in (int, float) and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _check(c: TrainConfig) -> None:
    from models import list_models, size_ranges, widest_ranges
    from training.data import SPLITS

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(c.split in SPLITS, f"split must be one of {', '.join(SPLITS)}, got {c.split!r}")
    need(c.model in list_models(), f"model must be one of {', '.join(list_models())}, got {c.model!r}")
    need(c.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {c.optimizer!r}")
    need(c.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}, got {c.scheduler!r}")
    need(c.device in DEVICES or re.fullmatch(r"cuda:\d+", c.device) is not None,
         f"device must be one of {', '.join(DEVICES)} or cuda:N, got {c.device!r}")
    need(c.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    need(c.cuda_graphs in CUDA_GRAPHS, f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}, got {c.cuda_graphs!r}")
    need(0 < c.val_fraction < 1, f"val_fraction must be in (0, 1), got {c.val_fraction}")
    need(c.lr > 0, f"lr must be > 0, got {c.lr}")
    need(c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}")
    need(c.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {c.eval_batch_size}")
    need(c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}")
    own, widest = size_ranges(c.model), widest_ranges()
    for k in size_keys():  # the model's own range; for a key it does not take, the widest any model declares
        if k in FIELDS or k in c.model_args:
            problem = own.get(k, widest[k]).problem(k, getattr(c, k) if k in FIELDS else c.model_args[k])
            if problem:
                raise ConfigError(problem)
    need(0 <= c.seed <= MAX_SEED, f"seed must be in [0, 2**63), got {c.seed}")
    need(0 <= c.dropout < 1, f"dropout must be in [0, 1), got {c.dropout}")
    need(0 <= c.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
    need(0 <= c.ema_decay < 1, f"ema_decay must be in [0, 1) (0 = off), got {c.ema_decay}")
    need(0 <= c.aug_erase <= 1, f"aug_erase is a probability, got {c.aug_erase}")
    need(0 < c.pct_start < 1, f"pct_start must be in (0, 1), got {c.pct_start}")
    need(0 < c.gamma <= 1 and 0 < c.plateau_factor < 1, "gamma must be in (0, 1], plateau_factor in (0, 1)")
    need(c.step_size >= 1, f"step_size must be >= 1, got {c.step_size}")
    for k in ("weight_decay", "momentum", "grad_clip", "train_limit", "val_limit", "early_stop_patience",
              "epoch_images", "train_seconds", "plateau_patience", "warmup_epochs", "hist_every", "aug_strength",
              "aug_rotate", "aug_translate", "aug_scale", "aug_shear", "aug_elastic"):
        need(getattr(c, k) >= 0, f"{k} must be >= 0, got {getattr(c, k)}")
    need(c.aug_scale * c.aug_strength < 1, "aug_scale * aug_strength must be < 1 (a scale of 0 erases the image)")
    params = count_parameters(c)
    need(params <= MAX_PARAMS, f"model too large: {c.model} with {_describe(c.model_kwargs())} has "
         f"{_human(params)} parameters, above the limit of {_human(MAX_PARAMS)}")


def _human(n: float) -> str:
    if n == math.inf:
        return "more than 9.2e18 (its layer sizes overflow)"
    return f"{n / 1e9:.3g}G" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n:,.0f}"


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items()
                     if k != "dropout") or "its defaults"


def count_parameters(c: TrainConfig) -> float:
    """Parameters of the model `c` describes, counted without allocating it (math.inf when even
    its shapes overflow). Uses the split's built-in class count."""
    from models import builder
    from training.data import BUILTIN_CLASSES

    kwargs = {k: (0.0 if k == "dropout" else v) for k, v in c.model_kwargs().items()}  # dropout adds none
    return _count_parameters(c.model, tuple(sorted(kwargs.items())), len(BUILTIN_CLASSES[c.split]),
                             builder(c.model))


@functools.lru_cache(maxsize=512)
def _count_parameters(model: str, kwargs: tuple, num_classes: int, _builder: Any) -> float:
    """(`_builder`, the model's registered builder, keys the cache: a name registered again is another model.)"""
    import torch

    from models import build_model

    try:
        with torch.device("meta"):
            net = build_model(model, num_classes, **dict(kwargs))
    except (RuntimeError, TypeError, OverflowError, MemoryError) as e:  # shapes beyond int64
        if isinstance(e, TypeError) and "overflow" not in str(e).lower():
            raise
        return math.inf
    return sum(p.numel() for p in net.parameters())


def check_device(device: str) -> None:
    """Refuse a device this machine does not have (called by the CLIs before any work; not part of
    make_config, since checkpoints and cluster trials carry devices of other machines)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device {device!r} requested but CUDA is not available ({why}); "
                              "use device auto or cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available on this machine; use device auto or cpu")


def make_config(overrides: dict[str, Any] | None = None, base: TrainConfig | dict | None = None) -> TrainConfig:
    """Defaults <- base <- overrides, validated. Unknown keys suggest the closest valid one. A model's keyword
    without a field goes to model_args, where the config's model's own defaults complete it."""
    from models import list_models, model_defaults

    values = base.to_dict() if isinstance(base, TrainConfig) else dict(base or {})
    values.update(overrides or {})
    keys = config_keys()
    unknown = [k for k in values if k not in keys]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, keys, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}. Valid keys: {', '.join(keys)}")
    values = {k: _coerce(k, v) for k, v in values.items()}
    extra = {k: v for k, v in values.items() if k not in FIELDS}
    model = values.get("model", TrainConfig.model)
    if model in list_models():  # (another is refused by _check)
        extra = {**{k: v for k, v in model_defaults(model).items() if k not in FIELDS}, **extra}
    config = TrainConfig(**{k: v for k, v in values.items() if k in FIELDS}, model_args=extra)
    _check(config)
    return config


MAX_YAML_BYTES = 2**20  # a training config or search space is a few kB: a larger file is not one


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of config keys. The file's size is bounded before it is parsed: PyYAML takes minutes and
    gigabytes over a file of megabytes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size / 2**20:.1f} MB is too large for a config file "
                          f"(at most {MAX_YAML_BYTES // 2**20} MB)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values parsed as YAML scalars (so 1e-3, true, 64 work)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out
