"""``auto`` thresholds: IRNet's constants at VOC's CAM threshold, the derived values from a
measured best threshold, steps 3 and 5 using and recording them, and the config key type."""
from pathlib import Path

import numpy as np
import pytest

from inference.irn_steps import ir_labels_step
from model_training.common import auto_thresholds
from model_training.common.auto_thresholds import from_cam_threshold, resolve_auto
from model_training.common.config import ConfigError, load_config
from model_training.common.datasets.toy import ToySource
from model_training.common.step_io import read_done, save_cams, step_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "toy"
TINY_TOY = ["device=cpu", "num_workers=0", "dataset.toy.num_train=4", "dataset.toy.num_val=2",
            "dataset.toy.num_test=1", "dataset.toy.image_size=[40,56]", "ir_labels.num_workers=1"]


def test_voc_threshold_gives_irnets_constants():
    assert from_cam_threshold("conf_fg_thres", 0.15) == pytest.approx(0.30, abs=1e-4)
    assert from_cam_threshold("conf_bg_thres", 0.15) == pytest.approx(0.05, abs=1e-4)
    assert from_cam_threshold("bg_thres", 0.15) == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.65, 0.9])
def test_confident_foreground_above_and_background_below_the_threshold(threshold):
    fg = from_cam_threshold("conf_fg_thres", threshold)
    bg = from_cam_threshold("conf_bg_thres", threshold)
    assert 0 < bg < threshold < fg < 1
    power = from_cam_threshold("bg_power", threshold)  # the walked background ties at t
    assert (1 - threshold) ** power == pytest.approx(threshold, abs=1e-3)


def test_threshold_outside_zero_one_is_refused():
    with pytest.raises(ValueError):
        from_cam_threshold("conf_fg_thres", 1.0)


def test_auto_is_a_value_only_where_the_key_allows_it():
    cfg = load_config(CONFIGS / "3_ir_labels.yaml", ["ir_labels.conf_fg_thres=auto"], ir_labels_step.DEFAULTS)
    assert cfg.ir_labels.conf_fg_thres == "auto"
    with pytest.raises(ConfigError, match="ir_labels.iterations"):
        load_config(CONFIGS / "3_ir_labels.yaml", ["ir_labels.iterations=auto"], ir_labels_step.DEFAULTS)
    with pytest.raises(ConfigError, match="number or auto"):
        load_config(CONFIGS / "3_ir_labels.yaml", ["ir_labels.conf_bg_thres=autox"], ir_labels_step.DEFAULTS)


def _cams_scoring_best_at(work_dir, source, inside: float, outside: float) -> None:
    """CAM files whose map is ``inside`` on each labelled object and ``outside`` elsewhere,
    so the sweep's best background threshold is the first one at or above ``outside``."""
    for image_id in source.ids:
        mask = source.load_mask(image_id)
        keys = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), np.int64)
        high_res = np.stack([np.where(mask == k, inside, outside) for k in keys]).astype(np.float32) \
            if len(keys) else np.zeros((0, *mask.shape), np.float32)
        save_cams(step_dir(work_dir, 2) / f"{image_id}.npz", keys, high_res[:, ::4, ::4], high_res)


def test_step3_derives_its_thresholds_from_the_cams_and_records_them(tmp_path):
    cfg = load_config(CONFIGS / "3_ir_labels.yaml", [f"work_dir={tmp_path}", *TINY_TOY,
                                               "ir_labels.conf_fg_thres=auto", "ir_labels.conf_bg_thres=auto"],
                      ir_labels_step.DEFAULTS)
    _cams_scoring_best_at(tmp_path, ToySource("train", 4, (40, 56), seed=0), 0.9, 0.5)
    ir_labels_step.run(cfg)
    derived = read_done(step_dir(tmp_path, 3))["auto"]
    assert derived["cam_threshold"] == 0.5 and derived["images"] == 4
    assert derived["ir_labels.conf_fg_thres"] == from_cam_threshold("conf_fg_thres", 0.5)
    assert derived["ir_labels.conf_bg_thres"] == from_cam_threshold("conf_bg_thres", 0.5)
    saved = (step_dir(tmp_path, 3) / "config.yaml").read_text()
    assert f"conf_fg_thres: {derived['ir_labels.conf_fg_thres']}" in saved  # the value used, not "auto"


def test_without_masks_auto_falls_back_to_irnets_constants(tmp_path, monkeypatch):
    class NoMasks:
        has_masks = False

    monkeypatch.setattr(auto_thresholds, "build_source", lambda *_: NoMasks())
    cfg = load_config(CONFIGS / "3_ir_labels.yaml", [f"work_dir={tmp_path}", *TINY_TOY,
                                               "ir_labels.conf_fg_thres=auto"], ir_labels_step.DEFAULTS)
    derived = resolve_auto(cfg, "ir_labels", ("conf_fg_thres", "conf_bg_thres"), "train")
    assert derived["images"] == 0
    assert cfg.ir_labels.conf_fg_thres == pytest.approx(0.30, abs=1e-4)
    assert cfg.ir_labels.conf_bg_thres == 0.25  # not auto in the toy config: left as set
    assert "ir_labels.conf_bg_thres" not in derived and derived["cam_threshold"] == 0.15
