"""Progress of a loop over images or batches: tqdm's bar on a terminal, plain lines in a log.

Redirected to a file, tqdm's carriage-return redraws pile up into a few lines of hundreds of
bytes that neither ``tail`` nor an editor shows well. When stderr is not a terminal, a loop
prints one line each time another tenth of it is done instead; a loop inside an epoch
(``leave=False``) prints nothing there, as the trainer already writes one line per epoch.
Warnings keep going through ``tqdm.write``, which works in both cases.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm

LINES_PER_LOOP = 10


def progress(items: Iterable, desc: str, total: int | None = None, unit: str = "it",
             leave: bool = True, disable: bool = False):
    """``tqdm(items, ...)`` on a terminal, ``ProgressLines`` otherwise; both iterate over
    ``items`` and take ``set_postfix``."""
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, total=total, unit=unit, leave=leave, disable=disable,
                    dynamic_ncols=True)
    return ProgressLines(items, desc, total, unit, quiet=disable or not leave)


class ProgressLines:
    """A loop's progress as plain stderr lines, ``2_cams: 40/400 img (10%), 3s``; a loop of
    unknown length gets one line at its end."""

    def __init__(self, items: Iterable, desc: str, total: int | None = None, unit: str = "it",
                 quiet: bool = False):
        self.items = items
        self.desc = desc
        self.total = len(items) if total is None and hasattr(items, "__len__") else total
        self.unit = unit
        self.quiet = quiet
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {key}={value}" for key, value in values.items())

    def __iter__(self) -> Iterator:
        if self.quiet:
            yield from self.items
            return
        started, shown, count = time.monotonic(), 0, 0
        for count, item in enumerate(self.items, 1):
            yield item  # the line after the item's work, so it counts finished items
            if self.total and count * LINES_PER_LOOP // self.total > shown:
                shown = count * LINES_PER_LOOP // self.total
                self._print(count, started)
        if self.total is None:
            self._print(count, started)

    def _print(self, count: int, started: float) -> None:
        done = f"{count} {self.unit}"
        if self.total:
            done = f"{count}/{self.total} {self.unit} ({100 * count // self.total}%)"
        print(f"{self.desc}: {done}, {time.monotonic() - started:.0f}s{self.postfix}",
              file=sys.stderr, flush=True)
