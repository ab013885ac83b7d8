"""YAML configs with dotted command-line overrides, validated before any work starts.

Every step declares its keys as a nested dict of defaults; a config file (optionally
inheriting a shared file through ``_base_``) and ``key=value`` overrides may only set keys
that exist there, with values of the same type. A mistake is a one-line ``ConfigError``
naming the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

BASE_KEY = "_base_"

# Keys shared by every step; the per-dataset ``common.yaml`` sets them.
COMMON_DEFAULTS: dict[str, Any] = {
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
        },
    },
}


class AutoFloat(float):
    """A number default whose key also takes ``auto``: the step derives the value at run time
    (e.g. step 3's CRF thresholds from the CAMs' best background threshold)."""


AUTO = "auto"


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


def merge_defaults(*parts: Mapping) -> dict:
    """Deep-merge default dicts (later wins): a step's defaults on top of COMMON_DEFAULTS."""
    merged: dict = {}
    for part in parts:
        _deep_update(merged, copy.deepcopy(dict(part)))
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


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=0.01`` -> ("train.lr", 0.01); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override must look like key=value, got: {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            also = " or auto" if isinstance(default, AutoFloat) else ""
            raise ConfigError(f"key '{key}' must be a number{also}, got {value!r}")
        return float(value)
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


def _validate(values: Mapping, defaults: Mapping, prefix: str, source: str) -> dict:
    """The checked values (not yet merged): an unknown key or a wrong type raises ConfigError."""
    checked: dict = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"unknown key '{dotted}' in {source}")
        default = defaults[key]
        if isinstance(default, dict) and default:
            if not isinstance(value, Mapping):
                raise ConfigError(f"key '{dotted}' must be a mapping, got {value!r}")
            checked[key] = _validate(value, default, dotted + ".", source)
        else:
            checked[key] = _check_type(dotted, value, default)
    return checked


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
    from_file = _validate(read_yaml(path), defaults, "", str(path)) if path is not None else {}
    patch: dict = {}
    for text in overrides:
        _set_dotted(patch, *parse_override(text))
    from_cli = _validate(patch, defaults, "", "command-line overrides")
    cfg = merge_defaults(defaults, from_file, from_cli)
    check_paths(cfg)
    parse_shard(cfg.get("shard"))
    return _to_config(cfg)


def check_paths(cfg: Mapping) -> None:
    """Files a config points at must exist before a step starts."""
    dataset = cfg.get("dataset", {})
    if dataset.get("name") != "toy":
        root = dataset.get("root")
        if not root:
            raise ConfigError(f"key 'dataset.root' must be set for dataset '{dataset.get('name')}'")
        if not Path(root).exists():
            raise ConfigError(f"key 'dataset.root': folder does not exist: {root}")
    labels_file = dataset.get("labels_file")
    if labels_file and not Path(labels_file).is_file():
        raise ConfigError(f"key 'dataset.labels_file': file does not exist: {labels_file}")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); empty -> (0, 1). Checked when the config loads, so a bad value
    stops a step before any work instead of leaving images out."""
    if not text:
        return 0, 1
    parts = str(text).split("/")
    numbers = len(parts) == 2 and all(part.strip().isdecimal() for part in parts)
    if numbers and int(parts[0]) < int(parts[1]):
        return int(parts[0]), int(parts[1])
    raise ConfigError(f"key 'shard' must be i/n with 0 <= i < n (e.g. 0/2), got {text!r}")


def save_config(cfg: Mapping, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config beside a step's outputs, so every result says how it was made."""
    out = Path(out_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    plain = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # shards may save at the same time
    tmp.write_text(yaml.safe_dump(plain, sort_keys=False))
    os.replace(tmp, out)
    return out


def _typed(value: Any) -> str:
    """A default as it is written in YAML; ``|auto`` where the key also takes auto."""
    plain = float(value) if isinstance(value, AutoFloat) else value
    text = yaml.safe_dump(plain, default_flow_style=True).strip().removesuffix("...").strip()
    return f"{text}|{AUTO}" if isinstance(value, AutoFloat) else text


def _dotted_defaults(node: Mapping, prefix: str = "") -> Iterable[str]:
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            yield from _dotted_defaults(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}={_typed(value)}"


def describe_keys(defaults: Mapping, shardable: bool) -> str:
    """``--help``'s list of a step's own keys with their defaults, one wrapped line per
    section; the keys every step shares (common.yaml) only by name, ``shard`` only where
    the step splits its images."""
    lines = ["config keys of this step (defaults; set in the YAML or as key=value):"]
    for key, value in defaults.items():
        if key in COMMON_DEFAULTS and value == COMMON_DEFAULTS[key]:
            continue
        if isinstance(value, Mapping) and value:
            lines.append(_wrapped(f"  {key}: ", " ".join(_dotted_defaults(value))))
        else:
            lines.append(f"  {key}={_typed(value)}")
    shared = ", ".join(f"{key}.*" if isinstance(value, Mapping) else key
                       for key, value in COMMON_DEFAULTS.items() if shardable or key != "shard")
    lines.append(_wrapped("keys shared by every step (common.yaml): ", shared))
    return "\n".join(lines)


def _wrapped(head: str, text: str) -> str:
    return textwrap.fill(text, width=88, initial_indent=head, subsequent_indent=" " * 4,
                         break_on_hyphens=False)


def build_arg_parser(doc: str, defaults: Mapping, shardable: bool) -> argparse.ArgumentParser:
    """A step script's parser: ``--help`` shows the script's docstring (what the step does, its
    example command, what it writes) and the step's keys; ``--shard`` only where the step
    splits its images (the inference steps)."""
    example = re.search(r"--config (\S+)", doc)
    parser = argparse.ArgumentParser(description=doc, epilog=describe_keys(defaults, shardable),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help=f"this step's YAML, e.g. {example[1]}" if example else "this step's YAML")
    if shardable:
        parser.add_argument("--shard", metavar="i/n",
                            help="do every n-th image from the i-th (= shard=i/n)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    return parser


def parse_step_args(defaults: Mapping, doc: str, argv: list[str] | None = None,
                    shardable: bool = False) -> Config:
    """Entry-point helper: parse ``--config`` + overrides; a bad config exits 2 with one line."""
    args = build_arg_parser(doc, defaults, shardable).parse_args(argv)
    shard = getattr(args, "shard", None)
    overrides = args.overrides + ([f"shard={shard}"] if shard is not None else [])
    return exit_on_config_error(load_config, args.config, overrides, defaults)


def exit_on_config_error(fn, *args, **kwargs):
    """Run ``fn``; a StepError (ConfigError included) becomes ``error: <message>`` on stderr
    and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except StepError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def resolve_device(name: str):
    """``auto`` picks CUDA when present; an unavailable CUDA device is a config error.

    Under torchrun, ``auto`` / ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``, so
    the processes of one machine do not all land on the first GPU.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"key 'device': unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'device': {name} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
