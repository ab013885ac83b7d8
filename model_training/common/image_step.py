"""What every image step (2, 3, 5, 7) does around its per-image work.

``start_image_step`` takes this process's shard of the split, keeps the images whose CAMs
exist (steps 3 and 5), derives the ``auto`` thresholds, claims the output folder
(``provenance``), forgets an earlier done marker and lists the images without an output yet
(resume). The step then runs its images (``step_io.run_over_images`` or a process pool) and
``finish`` records the summary in the done marker.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .auto_thresholds import resolve_auto
from .config import StepError
from .datasets import ImageSource, build_source
from .folder_lock import release
from .provenance import claim_folder
from .step_io import clear_done, ids_with_inputs, mark_done, pending_ids, shard_ids, step_dir
from .steps import STEPS


@dataclass
class ImageStep:
    source: ImageSource
    out_dir: Path
    shard: str
    ids: list[str]  # this shard's images (with CAMs, for a step that reads them)
    todo: list[str]  # those without an output yet; all of them with overwrite
    started: float
    counts: dict = field(default_factory=dict)  # what the summary says besides the run's counts

    def finish(self, written: int, failed: list[str], **extra) -> dict:
        """Record the run in the done marker (this shard's, see ``mark_done``); returns it.
        A run whose every image failed is a StepError: marked done, it would send the next
        step to an empty folder."""
        if failed and written == 0 and len(self.todo) == len(self.ids):
            raise StepError(f"{self.out_dir.name}: all {len(failed)} images failed (the first: "
                            f"{failed[0]}, see the warnings above): the step is not marked done")
        summary = {"written": written, "failed": failed,
                   "skipped_existing": len(self.ids) - len(self.todo), **self.counts, **extra,
                   "seconds": round(time.time() - self.started, 2)}
        mark_done(self.out_dir, summary, self.shard)
        release(self.out_dir)
        return summary


def start_image_step(cfg, step: int, split: str, suffix: str, defaults: Mapping,
                     inputs: Mapping[str, Path], reads_cams: bool = False,
                     auto_keys: tuple[str, ...] = ()) -> ImageStep:
    """Everything before the first image of step ``step`` on ``split``, whose outputs are
    ``<id><suffix>``. ``auto_keys``: the keys of the step's section (the step's word) that
    may be ``auto``, resolved before the folder records the settings."""
    started = time.time()
    source = build_source(cfg.dataset, split)
    out_dir = step_dir(cfg.work_dir, step)
    ids = shard_ids(source.ids, cfg.shard)
    counts: dict = {}
    if reads_cams:
        with_cams = ids_with_inputs(ids, step_dir(cfg.work_dir, 2), ".npz", producer=2)
        counts["without_cams"] = len(ids) - len(with_cams)
        ids = with_cams
    if auto_keys:
        derived = resolve_auto(cfg, STEPS[step - 1].word, auto_keys, split)
        if derived:
            counts["auto"] = derived
    claim_folder(out_dir, cfg, inputs, defaults)
    clear_done(out_dir, cfg.shard)
    todo = pending_ids(ids, out_dir, suffix, cfg.overwrite)
    return ImageStep(source, out_dir, cfg.shard, ids, todo, started, counts)


def summary_line(folder: str, summary: dict) -> str:
    return (f"{folder}: {summary['written']} written, {len(summary['failed'])} failed, "
            f"{summary['skipped_existing']} already there ({summary['seconds']} s)")
