"""`<exp>/search.json`: the settings a search was started with, as one record, `SearchSettings`.

One writer: search/run.py makes the record (`settings_of`) and search/tuner.py writes it when the search starts
(`write_settings`, local or in cloud storage). One reader, `read_settings`, for everyone who needs a setting back:
`--resume` (search.run.apply_saved_settings keeps them), the final stage (the same data split, `data_config`) and
search/results.py (the time budget's seconds per trial). A file that is there but damaged (an edit, a value of the
wrong type) is one `SettingsError` naming the file and the field, never a TypeError further on.

The search space's own text is kept in it too (`space_copy`), so the summary and the dashboard replay the trials
into the space the search really sampled from (`saved_space`, which never raises: what it cannot use is a reason
shown on the page).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from search.layout import MAX_EPOCH, SETTINGS_FILE, is_uri, read_storage_file, write_storage_file
from training.fileio import read_json, small_file

MAX_SPACE_BYTES = 2**20  # a search space YAML (and its base config) is small: a bigger file is not one
MAX_SETTINGS_BYTES = 4 * MAX_SPACE_BYTES  # search.json, which holds both texts (JSON-escaped) beside the settings
REPO_SPACES = Path(__file__).resolve().parents[1] / "configs" / "search"  # where this repository's spaces are
DATA_KEYS = ("split", "val_fraction", "seed", "train_limit", "val_limit")  # how the training split was divided
# The type of each setting as the command line parses it (None: not given when the search started); a str must
# not be empty. space_text and base_text may be any text; the budget plan and the data are objects of their own.
_TYPES = {"config": str, "config_sha256": str, "space_text": str, "base_text": str, "samples": int,
          "max_epochs": int, "split": str, "seed": int, "device": str, "data_dir": str, "time_budget": float,
          "budget": dict, "data": dict}
_ANY_TEXT = ("space_text", "base_text")
_DATA_TYPES = {"split": str, "val_fraction": float, "seed": int, "train_limit": int, "val_limit": int}
_BUDGET_TYPES = {"max_t_s": float, "grace_s": float, "epoch_images": int, "final_s": float, "margin_s": float}


class SettingsError(ValueError):
    """search.json cannot be used; the message names the file and the field."""


def _check(value: Any, kind: type, key: str, where: str, text: bool = False, positive: bool = False) -> Any:
    """value as `kind` (an int is a float too), or SettingsError naming the file and the field: a str is not empty
    (unless any `text`), a float is finite (and > 0 where `positive`)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and kind is str:
        ok = bool(value) or text
    elif ok and kind is float:
        ok = math.isfinite(value) and (value > 0 or not positive)
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise SettingsError(f"{where} is damaged: {key!r} is {shown}, not a {kind.__name__}")
    return value


@dataclass
class SearchSettings:
    """What a search was started with; None: not given (the space file's value, or an older search)."""

    config: str  # the search space file, resolved
    config_sha256: str | None = None
    space_text: str | None = None  # the space file's text and its base config's (space_copy)
    base_text: str | None = None
    samples: int | None = None
    max_epochs: int | None = None
    split: str | None = None
    seed: int | None = None
    device: str | None = None
    data_dir: str | None = None
    data: dict | None = None  # DATA_KEYS of the trials' base config: how the training split was divided
    time_budget: float | None = None  # seconds (--time-budget)
    budget: dict | None = None  # the budget's plan (search.budget.Plan.to_dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any, where: str = SETTINGS_FILE) -> SearchSettings:
        """The settings of a search.json object; SettingsError naming the file and the first field that does not
        have its type. Keys this version does not know are left out (an older or newer search wrote them)."""
        if not isinstance(value, dict):
            raise SettingsError(f"{where} is damaged: it is not a JSON object")
        got: dict[str, Any] = {}
        for f in fields(cls):
            v = value.get(f.name)
            got[f.name] = None if v is None and f.name != "config" else _check(
                v, _TYPES[f.name], f.name, where, text=f.name in _ANY_TEXT, positive=f.name == "time_budget")
        for part, types in (("data", _DATA_TYPES), ("budget", _BUDGET_TYPES)):
            if got[part] is not None:
                got[part] = {**got[part], **{k: _check(got[part][k], kind, f"{part}.{k}", where)
                                             for k, kind in types.items() if got[part].get(k) is not None}}
        if got["budget"] is not None:  # (the one number every reader of a budget needs)
            _check(got["budget"].get("max_t_s"), float, "budget.max_t_s", where, positive=True)
        return cls(**got)


