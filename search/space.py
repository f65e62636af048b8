"""Search spaces in YAML, read like the math, turned into Optuna define-by-run functions.

    base: ../train.yaml            # the default training config (evaluated as the first point)
    fixed: {split: balanced}       # held constant in every trial
    start:                         # points tried next (a portfolio: configurations known to do well), each
      - {model: vgg, width: 1.0}   # some of the space's parameters, the rest the default config's
    space:
      lr:        {loguniform: [1.0e-4, 1.0e-2]}
      width:     {uniform: [0.5, 2.0]}
      epochs_x:  {int: [1, 4]}
      batch_size: {choice: [64, 128, 256]}
      optimizer:
        choice:                    # a mapping under `choice` = conditional parameters
          adamw: {}
          sgd: {momentum: {uniform: [0.8, 0.99]}}

Every sampled name is a config key (a TrainConfig field, or a keyword a registered model takes: its
`heads`, say) and appears once in the tree, so a trial's config is exactly a set of config overrides.
Everything is validated here, before Ray starts: unknown keys, empty or inverted ranges, unknown models,
bad option values, and the largest model the space can sample (its size knobs, as the models declare
them in models/registry.py, at the top of their ranges).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import ConfigError, config_keys, load_yaml, make_config, size_keys

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
TOP_KEYS = {"base", "fixed", "space", "max_epochs", "asha", "samples", "start"}
MAX_START = 20  # points in `start:`
ASHA_KEYS = {"grace_period", "reduction_factor"}


@dataclass
class SearchSpec:
    path: Path
    base: dict[str, Any]  # the default training config (a full TrainConfig dict)
    fixed: dict[str, Any]
    space: dict[str, Any]
    max_epochs: int
    grace_period: int
    reduction_factor: int
    samples: int | None = None
    params: list[str] = field(default_factory=list)  # every key the space can sample
    start: list[dict[str, Any]] = field(default_factory=list)  # `start:` as written (see start_points)

    def trial_base(self) -> dict[str, Any]:
        """The config every trial starts from: defaults, then `fixed`, with the epoch budget."""
        return make_config({**self.fixed, "epochs": self.max_epochs}, base=self.base).to_dict()


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"search space {where}: {msg}")


def _check_dist(key: str, spec: Any, where: str, seen: set[str]) -> None:
    """Validate one parameter's distribution (recursing into conditional choices)."""
    keys = config_keys()
    if key not in keys:
        import difflib

        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _err(where, f"unknown parameter {key!r}{hint}; parameters are TrainConfig keys or a model's keywords")
    if key in seen:
        raise _err(where, f"parameter {key!r} appears more than once; define it in one place")
    seen.add(key)
    if not isinstance(spec, dict):
        _check_value(key, spec, where)  # a constant
        return
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise _err(where, f"{key}: expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{uniform: [0, 1]}}), got {spec}")
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        options = list(arg) if isinstance(arg, dict | list) else None
        if not options:
            raise _err(where, f"{key}: choice needs a non-empty list or mapping of options")
        for option in options:
            _check_value(key, option, where)
        if isinstance(arg, dict):
            for option, sub in arg.items():
                if sub is None:
                    continue
                if not isinstance(sub, dict):
                    raise _err(where, f"{key}={option}: conditional parameters must be a mapping, got {sub!r}")
                for k, v in sub.items():
                    _check_dist(k, v, f"{where}.{key}={option}", seen)
        return
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, int | float | str) for v in arg)):
        raise _err(where, f"{key}: {kind} needs [low, high], got {arg!r}")
    try:
        low, high = float(arg[0]), float(arg[1])
    except ValueError:
        raise _err(where, f"{key}: {kind} bounds must be numbers, got {arg!r}") from None
    if not low < high:
        raise _err(where, f"{key}: empty range [{arg[0]}, {arg[1]}] (low must be below high)")
    if kind in ("loguniform", "logint") and low <= 0:
        raise _err(where, f"{key}: {kind} needs low > 0, got {arg[0]}")
    if kind in ("int", "logint") and (low != int(low) or high != int(high)):
        raise _err(where, f"{key}: int bounds must be integers, got {arg!r}")
    _check_value(key, low, where)
    _check_value(key, high, where)


def _check_value(key: str, value: Any, where: str) -> None:
    """Is `value` a valid setting of config key `key`? (TrainConfig's own checks decide.)"""
    try:
        make_config({key: value})
    except ConfigError as e:
        raise _err(where, f"{key}={value!r} is not a valid value: {e}") from None


MAX_NODES = 100_000  # values in a search space document (a real one has a few hundred)
MAX_DEPTH = 50  # nesting of mappings and lists in it


