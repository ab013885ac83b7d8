"""The on-disk contract between steps (docs/design.md): folders, npz/png files, resume.

Every file is written to a temporary name in its folder and renamed into place, so a killed
step never leaves a truncated output and a re-run can trust whatever exists.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from inference.segmentation.submit.runtime import TEMP_PREFIX, atomic_write, process_shard
from model_training.common.config import Config, ConfigError, StepError
from model_training.common.progress import progress
from model_training.common.steps import STEP_DIRS


def classifier_dir(work_dir: str | os.PathLike, variant: str = "") -> Path:
    """``<work_dir>/1_classifier``, or ``1_classifier_<variant>`` for an extra classifier
    (e.g. the binary person model of "no people allowed")."""
    return Path(work_dir) / (STEP_DIRS[1] + (f"_{variant}" if variant else ""))


def step_dir(work_dir: str | os.PathLike, step: int) -> Path:
    """``<work_dir>/<n>_<name>``, created if needed."""
    path = Path(work_dir) / STEP_DIRS[step]
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_config(cfg: Mapping, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config beside a step's outputs, so every result says how it was made."""
    plain = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    return write_or_stop(Path(out_dir) / "config.yaml",
                        lambda tmp: Path(tmp).write_text(yaml.safe_dump(plain, sort_keys=False)))


def save_cams(path, class_ids, cam: np.ndarray, high_res: np.ndarray) -> Path:
    """One image's CAMs: ``keys`` int (K,), ``cam`` (K,h,w) stride 4, ``high_res`` (K,H,W), fp16."""
    keys = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if cam.shape[0] != keys.size or high_res.shape[0] != keys.size:
        raise ValueError(f"{path}: {keys.size} keys but cams of shape {cam.shape}, {high_res.shape}")
    return atomic_write(path, lambda tmp: np.savez_compressed(
        tmp, keys=keys, cam=cam.astype(np.float16), high_res=high_res.astype(np.float16)))


def load_cams(path) -> dict[str, np.ndarray]:
    """``keys`` int64 plus ``cam`` and ``high_res`` as float32."""
    with np.load(path, allow_pickle=False) as data:
        return {
            "keys": data["keys"].astype(np.int64),
            "cam": data["cam"].astype(np.float32),
            "high_res": data["high_res"].astype(np.float32),
        }


def save_png(path, array: np.ndarray) -> Path:
    """A uint8 label map as a grey PNG."""
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: label maps are uint8, got {array.dtype}")
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def load_png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def pending_ids(ids: Iterable[str], out_dir, suffix: str, overwrite: bool = False) -> list[str]:
    """The ids still to do: all with ``overwrite``, else those without ``<id><suffix>`` (resume)."""
    ids = list(ids)
    if overwrite:
        return ids
    done = {p.name for p in Path(out_dir).glob(f"*{suffix}")} if Path(out_dir).is_dir() else set()
    return [i for i in ids if f"{i}{suffix}" not in done]


def ids_with_inputs(ids: Iterable[str], folder: Path, suffix: str, producer: int) -> list[str]:
    """The ids that have ``<id><suffix>`` in ``folder`` (an earlier step's output); none at all
    is a one-line error, since a step run before its producer would otherwise finish empty.
    Some missing (images the earlier step could not read) are reported and left out."""
    ids = list(ids)
    present = {p.name for p in Path(folder).glob(f"*{suffix}")}
    found = [i for i in ids if f"{i}{suffix}" in present]
    if ids and not found:
        raise ConfigError(f"no {suffix} file for any of the {len(ids)} images in {folder}: "
                          f"run step {producer} first")
    if len(found) < len(ids):
        print(f"warning: {len(ids) - len(found)} images have no {suffix} file in {folder} "
              f"and are left out", file=sys.stderr)
    return found


def resolve_shard(shard: str | None) -> tuple[int, int]:
    """(index, count) of this process's share of a step: the config's ``shard`` "i/n" (empty:
    all), split again among torchrun's ranks as the submission script splits its --shard
    (rank r of w takes shard i + n*r of n*w), so launching ``--shard i/n`` under torchrun on
    each of several machines still covers every image once."""
    return process_shard(shard or "0/1")


def shard_ids(ids: Iterable[str], shard: str | None) -> list[str]:
    """This process's ids: every count-th one from the index-th (``resolve_shard``); the
    shards of one split are disjoint and together hold every id."""
    index, count = resolve_shard(shard)
    return list(ids)[index::count]


def first_line(error: BaseException) -> str:
    """An error's message cut to one line (its type where it has none); a KeyError's without
    the quotes its ``str`` adds."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def stopped_at(image_id: str, error: BaseException) -> StepError:
    """The one-line error that ends a step at its first bad image (``on_error=stop``)."""
    return StepError(f"{image_id}: {first_line(error)} (on_error=stop)")


def report_failure(image_id: str, error: BaseException) -> None:
    """One line per bad image, so a long run's log stays readable."""
    message = first_line(error)
    tqdm.write(f"warning: {image_id}: {message}", file=sys.stderr)


