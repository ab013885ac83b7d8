"""Where and how the submission script runs: the device, this process's shard of the images,
and file writes that never leave a truncated output. The training repository uses the same
helpers, so a step and this folder agree on devices, shards and temporary files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

# The permissions a new file gets (mkstemp's are 0600); os.umask is read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


class UsageError(Exception):
    """Bad input to the script as a whole; printed as one `error:` line."""


def resolve_device(name: str) -> torch.device:
    """Under torchrun, auto / cuda mean this process's GPU (cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n): this process handles every n-th image starting at the i-th."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise UsageError(f"--shard must look like i/n, got {text!r}") from error
    if not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return index, count


def process_shard(text: str) -> tuple[int, int]:
    """--shard i/n, split again among torchrun's processes (RANK r of WORLD_SIZE w): shard
    i + n*r of n*w, so the processes together still cover every image exactly once."""
    index, count = parse_shard(text)
    return (index + count * int(os.environ.get("RANK", 0)),
            count * int(os.environ.get("WORLD_SIZE", 1)))


TEMP_PREFIX = ".tmp."  # atomic_write's temporary files: hidden (the repo's done markers sweep them)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call ``write_fn(tmp_path)`` on a temporary file beside ``path`` (same suffix), then
    rename it onto ``path``: a reader never sees a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.stem}.", suffix=path.suffix,
                                         dir=path.parent)
    os.close(handle)
    try:
        write_fn(temp_name)
        os.chmod(temp_name, FILE_MODE)  # mkstemp creates 0600; give the usual permissions
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path
