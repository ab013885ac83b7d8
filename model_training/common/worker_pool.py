"""A process pool for an image step's per-image work that needs no network (step 3's CRFs,
over ``ir_labels.num_workers`` processes).

A failing image is reported as one line and skipped, as ``step_io.run_over_images`` does;
``on_error="stop"`` ends the run at the first one, and so does a failure of the machine.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable

from . import step_io
from .config import StepError
from .progress import progress

_worker_fn: Callable[[str], object] | None = None


def pool_context() -> multiprocessing.context.BaseContext:
    """Fork on Linux unless this process has a CUDA context (a forked child cannot use or
    safely inherit it); spawn elsewhere (macOS and Windows do not fork safely)."""
    cuda = sys.modules.get("torch.cuda")
    if sys.platform.startswith("linux") and not (cuda is not None and cuda.is_initialized()):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _init_worker(worker_fn: Callable[[str], object]) -> None:
    """Receive the per-image function once per process rather than with every task."""
    global _worker_fn
    _worker_fn = worker_fn


def _run_one(image_id: str) -> tuple[str, bool]:
    """(id, succeeded); the failure is reported here, where the exception is."""
    try:
        _worker_fn(image_id)
    except Exception as error:  # noqa: BLE001 - one bad image must not end the step
        step_io.stop_on_machine_error(image_id, error)
        step_io.report_failure(image_id, error)
        return image_id, False
    return image_id, True


def run_pool(
    ids: Iterable[str],
    worker_fn: Callable[[str], object],
    num_workers: int | None = None,
    desc: str = "images",
    on_error: str = "skip",
) -> tuple[int, list[str]]:
    """Call `worker_fn(id)` for every id in `num_workers` processes; returns (done, failed ids)
    like `step_io.run_over_images`, which runs the in-process case (`num_workers` 0 or 1).

    `worker_fn` must pickle (a module-level function or a functools.partial of one). On
    Linux the workers are forked: they start at once with everything imported (a spawned
    worker imports torch and the calling script again, seconds of a short step's time);
    elsewhere, and once CUDA is initialised, they are spawned (`pool_context`).
    `num_workers` None = CPU count. A failing image is reported as one line
    `warning: <id>: <error>` and skipped; `on_error="stop"` ends the run at the first one,
    and so does a full disk or read-only folder (`step_io.stop_on_machine_error`).
    """
    ids = list(ids)
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    num_workers = min(num_workers, len(ids))
    if num_workers <= 1:
        return step_io.run_over_images(ids, worker_fn, desc, on_error=on_error)

    chunksize = max(1, min(8, len(ids) // (4 * num_workers)))
    done, failed = 0, []
    context = pool_context()
    with context.Pool(num_workers, initializer=_init_worker, initargs=(worker_fn,)) as pool:
        results = pool.imap_unordered(_run_one, ids, chunksize=chunksize)
        for image_id, succeeded in progress(results, desc, total=len(ids), unit="img"):
            if succeeded:
                done += 1
                continue
            failed.append(image_id)
            if on_error == "stop":
                raise StepError(f"{image_id}: failed, see the warning above (on_error=stop)")
    return done, failed

