"""benchmarks/bench_steps.py on a miniature toy: the step's own parts against the floor."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO

TOY = {"name": "toy", "toy": {"num_train": 16, "num_val": 8, "num_test": 4, "image_size": [48, 64]}}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_steps", REPO / "benchmarks" / "bench_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_step_1_is_timed_through_its_loader_and_on_a_kept_batch(tmp_path):
    bench = _bench()
    result = bench.measure(REPO / "configs" / "toy", 1, iterations=2, warmup=1, overrides=[
        f"work_dir={tmp_path}", "device=cpu", "num_workers=1", f"dataset={json.dumps(TOY)}",
        "model.weights=none", "data.resize_long=[64,64]", "train.batch_size=4"])
    assert result["step"] == "1_classifier"
    assert result["batches_per_epoch"] == 4  # 16 images, batches of 4, the last one full
    for kind in ("real", "floor"):
        timing = result[kind]
        assert timing["s_per_iter"] > 0 and timing["cpu_s_per_iter"] > 0
        assert 0 <= timing["system_share"] <= 1 and timing["faults_per_iter"] >= 0
    assert result["ratio"] == pytest.approx(result["real"]["s_per_iter"]
                                            / result["floor"]["s_per_iter"], rel=1e-2)
    assert result["validation_s"] > 0


def test_a_step_without_its_inputs_is_a_step_error(tmp_path):
    from model_training.common.config import StepError

    with pytest.raises(StepError, match="3_ir_labels"):
        _bench().measure(REPO / "configs" / "toy", 4, iterations=1, warmup=0,
                         overrides=[f"work_dir={tmp_path}", "device=cpu"])


def test_cpu_counters_count_this_process():
    bench = _bench()
    _, _, faults0 = bench.cpu_counters()
    buffers = [bytearray(b"x" * (1 << 20)) for _ in range(64)]  # writes 64 MiB: page faults
    _, _, faults1 = bench.cpu_counters()
    del buffers
    assert faults1 - faults0 >= 1000  # 64 MiB is 16,384 pages; the allocator may reuse some
