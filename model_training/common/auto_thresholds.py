"""``auto`` thresholds for steps 3 and 5, derived from the CAMs' best background threshold.

IRNet's constants (CRF confidence 0.30 / 0.05, walk background 0.25) fit VOC's CAMs, whose
best background threshold is 0.15 (IRNet's ``cam_eval_thres``). CAMs of another dataset or
classifier live on another scale (0.60-0.65 on the toy and camvid sets), and there the
constants label most of an image foreground. ``auto`` measures the best threshold t on the
CAM split's images that have masks (any 300 of them, spread over the split) and moves each
constant with it, so that VOC's t = 0.15 gives IRNet's constant back: a constant below 0.15
stays the same fraction of t (confident background: t / 3), one above it the same share of
the way from t to 1 (confident foreground: t + 0.18 (1 - t)). With no masks, t is taken as
VOC's 0.15, i.e. IRNet's constants.
The walked background (``background: walk``) gets the power at which ``(1 - cam) ** p``
ties a class map exactly at t, so before the walk the argmax is the best-threshold CAM mask.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from model_training.common.config import AUTO
from model_training.common.datasets import build_source

from .evaluation import evaluate_cam_folder
from .step_io import STEP_DIRS

IRNET_CAM_THRESHOLD = 0.15  # IRNet's cam_eval_thres: its CAMs' best background threshold on VOC
# IRNet's constants, which the rule of each key reproduces at t = 0.15.
IRNET_VALUES = {"conf_fg_thres": 0.30, "conf_bg_thres": 0.05, "bg_thres": 0.25}
MAX_IMAGES = 300  # scoring more images moves t by less than the sweep's 0.05 step


def from_cam_threshold(key: str, threshold: float) -> float:
    """The value of ``key`` (conf_fg_thres, conf_bg_thres, bg_thres, bg_power) for CAMs whose
    best background threshold is ``threshold``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a CAM threshold must lie in (0, 1), got {threshold}")
    if key == "bg_power":  # (1 - t) ** p = t
        return round(math.log(threshold) / math.log(1.0 - threshold), 4)
    value, voc = IRNET_VALUES[key], IRNET_CAM_THRESHOLD
    if value < voc:
        return round(threshold * value / voc, 4)
    return round(threshold + (1.0 - threshold) * (value - voc) / (1.0 - voc), 4)


def best_cam_threshold(cfg, split: str) -> tuple[float, int]:
    """(best background threshold of ``2_cams`` on ``split``'s images with masks, images
    scored); (IRNet's 0.15, 0) when the split has no masks."""
    source = build_source(cfg.dataset, split)
    if not source.has_masks:
        return IRNET_CAM_THRESHOLD, 0
    ids = list(source.ids)
    ids = ids[:: math.ceil(len(ids) / MAX_IMAGES)] if len(ids) > MAX_IMAGES else ids
    result = evaluate_cam_folder(Path(cfg.work_dir) / STEP_DIRS[2], source.load_mask,
                                 source.num_classes, ids, allow_missing=True)
    if not result["images"]:
        return IRNET_CAM_THRESHOLD, 0
    return result["threshold"], result["images"]


def resolve_auto(cfg, section: str, keys: tuple[str, ...], split: str) -> dict | None:
    """Replace the ``auto`` values among ``cfg.<section>.<keys>`` in place; returns what was
    derived (for the step's done.json and the report), or None when no key is auto."""
    settings = cfg[section]
    wanted = [key for key in keys if settings[key] == AUTO]
    if not wanted:
        return None
    threshold, images = best_cam_threshold(cfg, split)
    derived = {key: from_cam_threshold(key, threshold) for key in wanted}
    for key, value in derived.items():
        settings[key] = value
    where = (f"best CAM background threshold {threshold:.2f} on {images} '{split}' images with "
             f"masks" if images else f"no '{split}' masks: IRNet's CAM threshold {threshold}")
    values = ", ".join(f"{section}.{k}={v:g}" for k, v in derived.items())
    print(f"auto: {values} ({where})", file=sys.stderr)
    return {"cam_threshold": threshold, "images": images,
            **{f"{section}.{k}": v for k, v in derived.items()}}
