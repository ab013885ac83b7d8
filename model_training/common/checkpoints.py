"""Reading the ``.pt`` files the steps write, always with ``weights_only=True``.

A file torch cannot read (random bytes, cut short by a full disk, another tool's pickle)
stops the step with one line that names it and says which step writes it again. Torch's own
message would suggest ``weights_only=False``, which runs whatever code the file holds: never
the right advice for a file whose origin is in doubt.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from model_training.common.config import StepError


def read_checkpoint(path: str | os.PathLike, remedy: str, map_location="cpu",
                    keys: Iterable[str] = ()) -> dict:
    """The dict saved in ``path``; a missing or unreadable file, or one without all of
    ``keys``, is a StepError naming the file and ending in ``remedy`` (e.g. "re-run step 1
    with overwrite=true")."""
    path = Path(path)
    if not path.is_file():
        raise StepError(f"checkpoint not found: {path}: {remedy}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many types for a bad file, all mean the same
        checkpoint = None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in keys):
        raise StepError(f"{path}: not a checkpoint this toolkit wrote, or truncated: {remedy}")
    return checkpoint