def data_config(data: dict) -> dict:
    """The data settings of a trial config (DATA_KEYS), TrainConfig's defaults for what `data` does not say: what
    training.data.load_for_config needs to divide the training split as the search did."""
    from training.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name in DATA_KEYS}
    return {**defaults, **{k: data[k] for k in DATA_KEYS if k in data}}


def settings_path(exp_dir: str | Path) -> str:
    return f"{str(exp_dir).rstrip('/')}/{SETTINGS_FILE}"


def read_settings(exp_dir: str | Path) -> SearchSettings | None:
    """The settings a search was started with (search.json), wherever the experiment is stored; None when the
    experiment has none. SettingsError naming the file (and the field) when it is there but cannot be used: not
    JSON, not an object, larger than settings are, a field damaged; OSError when it cannot be read at all."""
    where = settings_path(exp_dir)
    if is_uri(exp_dir):
        data = read_storage_file(exp_dir, SETTINGS_FILE)
    else:
        path = Path(exp_dir) / SETTINGS_FILE
        if not path.exists() and not path.is_symlink():
            return None
        if not small_file(path, MAX_SETTINGS_BYTES):
            raise SettingsError(f"{where} is damaged: not a regular file of at most {MAX_SETTINGS_BYTES // 2**20} MB")
        data = path.read_bytes()
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SettingsError(f"{where} is damaged: it is not JSON ({type(e).__name__})") from None
    return SearchSettings.from_json(value, where)


def write_settings(exp_dir: str | Path, settings: SearchSettings) -> None:
    """Save search.json with the experiment, wherever it is stored (see read_settings)."""
    write_storage_file(exp_dir, SETTINGS_FILE, (json.dumps(settings.to_json(), indent=1) + "\n").encode())


def space_copy(config: Path) -> dict:
    """The search space's own text and its base config's, kept with the experiment: the summary and the
    dashboard replay trials into the space the search really sampled from, also after the file in the
    repository was edited or removed (saved_space)."""
    from training.config import load_yaml

    base = load_yaml(config).get("base")
    return {"space_text": config.read_text(),
            "base_text": (config.parent / str(base)).resolve().read_text() if base else None}


# ---------------------------------------------------------------- the space, replayed from search.json

def saved_space(exp_dir: str | Path):
    """(the search space a local experiment was started with, its ASHA budget in epochs, None), or
    (None, None, why not). The one reader of it for the summary and the dashboard.

    A search saves the text of its space and of its base config in search.json (space_text, base_text:
    space_copy), so the space is replayed from that copy whatever became of the file. The copy is
    used when it is text of a bounded size, matches the checksum saved beside it (config_sha256, where there
    is one) and is a valid space. Older experiments have no copy: the file search.json names (or, where that
    path is not on this machine, the file of the same name in this repository's configs/search/) is used
    only while it still has the saved checksum, since an edited space would put trials' configs into the
    wrong parameters. Never raises: a damaged or hostile search.json is a reason (field by field, so that what
    is usable of a hand-edited file still is)."""
    settings = read_json(Path(exp_dir) / SETTINGS_FILE, max_bytes=MAX_SETTINGS_BYTES)
    if settings is None:
        return None, None, f"the experiment has no readable {SETTINGS_FILE}"
    path = settings.get("config")
    if not isinstance(path, str) or not path or len(path) > 4096:
        return None, None, f"{SETTINGS_FILE} names no search space file"
    path = Path(path)
    saved = settings.get("config_sha256")
    saved = saved if isinstance(saved, str) else None
    spec, why = None, None
    if "space_text" in settings:
        spec, why = _space_from_copy(settings, path, saved)
    if spec is None:
        spec, why_file = _space_from_file(path, saved)
        if spec is None:  # both reasons, the copy's first: it is what a newer experiment relies on
            why = f"{why}, and {why_file}" if why else why_file
    if spec is None:
        return None, None, why
    max_epochs = settings.get("max_epochs")
    ok = isinstance(max_epochs, int) and not isinstance(max_epochs, bool) and 1 <= max_epochs <= MAX_EPOCH
    return spec, max_epochs if ok else spec.max_epochs, None


