"""Step 3 as a function: every image's CAMs -> IRNet label PNG, in a process pool."""
from __future__ import annotations

import functools
import time
from pathlib import Path

from model_training.common.auto_thresholds import IRNET_VALUES, resolve_auto
from model_training.common.config import AutoFloat
from model_training.common.crf import IRNET_PARAMS
from model_training.common.datasets import build_source
from model_training.common.provenance import claim_folder
from model_training.common.step_io import (STEP_DIRS, clear_done, finish_image_step,
                                           ids_with_inputs, image_summary_line, pending_ids,
                                           shard_ids, step_dir)

from .ir_labels import process_image, run_pool

SHARDABLE = True

DEFAULTS = {
    "crf": {
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
}


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
    start = time.time()
    source = build_source(cfg.dataset, cfg.crf.split)
    cam_dir, out_dir = step_dir(cfg.work_dir, 2), step_dir(cfg.work_dir, 3)
    ids = shard_ids(source.ids, cfg.shard)
    with_cams = ids_with_inputs(ids, cam_dir, ".npz", producer=2)
    derived = resolve_auto(cfg, "crf", ("conf_fg_thres", "conf_bg_thres"), cfg.crf.split)
    claim_folder(out_dir, cfg, step_inputs(cfg), DEFAULTS)
    clear_done(out_dir, cfg.shard)
    todo = pending_ids(with_cams, out_dir, ".png", cfg.overwrite)
    worker = functools.partial(
        process_image, load_image=source.load_image, cam_dir=cam_dir, out_dir=out_dir,
        conf_fg_thres=cfg.crf.conf_fg_thres, conf_bg_thres=cfg.crf.conf_bg_thres,
        crf_params=crf_params(cfg.crf))
    done, failed = run_pool(todo, worker, cfg.crf.num_workers, desc="3 ir labels",
                            on_error=cfg.on_error)
    return finish_image_step(out_dir, cfg.shard, start, done, failed, len(with_cams) - len(todo),
                             without_cams=len(ids) - len(with_cams),
                             **({"auto": derived} if derived else {}))


def summary_line(summary: dict) -> str:
    return image_summary_line(STEP_DIRS[3], summary)
