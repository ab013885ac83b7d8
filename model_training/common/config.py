"""YAML configs with dotted command-line overrides, validated before any work starts.

Every step declares its keys as a nested dict of defaults; a config file (optionally
inheriting a shared file through ``_base_``) and ``key=value`` overrides may only set keys
that exist there, with values of the same type. A mistake is a one-line ``ConfigError``
naming the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import math
import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import yaml

from inference.segmentation.submit import runtime

BASE_KEY = "_base_"


class AutoFloat(float):
    """A number default whose key also takes ``auto``: the step derives the value at run time
    (e.g. step 3's CRF thresholds from the CAMs' best background threshold)."""


AUTO = "auto"


class Range(NamedTuple):
    """The values a number key allows; an open end excludes its bound."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return (f"in {'(' if self.open_low else '['}{self.low:g}, "
                f"{self.high:g}{')' if self.open_high else ']'}")


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open_low=True)
FRACTION = Range(0, 1)
OPEN_FRACTION = Range(0, 1, open_low=True, open_high=True)
# item counts of list keys (Schema.sizes)
AT_LEAST_ONE_ITEM = Range(1)
PAIR = (2,)
NONE_OR_PAIR = (0, 2)


class Schema(dict):
    """A step's settings: the nested defaults (their types; a comment says why each differs
    from the obvious) and, in ``ranges``, the values its number keys allow by dotted name
    ("*" matches anything; a list key has each item checked). Checked when a config loads,
    so a value that would train nothing or stack-trace later stops the step first.
    ``run_only``: the dotted keys that change how the step runs, not what it writes
    (provenance leaves them out, so changing them never makes a folder stale). ``types``:
    the type of each key whose default is null (str, int, float or list), since null says
    none. ``sizes``: the item counts a list key allows (a Range or the counts themselves),
    e.g. at least one where an empty list would run and write nothing."""

    def __init__(self, defaults: Mapping = (), ranges: Mapping[str, Range] | None = None,
                 run_only: Iterable[str] = (), types: Mapping[str, type] | None = None,
                 sizes: Mapping[str, Range | tuple[int, ...]] | None = None):
        super().__init__(defaults)
        self.ranges = dict(ranges or {})
        self.run_only = frozenset(run_only)
        self.types = dict(types or {})
        self.sizes = dict(sizes or {})


# Keys shared by every step; the per-dataset ``common.yaml`` sets them.
COMMON_DEFAULTS = Schema({
    "work_dir": "runs/default",
    "device": "auto",
    "seed": 0,
    "overwrite": False,
    "num_workers": 2,
    "on_error": "skip",  # skip | stop: what a step does with a bad image
    "shard": "",  # i/n: an inference step does every n-th image from the i-th; "": all
    "dataset": {
        "name": "toy",
        "root": None,
        "class_names": None,
        # voc: a VOC-style folder without classes.txt has the 21 VOC 2012 classes (else an error)
        "classes": "",
        "train_split": "train",
        "val_split": "val",
        "test_split": "test",
        "labels_file": None,
        "toy": {
            "seed": 0,
            "num_train": 800,
            "num_val": 160,
            "num_test": 80,
            "image_size": [96, 128],
            "missing_label_rate": 0.5,
            "verified_only": False,  # train on the verified quarter, its labels complete
        },
    },
}, ranges={
    "seed": NON_NEGATIVE,
    "num_workers": NON_NEGATIVE,
    "dataset.toy.seed": NON_NEGATIVE,
    "dataset.toy.num_*": AT_LEAST_1,
}, run_only={"work_dir", "device", "num_workers", "overwrite", "on_error", "shard"},
   types={"dataset.root": str, "dataset.class_names": list, "dataset.labels_file": str},
   sizes={"dataset.class_names": Range(2), "dataset.toy.image_size": PAIR})


class StepError(Exception):
    """An error that stops a step before or during its work: the message is one line, and
    the entry points (each step's script, ``run_pipeline.py``) print it and exit 2."""


class ConfigError(StepError):
    """A bad config: the message is one line that names the key or file."""