_SPACE_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError)


def _space_from_copy(settings: dict, path: Path, saved: str | None):
    """(the space from search.json's own copy of it, None), or (None, why the copy cannot be used)."""
    from search.space import spec_from_texts
    from training.config import ConfigError

    texts = settings.get("space_text"), settings.get("base_text")
    if not isinstance(texts[0], str) or not (texts[1] is None or isinstance(texts[1], str)):
        return None, f"the copy of the search space in {SETTINGS_FILE} is not text"
    try:
        encoded = [t.encode() for t in texts if t is not None]
    except UnicodeError:  # (a lone surrogate from a \ud800 escape)
        return None, f"the copy of the search space in {SETTINGS_FILE} is not valid text"
    if any(len(t) > MAX_SPACE_BYTES for t in encoded):
        return None, f"the copy of the search space in {SETTINGS_FILE} is larger than a search space"
    # (the copy was read as text: a file with CRLF line ends has the checksum of the text with them)
    sums = {hashlib.sha256(t).hexdigest() for t in (encoded[0], encoded[0].replace(b"\n", b"\r\n"))}
    if saved is not None and saved not in sums:
        return None, f"the copy of the search space in {SETTINGS_FILE} does not match its checksum"
    try:
        return spec_from_texts(texts[0], texts[1], path), None
    except (ConfigError, *_SPACE_ERRORS) as e:
        return None, f"the copy of the search space in {SETTINGS_FILE} cannot be used ({type(e).__name__})"


def _space_from_file(path: Path, saved: str | None):
    """(the space from the file search.json names, None), or (None, why not): see saved_space."""
    from search.space import load_search_spec
    from training.config import ConfigError, load_yaml

    where = str(path)
    try:
        here = small_file(path, MAX_SPACE_BYTES)
        if not here and path.name and small_file(REPO_SPACES / path.name, MAX_SPACE_BYTES):
            repo = REPO_SPACES / path.name
            if saved is not None and hashlib.sha256(repo.read_bytes()).hexdigest() == saved:
                path, here = repo, True  # the same file, in this repository (an experiment from another machine)
            else:
                return None, (f"the search space file {where} that {SETTINGS_FILE} names is not on this machine, and "
                              f"configs/search/{path.name} in this repository " + (
                                  "has been edited since the search started (its checksum differs)"
                                  if saved is not None else "may not be the same file (no checksum was saved)"))
        if not here:
            return None, f"the search space file {where} that {SETTINGS_FILE} names is not on this machine"
        if saved is not None and hashlib.sha256(path.read_bytes()).hexdigest() != saved:
            return None, f"the search space file {where} has been edited since the search started"
        base = load_yaml(path).get("base")
        if base and not small_file((path.parent / str(base)).resolve(), MAX_SPACE_BYTES):
            return None, f"the base config of the search space file {where} is not there any more"
        return load_search_spec(path), None
    except (ConfigError, *_SPACE_ERRORS) as e:
        return None, f"the search space file {where} cannot be read ({type(e).__name__})"
