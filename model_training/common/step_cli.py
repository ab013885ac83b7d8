"""A step script's command line: ``--config`` + ``key=value`` overrides, ``--help`` with the
step's keys, and one ``error:`` line (exit code 2) for any StepError.

Every step module offers ``DEFAULTS``, ``SHARDABLE`` (an image step splits its images with
``--shard``), ``step_inputs(cfg)``, ``run(cfg) -> summary`` and ``summary_line(summary)``;
its script is ``run_script(step_module, __doc__, argv)``.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from types import ModuleType
from typing import Any, Iterable, Mapping

import yaml

from model_training.common.allocator import tune_allocator
from model_training.common.config import (AUTO, COMMON_DEFAULTS, AutoFloat, Config, StepError,
                                          load_config)


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


def error_line(err: StepError) -> str:
    """A StepError's one line. One raised in a DataLoader worker comes back with the
    worker's traceback in its message (torch re-raises it so), the line last."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]  # "<module>.StepError: <message>"
    return last.partition(": ")[2] or last


def exit_on_config_error(fn, *args, **kwargs):
    """Run ``fn``; a StepError (ConfigError included) becomes ``error: <message>`` on stderr
    and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except StepError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def run_script(step: ModuleType, doc: str, argv: list[str] | None = None) -> dict:
    """The whole body of a step's script: parse, run, print the step's one-line summary."""
    tune_allocator()
    cfg = parse_step_args(step.DEFAULTS, doc, argv, shardable=step.SHARDABLE)
    summary = exit_on_config_error(step.run, cfg)
    print(step.summary_line(summary))
    return summary
