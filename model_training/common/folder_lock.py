"""One run at a time in a step folder: a second run on a folder that another one is writing is
refused in one line, instead of mixing its outputs in or sweeping the other's temporary files.

A process holds ``.lock`` of the folder (an advisory ``flock``, released by the system when the
process ends, however it ends) from the moment its step claims the folder. An unsharded run
holds it exclusively. The shards of one split (``shard`` i/n, torchrun's ranks) work side by
side: each holds ``.lock`` shared and its own ``.lock.<i>-of-<n>`` exclusively, so only a
second run of the same shard, or an unsharded run, is refused. While it claims the folder a
process learns whether it is *alone* there, which decides whether a recipe that wrote no
output yet may be replaced (``provenance.claim_folder``).
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .config import StepError
from .step_io import resolve_shard

LOCK_FILE = ".lock"
# Seconds a shard waits for another shard that holds the folder alone while it claims it.
SHARED_WAIT_SECONDS = 10.0

_held: dict[Path, list[int]] = {}  # folder -> this process's open, locked descriptors


def _take(descriptor: int, kind: int, wait: float = 0.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(descriptor, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def release(folder: str | os.PathLike) -> None:
    """Let go of this process's locks on ``folder`` (a step that ends in this process)."""
    for descriptor in _held.pop(Path(folder).absolute(), []):
        os.close(descriptor)


@contextmanager
def lock_folder(folder: str | os.PathLike, shard: str | None) -> Iterator[bool]:
    """Lock ``folder`` for this process's share of the step (``shard`` as in the config) and
    yield whether no other process works there; the locks stay held after the block, until
    the process ends or ``release``. Another run in the folder is a StepError."""
    folder = Path(folder).absolute()
    release(folder)  # an earlier step of this process in the folder has ended
    folder.mkdir(parents=True, exist_ok=True)
    index, count = resolve_shard(shard)
    busy = (f"{folder} is being written by another run (it holds {folder / LOCK_FILE}): wait "
            f"for it to end, or use another work_dir")
    whole = _open(folder / LOCK_FILE)
    descriptors = [whole]
    try:
        if count > 1:
            own = _open(folder / f"{LOCK_FILE}.{index}-of-{count}")
            descriptors.append(own)
            if not _take(own, fcntl.LOCK_EX):
                raise StepError(f"shard {index}/{count} of {busy}")
        alone = _take(whole, fcntl.LOCK_EX)
        if not alone and (count == 1 or not _take(whole, fcntl.LOCK_SH, SHARED_WAIT_SECONDS)):
            raise StepError(busy)
        yield alone
        if alone and count > 1 and not _take(whole, fcntl.LOCK_SH, SHARED_WAIT_SECONDS):
            raise StepError(busy)  # let the other shards in
    except BaseException:
        for descriptor in descriptors:
            os.close(descriptor)
        raise
    _held[folder] = descriptors
