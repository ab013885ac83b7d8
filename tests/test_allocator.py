"""The allocator tuning every entry point applies: set through mallopt on glibc, and left to
the user where they set glibc's own variables."""
import subprocess
import sys

import pytest

from model_training.common import allocator
from tests.conftest import REPO


def test_a_user_setting_of_glibc_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.tune_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_settings_take_on_glibc():
    code = "from model_training.common.allocator import tune_allocator; print(tune_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "True", out.stderr