def _check_shape(doc: Any, where: str) -> None:
    """Refuse a document that is no search space by its size: YAML's anchors can make a short text a
    structure of billions of values (or one that contains itself), and every check below walks it
    (and quotes values in its messages)."""
    stack, seen = [(doc, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES or depth > MAX_DEPTH:
            raise _err(where, f"more than {MAX_NODES} values or {MAX_DEPTH} levels: not a search space")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """A YAML text that holds a mapping (as training.config.load_yaml reads a file), shape-checked."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:  # (RecursionError: nesting beyond the parser's stack)
        raise ConfigError(f"{where}: invalid YAML: {type(e).__name__}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    _check_shape(data, where)
    return data


def load_search_spec(path: str | Path) -> SearchSpec:
    """The search space file at `path` (and the base config it names, relative to it), validated."""
    path = Path(path)
    doc = load_yaml(path)
    _check_shape(doc, str(path))
    _check_top(doc, str(path))
    base_path = doc.get("base")
    base = load_yaml((path.parent / base_path).resolve()) if base_path else {}
    _check_shape(base, str(path))
    return _spec(doc, base, path)


def spec_from_texts(space_text: str, base_text: str | None, path: str | Path) -> SearchSpec:
    """The search space held as text (an experiment's own copy in search.json: search.settings.space_copy), with
    the text of the base config it names (None when it names none), validated as load_search_spec validates
    a file. `path`: where the file was, for messages and SearchSpec.path (nothing is read from it)."""
    path = Path(path)
    if not isinstance(space_text, str) or not (base_text is None or isinstance(base_text, str)):
        raise _err(str(path), "the saved copy is not text")
    doc = _yaml_mapping(space_text, str(path))
    _check_top(doc, str(path))
    if bool(doc.get("base")) != (base_text is not None):
        raise _err(str(path), "names a base config but its copy is missing" if doc.get("base")
                   else "has a copy of a base config it does not name")
    base = _yaml_mapping(base_text, f"{path} (base {doc['base']})") if base_text is not None else {}
    return _spec(doc, base, path)


def _check_top(doc: dict[str, Any], where: str) -> None:
    unknown = {str(k) for k in doc} - TOP_KEYS
    if unknown:
        raise _err(where, f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")


def _spec(doc: dict[str, Any], base: dict[str, Any], path: Path) -> SearchSpec:
    """Validate a search space document and its base config (both read already) into a SearchSpec."""
    try:
        base = make_config(base).to_dict()
        fixed = doc.get("fixed") or {}
        if not isinstance(fixed, dict):
            raise ConfigError(f"fixed must be a mapping of config keys, got {type(fixed).__name__}")
        fixed = dict(fixed)
        make_config(fixed, base=base)
    except ConfigError as e:
        raise _err(str(path), str(e)) from None
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise _err(str(path), "needs a non-empty `space:` mapping of parameters to distributions")
    seen: set[str] = set()
    for key, spec in space.items():
        _check_dist(key, spec, str(path), seen)
    overlap = seen & set(fixed)
    if overlap:
        raise _err(str(path), f"{sorted(overlap)} are both fixed and searched")
    if "epochs" in seen:
        raise _err(str(path), "epochs is the ASHA budget: set it with max_epochs, not in the space")
    asha = doc.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - ASHA_KEYS:
        raise _err(str(path), f"asha takes {sorted(ASHA_KEYS)}, got {asha!r}"[:300])
    max_epochs = doc.get("max_epochs", base["epochs"])
    grace, factor = asha.get("grace_period", 1), asha.get("reduction_factor", 3)
    for name, v, low in (("max_epochs", max_epochs, 1), ("asha.grace_period", grace, 1),
                         ("asha.reduction_factor", factor, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise _err(str(path), f"{name} must be an integer >= {low}, got {v!r}"[:300])
    if grace > max_epochs:
        raise _err(str(path), f"asha.grace_period ({grace}) exceeds max_epochs ({max_epochs})")
    samples = doc.get("samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise _err(str(path), f"samples must be a positive integer, got {samples!r}"[:300])
    for corner in _largest_models(space):  # each value is fine alone; together they may be too big
        try:
            make_config({**fixed, **corner}, base=base)
        except ConfigError as e:
            where = ", ".join(f"{k}={v}" for k, v in corner.items())
            raise _err(str(path), f"the largest model it can sample ({where}) is refused: {e}") from None
    start = doc.get("start") or []
    if not isinstance(start, list) or len(start) > MAX_START or not all(isinstance(p, dict) for p in start):
        raise _err(str(path), f"start must be a list of at most {MAX_START} mappings of the space's parameters, "
                   f"got {start!r}"[:300])
    spec = SearchSpec(path, base, fixed, space, max_epochs, grace, factor, samples, sorted(seen),
                      [dict(p) for p in start])
    start_points(spec)  # each a point of the space, or a one-line error now
    return spec


def __getattr__(name: str) -> Any:
    if name == "SIZE_KEYS":  # what a model's parameter count depends on: the model and every size knob it declares
        return ("model", *size_keys())  # (read at each use: a model registered later counts)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MAX_CORNERS = 1000


def _largest_models(tree: dict[str, Any], size: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The space's points with the largest models: every model it can choose (with its branch),
    each at the top of the ranges of the size knobs the models declare (parameters grow with each)."""
    size = size or ("model", *size_keys())
    corners: list[dict[str, Any]] = [{}]
    for key, dist in tree.items():
        if not isinstance(dist, dict):
            options = [{key: dist}] if key in size else [{}]
        else:
            kind, arg = next(iter(dist.items()))
            if kind == "choice":
                options = []
                for option in arg:
                    sub = arg.get(option) if isinstance(arg, dict) else None
                    own = {key: option} if key in size else {}
                    options += [{**own, **c} for c in (_largest_models(sub, size) if sub else [{}])]
            else:
                options = [{key: arg[1]}] if key in size else [{}]
        unique = {tuple(sorted(o.items(), key=str)): o for o in options}
        corners = [{**c, **o} for c in corners for o in unique.values()][:_MAX_CORNERS]
    return corners


class DefineByRun:
    """Optuna define-by-run function: samples the space, returns the fixed settings.
    Conditional parameters are only suggested when their branch is chosen. A class (not a
    closure) so Ray can pickle the searcher's state for resuming."""

    def __init__(self, spec: SearchSpec):
        self.space = spec.space
        constants = {k: v for k, v in spec.space.items() if not isinstance(v, dict)}
        self.base = {**spec.trial_base(), **constants}  # defaults <- fixed <- constants, epochs = budget

    def __call__(self, trial) -> dict[str, Any]:
        self._sample(trial, self.space)
        # The complete training config: what was not sampled comes from the base. (Ray merges
        # this over the sampled values, so sampled keys must not appear here.)
        return {k: v for k, v in self.base.items() if k not in trial.params}

    def _sample(self, trial, tree: dict[str, Any]) -> None:
        for key, dist in tree.items():
            if not isinstance(dist, dict):
                continue  # constants are returned by __call__
            kind, arg = next(iter(dist.items()))
            if kind == "uniform":
                trial.suggest_float(key, float(arg[0]), float(arg[1]))
            elif kind == "loguniform":
                trial.suggest_float(key, float(arg[0]), float(arg[1]), log=True)
            elif kind in ("int", "logint"):
                trial.suggest_int(key, int(arg[0]), int(arg[1]), log=kind == "logint")
            else:
                value = trial.suggest_categorical(key, list(arg))
                branch = arg.get(value) if isinstance(arg, dict) else None
                if branch:
                    self._sample(trial, branch)


class ReplayTrial:
    """Stands in for an Optuna trial while a DefineByRun space is replayed on a known config:
    answers each suggest_* with the config's value and records its distribution. Tells which
    parameters a trial actually sampled (conditional ones only on their chosen branch)."""

    def __init__(self, config: dict[str, Any]):
        self.config, self.params, self.distributions = config, {}, {}

    def _take(self, name: str, make_dist):
        if name not in self.config:
            raise KeyError(f"the trial's config has no {name!r}")
        import optuna  # only where distributions are wanted, at the first suggest_*

        self.params[name], self.distributions[name] = self.config[name], make_dist(optuna.distributions)
        return self.config[name]

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self._take(name, lambda d: d.FloatDistribution(low, high, step=step, log=log))

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self._take(name, lambda d: d.IntDistribution(low, high, step=step, log=log))

    def suggest_categorical(self, name, choices):
        return self._take(name, lambda d: d.CategoricalDistribution(choices))

    def finished(self, value: float | None, failed: bool = False):
        """This trial as an ended Optuna trial, to add to a study: COMPLETE with its value, else
        FAIL (it raised) or PRUNED (stopped before reporting the metric)."""
        from optuna.trial import TrialState, create_trial

        state = TrialState.COMPLETE if value is not None else TrialState.FAIL if failed else TrialState.PRUNED
        return create_trial(params=self.params, distributions=self.distributions, value=value, state=state)


def replay(space: SearchSpec | DefineByRun, config: dict[str, Any]) -> ReplayTrial:
    """The one way a known config becomes a point of the search space (the searcher catching its study
    up, the summary, the dashboard): the space's define-by-run function answered from `config`.
    Raises KeyError where the config lacks a value the space asks for (another space)."""
    trial = ReplayTrial(config)
    (DefineByRun(space) if isinstance(space, SearchSpec) else space)(trial)
    return trial


def sampled_params(space: SearchSpec | DefineByRun, config: dict[str, Any]) -> dict[str, Any] | None:
    """{name: Optuna distribution} of what a trial with this config actually sampled (a conditional
    parameter only where its branch was chosen); None where the config lacks a value the space asks for
    (another space, or a trial without params.json), or where a choice holds a value no option could be
    (a list or mapping: a damaged params.json)."""
    try:
        return replay(space, config).distributions
    except (KeyError, TypeError):
        return None


def start_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """The `start:` points as points of the space (only the active branches), each completed from the default
    config: `{model: vgg, width: 1.0}` takes vgg's `depth` and every other parameter from it (as default_point, a
    default that is not one of a choice's options is left to the sampler). A key the space does not sample, one not
    on the branches the point chooses, or a value outside its distribution is a ConfigError naming the point."""
    from models import list_models, model_defaults

    base = spec.trial_base()
    out = []
    for i, given in enumerate(spec.start):
        where = f"{spec.path}: start[{i}]"
        unknown = sorted(str(k) for k in given if k not in spec.params)
        if unknown:
            raise _err(where, f"{unknown} are not parameters of the space ({', '.join(spec.params)})")
        model = given.get("model", base["model"])  # (its keywords without a field: that model's defaults)
        own = model_defaults(model) if isinstance(model, str) and model in list_models() else {}
        try:
            point = _point(spec.space, {**own, **base, **given}, given)
        except ValueError as e:
            raise _err(where, f"is not a point of the space: {e}") from None
        unused = sorted(set(given) - set(point))
        if unused:
            raise _err(where, f"{unused} are not on the branch it chooses")
        try:
            make_config(point, base=base)  # (a model too large, a value a config refuses)
        except ConfigError as e:
            raise _err(where, str(e)) from None
        out.append(point)
    return out


def cheapest_point(spec: SearchSpec) -> dict[str, Any]:
    """The default point with every size parameter the space searches (width, depth, blocks: the size knobs the
    models declare) at the low end of its range: the cheapest model of the default's kind, a budget's second point
    (FLAML's low-cost start)."""
    point, size = default_point(spec), size_keys()

    def walk(tree: dict[str, Any]) -> None:
        for key, dist in tree.items():
            if not isinstance(dist, dict):
                continue
            kind, arg = next(iter(dist.items()))
            if key in point and key in size and kind in ("uniform", "loguniform", "int", "logint"):
                point[key] = int(arg[0]) if kind in ("int", "logint") else float(arg[0])
            if kind == "choice" and isinstance(arg, dict) and isinstance(arg.get(point.get(key)), dict):
                walk(arg[point[key]])

    walk(spec.space)
    return point


def default_point(spec: SearchSpec) -> dict[str, Any]:
    """The default training config expressed as a point of the space (only the active branches),
    so the search evaluates it first and can never end worse than the defaults."""
    return _point(spec.space, spec.trial_base())


def _point(space: dict[str, Any], values: dict[str, Any], strict: dict[str, Any] | None = None) -> dict[str, Any]:
    """`values` as a point of the space: the parameters of the branches their choices take. A value that is not one
    of a choice's options is left out (the sampler picks), unless it is in `strict` (given on purpose): then, as a
    number of `strict` outside its range, it is a ValueError. A key `values` lacks (a keyword of another model than
    the config's) is left out too."""
    strict = strict or {}
    point: dict[str, Any] = {}

    def walk(tree: dict[str, Any]) -> None:
        for key, dist in tree.items():
            if not isinstance(dist, dict):
                continue
            kind, arg = next(iter(dist.items()))
            if key not in values:
                continue
            value = values[key]
            if kind == "choice":
                if value not in list(arg):
                    if key in strict:
                        raise ValueError(f"{key}={value!r} is not one of {list(arg)}")
                    continue  # the default is not an option here: let the sampler pick
            elif key in strict and not (isinstance(value, int | float) and not isinstance(value, bool)
                                        and float(arg[0]) <= value <= float(arg[1])):
                raise ValueError(f"{key}={value!r} is outside its distribution {kind} {list(arg)}")
            point[key] = value
            if kind == "choice" and isinstance(arg, dict) and isinstance(arg.get(value), dict):
                walk(arg[value])

    walk(space)
    return point
