"""Step 3 as a function: every image's CAMs -> IRNet label PNG, in a process pool."""
from __future__ import annotations

import functools
from pathlib import Path

from model_training.common.auto_thresholds import IRNET_VALUES
from model_training.common.config import (AT_LEAST_1, FRACTION, NON_NEGATIVE, OPEN_FRACTION,
                                          POSITIVE, AutoFloat, Schema)
from model_training.common.crf import IRNET_PARAMS
from model_training.common.image_step import start_image_step
from model_training.common.image_step import summary_line as image_summary_line
from model_training.common.step_io import STEP_DIRS, step_dir

from model_training.common.worker_pool import run_pool

from .ir_labels import process_image

SHARDABLE = True

DEFAULTS = Schema({
    "ir_labels": {
        "split": "train",
        # CAM scores above which a pixel is confident foreground / still background; auto:
        # from the CAMs' best background threshold (model_training/common/auto_thresholds.py)
        "conf_fg_thres": AutoFloat(IRNET_VALUES["conf_fg_thres"]),
        "conf_bg_thres": AutoFloat(IRNET_VALUES["conf_bg_thres"]),
        "iterations": IRNET_PARAMS["t"],
        "gt_prob": IRNET_PARAMS["gt_prob"],
        "gaussian_sxy": IRNET_PARAMS["gaussian"][0],
        "gaussian_compat": IRNET_PARAMS["gaussian"][1],
        "bilateral_sxy": IRNET_PARAMS["bilateral"][0],
        "bilateral_srgb": IRNET_PARAMS["bilateral"][1],
        "bilateral_compat": IRNET_PARAMS["bilateral"][2],
        "num_workers": None,  # None: one process per CPU core
    },
}, ranges={
    "ir_labels.conf_*_thres": FRACTION,
    "ir_labels.iterations": AT_LEAST_1,
    "ir_labels.gt_prob": OPEN_FRACTION,  # the CRF takes log(p) and log(1 - p)
    "ir_labels.*_sxy": POSITIVE,
    "ir_labels.bilateral_srgb": POSITIVE,
    "ir_labels.*_compat": NON_NEGATIVE,
    "ir_labels.num_workers": NON_NEGATIVE,
}, run_only={"ir_labels.num_workers"}, types={"ir_labels.num_workers": int})


def crf_params(crf_cfg) -> dict:
    """The config section as keyword arguments of ``crf_inference``."""
    return {
        "t": crf_cfg.iterations,
        "gt_prob": crf_cfg.gt_prob,
        "gaussian": (crf_cfg.gaussian_sxy, crf_cfg.gaussian_compat),
        "bilateral": (crf_cfg.bilateral_sxy, crf_cfg.bilateral_srgb, crf_cfg.bilateral_compat),
    }


def step_inputs(cfg) -> dict[str, Path]:
    """What this step reads (``provenance``): step 2's CAMs."""
    return {"cams": Path(cfg.work_dir) / STEP_DIRS[2]}


def run(cfg) -> dict:
    """Write ``3_ir_labels/<id>.png`` for every image with CAMs (resuming); returns a summary."""
    step = start_image_step(cfg, 3, cfg.ir_labels.split, ".png", DEFAULTS, step_inputs(cfg),
                            reads_cams=True, auto_keys=("conf_fg_thres", "conf_bg_thres"))
    worker = functools.partial(
        process_image, load_image=step.source.load_image, cam_dir=step_dir(cfg.work_dir, 2),
        out_dir=step.out_dir, conf_fg_thres=cfg.ir_labels.conf_fg_thres,
        conf_bg_thres=cfg.ir_labels.conf_bg_thres, crf_params=crf_params(cfg.ir_labels))
    done, failed = run_pool(step.todo, worker, cfg.ir_labels.num_workers, desc=STEP_DIRS[3],
                            on_error=cfg.on_error)
    return step.finish(done, failed)


def summary_line(summary: dict) -> str:
    return image_summary_line(STEP_DIRS[3], summary)