# What the machine, not the image, answers: a full disk or quota, a read-only or forbidden
# folder, a failing device. Every later image would fail the same way.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.EIO})


def stop_on_machine_error(image_id: str, error: BaseException) -> None:
    """Raise StepError (exit 2, no done.json) for an OSError of the machine: skipping it as
    a bad image would finish the step with its outputs missing and mark it done."""
    if isinstance(error, OSError) and error.errno in MACHINE_ERRNOS:
        raise StepError(f"{image_id}: {error} ({errno.errorcode[error.errno]}): "
                        f"stopped, the step is not marked done") from error


def write_or_stop(path: str | os.PathLike, write_fn: Callable[[str], None]) -> Path:
    """``atomic_write`` for what a step writes outside its image loop (checkpoints, logs,
    records, markers, the report): a full or unwritable disk (``torch.save`` says so with a
    RuntimeError) is one line, and no partial file is left. The image loops keep the
    OSError, which ``run_over_images`` tells from a bad image."""
    try:
        return atomic_write(path, write_fn)
    except (OSError, RuntimeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
        raise StepError(f"cannot write {path}: {reason}: stopped") from None


def run_over_images(items: Iterable, fn: Callable[..., object], desc: str,
                    on_error: str = "skip") -> tuple[int, list[str]]:
    """Call ``fn(item)`` for each item under a progress bar; a failing image is reported and
    skipped (``on_error="stop"`` ends the step there, ``stopped_at``), a failing machine stops the
    step (``stop_on_machine_error``). An item is an image id, or a sequence that starts
    with one (a DataLoader's ``(id, image, ...)``). Returns (number done, failed ids)."""
    done, failed = 0, []
    items = items if hasattr(items, "__len__") else list(items)
    for item in progress(items, desc, unit="img"):
        image_id = item if isinstance(item, str) else item[0]
        try:
            fn(item)
            done += 1
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - one bad image must not end the step
            stop_on_machine_error(image_id, err)
            report_failure(image_id, err)
            failed.append(image_id)
            if on_error == "stop":
                raise stopped_at(image_id, err) from None
    return done, failed


DONE_FILE = "done.json"


def _shard_done_file(index: int, count: int) -> str:
    return f"done.{index}-of-{count}.json"


def _write_json(path: Path, data: dict) -> Path:
    return write_or_stop(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def mark_done(folder, summary: dict, shard: str | None = None) -> Path:
    """Record that a step finished (with its summary), so a pipeline re-run can skip it.

    ``shard``: an inference step's ``shard`` setting ("" included: torchrun ranks split the
    work too); None for a step that never shards. A shard of a split step writes only
    ``done.<i>-of-<n>.json``: the step is done (``done.json``, the shards' summaries merged)
    once all n shards have finished, whichever finishes last.
    """
    folder = Path(folder)
    index, count = resolve_shard(shard) if shard is not None else (0, 1)
    if count == 1:
        remove_temp_files(folder)
        return _write_json(folder / DONE_FILE, summary)
    own = _write_json(folder / _shard_done_file(index, count), summary)
    parts = [folder / _shard_done_file(i, count) for i in range(count)]
    if all(part.is_file() for part in parts):
        remove_temp_files(folder)
        _write_json(folder / DONE_FILE, _merge_summaries(
            [json.loads(part.read_text()) for part in parts]))
    return own


def remove_temp_files(folder) -> list[Path]:
    """Delete the temporary files that killed runs left in ``folder`` (and below): called once
    the step has finished, when nothing is writing there any more."""
    leftovers = [p for p in Path(folder).rglob("*")
                 if p.is_file() and p.name.startswith(TEMP_PREFIX)]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _merge_summaries(parts: list[dict]) -> dict:
    """One step summary from its shards': counts added, lists joined, the slowest shard's
    seconds (they ran side by side), anything else from shard 0."""
    merged: dict = {"shards": len(parts)}
    for key in parts[0]:
        values = [part[key] for part in parts if key in part]
        if key == "seconds":
            merged[key] = max(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values)
        elif all(isinstance(v, list) for v in values):
            merged[key] = [item for value in values for item in value]
        else:
            merged[key] = values[0]
    return merged


def clear_done(folder, shard: str | None = None) -> None:
    """Forget that a step (and this process's shard of it, see ``mark_done``) finished:
    called as it starts again, so a run killed half-way is not mistaken for a finished one."""
    (Path(folder) / DONE_FILE).unlink(missing_ok=True)
    index, count = resolve_shard(shard) if shard is not None else (0, 1)
    if count > 1:
        (Path(folder) / _shard_done_file(index, count)).unlink(missing_ok=True)


def read_done(folder) -> dict | None:
    """The summary of a finished step, or None if it has not finished."""
    path = Path(folder) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