class Config(dict):
    """A nested dict that also reads as attributes: ``cfg.train.epochs``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def merge_defaults(*parts: Mapping) -> Schema:
    """Deep-merge schemas (later wins): a step's defaults and ranges on top of COMMON_DEFAULTS."""
    merged = Schema()
    for part in parts:
        _deep_update(merged, copy.deepcopy(dict(part)))
        merged.ranges.update(getattr(part, "ranges", {}))
        merged.run_only |= getattr(part, "run_only", frozenset())
        merged.types.update(getattr(part, "types", {}))
        merged.sizes.update(getattr(part, "sizes", {}))
    return merged


def _deep_update(target: dict, source: Mapping) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value) if isinstance(value, Mapping) else value


def _to_config(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config({k: _to_config(v) for k, v in value.items()})
    return float(value) if isinstance(value, AutoFloat) else value


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML file, resolving ``_base_`` (a path relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config file includes itself through {BASE_KEY}: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"invalid YAML in {path}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _deep_update(merged, read_yaml(path.parent / base, _seen + (path.resolve(),)))
    _deep_update(merged, data)
    return merged


NULL_TEXTS = ("", "~", "null", "Null", "NULL")


def parse_override(text: str, text_keys: Iterable[str] = ()) -> tuple[str, Any]:
    """``train.lr=0.01`` -> ("train.lr", 0.01): the value parsed as YAML, except for a key
    in ``text_keys`` (strings and paths), which keeps the text as typed (one pair of quotes
    around it dropped): ``work_dir=runs/exp #2`` keeps its ``#``, ``dataset.root=2012`` is a
    folder name. null, ~ or nothing is null either way."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override must look like key=value, got: {text!r}")
    if key in text_keys:
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            return key, value[1:-1]
        return key, None if value in NULL_TEXTS else value
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _number(key: str, value: Any, also: str = "") -> int | float:
    """``value`` as a number. YAML 1.1 reads ``1e-3`` as text, so a string that spells a
    finite number counts as that number."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    valid = isinstance(number, (int, float)) and not isinstance(number, bool)
    if not valid or (isinstance(value, str) and not math.isfinite(number)):
        raise ConfigError(f"key '{key}' must be a number{also}, got {value!r}")
    return number


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Accept ``value`` where ``default`` says what type the key holds; ints widen to floats."""
    if default is None or value is None:
        return value
    if isinstance(default, AutoFloat) and value == AUTO:
        return AUTO
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        also = " or auto" if isinstance(default, AutoFloat) else ""
        return float(_number(key, value, also))
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"key '{key}' must be an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"key '{key}' must be a string, got {value!r}")
        return str(value)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}' must be a list, got {value!r}")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"key '{key}' must be a mapping, got {value!r}")
    return value


def _validate(values: Mapping, defaults: Mapping, prefix: str, source: str,
              schema: Schema) -> dict:
    """The checked values (not yet merged): an unknown key, a wrong type, a list of too few
    or too many items or a number out of its range raises ConfigError."""
    checked: dict = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"unknown key '{dotted}' in {source}")
        default = defaults[key]
        if isinstance(default, dict) and default:
            if not isinstance(value, Mapping):
                raise ConfigError(f"key '{dotted}' must be a mapping, got {value!r}")
            checked[key] = _validate(value, default, dotted + ".", source, schema)
            continue
        if default is None and dotted in schema.types:
            default = schema.types[dotted]()  # an empty value of the declared type
        value = _check_type(dotted, value, default)
        _check_size(dotted, value, schema.sizes.get(dotted))
        checked[key] = _check_range(dotted, value, default, schema.ranges)
    return checked


def _check_size(key: str, value: Any, size: Range | tuple[int, ...] | None) -> None:
    if size is None or value is None or len(value) in size:
        return
    count = size if isinstance(size, Range) else " or ".join(map(str, size))
    raise ConfigError(f"key '{key}' must be a list of {count} items, got {value!r}")


def text_keys(schema: Schema, prefix: str = "", defaults: Mapping | None = None) -> set[str]:
    """The dotted keys that hold strings or paths: an override keeps their text as typed."""
    keys = set()
    for key, default in (schema if defaults is None else defaults).items():
        dotted = f"{prefix}{key}"
        if isinstance(default, dict) and default:
            keys |= text_keys(schema, dotted + ".", default)
        elif isinstance(default, str) or (default is None and schema.types.get(dotted) is str):
            keys.add(dotted)
    return keys


def _check_range(key: str, value: Any, default: Any, ranges: Mapping[str, Range]) -> Any:
    """``value`` (each item of a list) within the key's range, if it has one."""
    allowed = next((r for pattern, r in ranges.items() if fnmatchcase(key, pattern)), None)
    if allowed is None or value is None or (isinstance(default, AutoFloat) and value == AUTO):
        return value
    items = value if isinstance(value, list) else [value]
    numbers = [_number(key, item) for item in items]
    for item, number in zip(items, numbers):
        if number not in allowed:
            raise ConfigError(f"key '{key}' must be {allowed}, got {item!r}")
    return numbers if isinstance(value, list) else numbers[0]


def _set_dotted(target: dict, key: str, value: Any) -> None:
    node = target
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = value


def load_config(
    path: str | os.PathLike | None,
    overrides: Iterable[str] = (),
    defaults: Mapping | None = None,
) -> Config:
    """Defaults <- YAML file (with ``_base_``) <- ``key=value`` overrides, all validated."""
    defaults = merge_defaults(COMMON_DEFAULTS, defaults or {})
    from_file = (_validate(read_yaml(path), defaults, "", str(path), defaults)
                 if path is not None else {})
    patch: dict = {}
    strings = text_keys(defaults)
    for text in overrides:
        _set_dotted(patch, *parse_override(text, strings))
    from_cli = _validate(patch, defaults, "", "command-line overrides", defaults)
    cfg = merge_defaults(defaults, from_file, from_cli)
    check_paths(cfg)
    parse_shard(cfg.get("shard"))
    return _to_config(cfg)


def check_paths(cfg: Mapping) -> None:
    """Files a config points at must exist, and its work_dir take outputs, before a step starts."""
    from .datasets import check_dataset_name  # the datasets package imports this module

    check_work_dir(cfg.get("work_dir"))
    dataset = cfg.get("dataset", {})
    check_dataset_name(dataset.get("name"))
    if dataset.get("name") != "toy":
        root = dataset.get("root")
        if not root:
            raise ConfigError(f"key 'dataset.root' must be set for dataset '{dataset.get('name')}'")
        if not Path(root).exists():
            raise ConfigError(f"key 'dataset.root': folder does not exist: {root}")
    labels_file = dataset.get("labels_file")
    if labels_file and not Path(labels_file).is_file():
        raise ConfigError(f"key 'dataset.labels_file': file does not exist: {labels_file}")


def check_work_dir(work_dir: str | None) -> None:
    """A step writes under work_dir: a file in its place, or a folder this user may not write
    to, would stop the step only after its work, so neither gets past loading the config."""
    if not work_dir:
        raise ConfigError("key 'work_dir' must be set")
    path = Path(work_dir).absolute()
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))
    if not existing.is_dir():
        raise ConfigError(f"key 'work_dir': {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"key 'work_dir': folder {existing} is not writable")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); empty -> (0, 1). Checked when the config loads, so a bad value
    stops a step before any work instead of leaving images out."""
    if not text:
        return 0, 1
    try:
        return runtime.parse_shard(str(text))
    except runtime.UsageError:
        raise ConfigError(f"key 'shard' must be i/n with 0 <= i < n (e.g. 0/2), got {text!r}") from None


def resolve_device(name: str):
    """``auto`` picks CUDA when present (under torchrun this process's ``cuda:LOCAL_RANK``);
    an unavailable CUDA device is a config error."""
    try:
        return runtime.resolve_device(name)
    except runtime.UsageError as err:
        raise ConfigError(f"key 'device': {err}") from None
