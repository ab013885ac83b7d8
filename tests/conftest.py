"""Shared fixtures: paths to the repo, the shared real-photo dataset, a tmp work dir."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid-wsss"


@pytest.fixture
def camvid_root() -> Path:
    if not (CAMVID / "JPEGImages").is_dir():
        pytest.skip(f"camvid-wsss not present at {CAMVID}")
    return CAMVID
