"""What made a step folder, so a result cannot silently come from other settings or inputs.

A step records, as it starts writing, its *recipe* in ``provenance.json``: the resolved
settings that change its outputs and the identity of every input it reads (an upstream
step folder's fingerprint, or a file's hash). A later run of the step, by its script or by
``run_pipeline.py``, compares its own recipe with the recorded one: equal means resume or
skip; different means stop with one line naming what differs, unless ``overwrite=true``.
A finished folder's fingerprint (its recipe plus its checkpoints' bytes) is what the steps
after it record as their input, so a change in step 3 makes steps 4-7 stale too.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from model_training.common.config import COMMON_DEFAULTS, ConfigError, merge_defaults

from .folder_lock import LOCK_FILE, lock_folder
from .step_io import DONE_FILE, TEMP_PREFIX, save_config, write_or_stop

PROVENANCE_FILE = "provenance.json"

# Settings a training step may change while it resumes (continue for more epochs).
RESUMABLE_KEYS = frozenset({"train.epochs"})


def output_settings(cfg: Mapping, defaults: Mapping) -> dict[str, Any]:
    """The config as dotted keys, without the run-only ones of ``defaults`` (the step's
    ``DEFAULTS``) and of ``COMMON_DEFAULTS``."""
    run_only = merge_defaults(COMMON_DEFAULTS, defaults).run_only
    flat: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in run_only:
                continue
            if isinstance(value, Mapping) and value:
                walk(value, dotted + ".")
            else:
                flat[dotted] = value

    walk(cfg, "")
    return flat


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def input_identity(path: str | os.PathLike) -> str:
    """What an input is now: a finished step folder's fingerprint (its recipe and its
    checkpoints), a file's hash, or a plain folder's listing (names and sizes)."""
    path = Path(path)
    if path.is_file():
        return f"file {_hash_files([path])}"
    if (path / PROVENANCE_FILE).is_file():
        if not (path / DONE_FILE).is_file():
            return "unfinished"
        recipe = (path / PROVENANCE_FILE).read_bytes()
        checkpoints = sorted(path.glob("*.pt"))
        return f"step {hashlib.sha256(recipe).hexdigest()[:16]}-{_hash_files(checkpoints)}"
    if (path / DONE_FILE).is_file():
        return "finished without a provenance record (an older version)"
    if path.is_dir():
        listing = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
        return f"folder {hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}"
    return "missing"


def _as_json(value: Any) -> Any:
    """``value`` as ``provenance.json`` holds it: tuples become lists, paths strings."""
    return json.loads(json.dumps(value, default=str))


def build_recipe(cfg: Mapping, inputs: Mapping[str, str | os.PathLike],
                 defaults: Mapping) -> dict:
    """Settings and input identities, as recorded in ``provenance.json``."""
    return _as_json({"settings": output_settings(cfg, defaults),
                     "inputs": {name: input_identity(path) for name, path in inputs.items()}})


def read_recipe(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def differences(recorded: Mapping, wanted: Mapping, defaults: Mapping) -> list[str]:
    """``key: old -> new`` for every setting or input that differs. A setting the record
    lacks (the code gained it since) counts as unchanged while it holds its default:
    an option is added with a default that keeps the old behaviour."""
    found = []
    for section, label in (("settings", ""), ("inputs", "input ")):
        old, new = recorded.get(section, {}), wanted.get(section, {})
        for key in sorted(set(old) | set(new), key=lambda k: (k not in new, k)):
            added_at_default = section == "settings" and key not in old and key in defaults \
                and new.get(key) == defaults[key]
            if old.get(key, "<unset>") != new.get(key, "<unset>") and not added_at_default:
                found.append(f"{label}{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}")
    return found


def _holds_outputs(folder: Path) -> bool:
    """Whether ``folder`` holds a step's outputs: not merely the files a claim writes, nor
    the temporary file of one in progress (another torchrun rank may be claiming it now),
    nor the locks."""
    return folder.is_dir() and any(
        p.name not in ("config.yaml", "tb", PROVENANCE_FILE)
        and not p.name.startswith((TEMP_PREFIX, LOCK_FILE)) for p in folder.iterdir())


def stale_reasons(folder: str | os.PathLike, cfg: Mapping, inputs: Mapping,
                  defaults: Mapping) -> list[str]:
    """Why the outputs in ``folder`` were not made by this recipe ([] when they were, or when
    there are none yet: a recipe that wrote nothing binds no rerun); ``defaults`` are the
    step's ``DEFAULTS``. With ``resume=true`` a training step may change ``RESUMABLE_KEYS``."""
    return _reasons(Path(folder), read_recipe(folder), build_recipe(cfg, inputs, defaults), cfg,
                    defaults)


def _reasons(folder: Path, recorded: dict | None, recipe: dict, cfg: Mapping,
             defaults: Mapping, bind_without_outputs: bool = False) -> list[str]:
    """``bind_without_outputs``: a recorded recipe counts even before it wrote an output
    (another process that claimed the folder may be about to write)."""
    if recorded is None:
        return ["it has no provenance.json (made by an older version)"] if _holds_outputs(folder) else []
    if not (bind_without_outputs or _holds_outputs(folder)):
        return []
    default_settings = _as_json(output_settings(merge_defaults(COMMON_DEFAULTS, defaults), defaults))
    found = differences(recorded, recipe, default_settings)
    if cfg.get("resume"):
        found = [d for d in found if d.split(":")[0] not in RESUMABLE_KEYS]
    return found


def stale_message(folder: str | os.PathLike, reasons: list[str]) -> str:
    """One line: which folder, what differs (the first three), and the two ways on."""
    shown = "; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else "")
    return (f"{folder} was made by other settings or inputs: {shown}. Set overwrite=true to "
            f"redo it (and the steps after it), or use another work_dir")


def claim_folder(folder: str | os.PathLike, cfg: Mapping,
                 inputs: Mapping[str, str | os.PathLike], defaults: Mapping) -> None:
    """Call as a step starts, before it writes: lock the folder (``folder_lock``: another run
    in it is refused), stop if it holds outputs of another recipe (unless ``overwrite``),
    else record this recipe and the resolved config. An unchanged recipe leaves both files
    as they are; a changed one (with ``overwrite``, or where the recorded one wrote nothing
    and no other process is in the folder) also forgets that the folder had finished.
    ``defaults``: the step's ``DEFAULTS``."""
    folder = Path(folder)
    with lock_folder(folder, cfg.get("shard")) as alone:
        _claim(folder, cfg, inputs, defaults, bind_without_outputs=not alone)


def _claim(folder: Path, cfg: Mapping, inputs: Mapping, defaults: Mapping,
           bind_without_outputs: bool) -> None:
    recorded, recipe = read_recipe(folder), build_recipe(cfg, inputs, defaults)
    reasons = _reasons(folder, recorded, recipe, cfg, defaults, bind_without_outputs)
    if reasons and not cfg.get("overwrite"):
        raise ConfigError(stale_message(folder, reasons))
    if recorded != recipe:
        for done in [folder / DONE_FILE, *folder.glob("done.*-of-*.json")]:
            done.unlink(missing_ok=True)  # finished, but by the old recipe
        save_config(cfg, folder)
        text = json.dumps(recipe, indent=2, sort_keys=True)
        write_or_stop(folder / PROVENANCE_FILE, lambda tmp: Path(tmp).write_text(text))
