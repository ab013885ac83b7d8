"""Step 5 as a function: IRNet boundaries + random walk turn each image's CAMs into a mask.

For every image: boundary map at stride 4 (flip TTA), the stride-4 CAMs spread by the
sparse random walk inside the boundaries, background where no walked map reaches
``bg_thres`` (IRNet) or where a walked background map wins (``background: walk``),
optionally a CRF, and the uint8 mask of class ids at the image's size; with
``unsure_margin`` the walk's close calls are 255, which step 6 does not train on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model_training.common.auto_thresholds import IRNET_VALUES
from model_training.common.config import (AT_LEAST_1, FRACTION, OPEN_FRACTION, POSITIVE,
                                          AutoFloat, ConfigError, Range, Schema, resolve_device)
from model_training.common.crf import IRNET_PARAMS, crf_inference
from model_training.common.image_step import start_image_step
from model_training.common.image_step import summary_line as image_summary_line
from model_training.common.metrics import IGNORE_INDEX
from model_training.common.models.irnet import load_irnet, predict_boundary
from model_training.common.step_io import (STEP_DIRS, atomic_write, load_cams, run_over_images,
                                           save_png, step_dir)
from model_training.common.transforms import network_input

from .random_walk import background_seed, random_walk, rw_scores, unsure_pixels

SHARDABLE = True

DEFAULTS = Schema({
    "pseudo_masks": {
        "split": "train",
        "checkpoint": None,  # None: <work_dir>/4_irn/best.pt
        "radius": 5,  # path-index radius of the walk
        "beta": 10.0,
        "exp_times": 8,  # T^(2^exp_times)
        # threshold: IRNet's constant background score bg_thres against the walked CAMs
        # divided by their global max. walk: AffinityNet's background (1 - max CAM)^bg_power
        # is walked with the classes, each map divided by its own max, argmax.
        # auto: both from the CAMs' best background threshold (auto_thresholds.py)
        "background": "threshold",
        "bg_thres": AutoFloat(IRNET_VALUES["bg_thres"]),  # sem_seg_bg_thres
        "bg_power": AutoFloat(1.0),
        "flip": True,  # boundary-map test-time flip
        "input_long_side": None,  # upscale small images before IRNet (finer boundaries)
        "crf": False,  # refine the final masks with a dense CRF (the default kernels)
        "crf_iterations": IRNET_PARAMS["t"],
        "crf_gt_prob": IRNET_PARAMS["gt_prob"],
        # > 0: pixels whose best walked score leads the second by less than this are 255
        # (unsure: step 6 does not train on them); 0 labels every pixel, as IRNet
        "unsure_margin": 0.0,
        # also write <id>.npz: keys (0 = the walked background, first, with background: walk)
        # and rw float16 (maps, h, w), the walked maps on the walk's grid, before the argmax
        "save_rw": False,
    },
}, ranges={
    "pseudo_masks.radius": Range(2),  # the path index links pixels at distance >= 1
    "pseudo_masks.beta": POSITIVE,
    "pseudo_masks.exp_times": Range(0, 12),  # 2^exp_times sparse steps: 12 is 16x IRNet's 8
    "pseudo_masks.bg_thres": FRACTION,
    "pseudo_masks.bg_power": POSITIVE,
    "pseudo_masks.input_long_side": AT_LEAST_1,
    "pseudo_masks.crf_iterations": AT_LEAST_1,
    "pseudo_masks.crf_gt_prob": OPEN_FRACTION,  # the CRF takes log(p) and log(1 - p)
    "pseudo_masks.unsure_margin": FRACTION,
}, types={"pseudo_masks.checkpoint": str, "pseudo_masks.input_long_side": int})


def _resize_maps(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


class PseudoMaskMaker:
    """Holds the IRNet model; ``__call__`` makes one image's mask."""

    def __init__(self, checkpoint, device: torch.device, cfg):
        self.model = load_irnet(checkpoint, device)
        self.device = device
        self.cfg = cfg

    def __call__(self, image: np.ndarray, cams: dict) -> tuple[np.ndarray, dict]:
        """(uint8 mask at the image's size, {"keys", "rw"}: the walked maps and their classes)."""
        cfg = self.cfg
        height, width = image.shape[:2]
        if len(cams["keys"]) == 0:  # no class in the image: nothing to walk
            return np.zeros((height, width), np.uint8), {"keys": cams["keys"], "rw": cams["cam"]}
        tensor = network_input(image, cfg.input_long_side)
        boundary = predict_boundary(self.model, tensor.to(self.device), cfg.flip)
        keys = cams["keys"]
        on_image_grid = tensor.shape[1:] == (height, width)
        if on_image_grid:
            seeds = torch.from_numpy(cams["cam"])
        else:  # the CAMs on the boundary map's finer grid, each class's max kept at 1
            seeds = _resize_maps(torch.from_numpy(cams["high_res"]), boundary.shape)
            seeds = seeds / seeds.amax((1, 2), keepdim=True).clamp_min(1e-5)
        walk_background = cfg.background == "walk"
        if walk_background:
            seeds = torch.cat([background_seed(seeds, cfg.bg_power), seeds])
        walked = random_walk(seeds, boundary, cfg.beta, cfg.exp_times, cfg.radius).cpu()
        # a rescaled image's walk is resized straight to the image, not through stride 4
        scores, class_of_channel = rw_scores(walked, keys, cfg.bg_thres, out_size=(height, width),
                                             stride=4 if on_image_grid else None,
                                             walked_background=walk_background)
        channels = scores.argmax(dim=0).numpy()  # the CRF's labels: channel indices
        if cfg.crf and len(keys):
            channels = crf_inference(image, channels, len(class_of_channel), **{
                **IRNET_PARAMS, "t": cfg.crf_iterations, "gt_prob": cfg.crf_gt_prob})
        mask = class_of_channel[channels]
        mask[unsure_pixels(scores, cfg.unsure_margin)] = IGNORE_INDEX
        rw_keys = np.concatenate([[0], keys]) if walk_background else keys
        return mask, {"keys": rw_keys.astype(np.int64), "rw": walked.numpy()}


def step_inputs(cfg) -> dict[str, Path]:
    """What this step reads (``provenance``): step 2's CAMs and IRNet (step 4's folder, or
    the checkpoint file named)."""
    return {"cams": Path(cfg.work_dir) / STEP_DIRS[2],
            "irn": Path(cfg.pseudo_masks.checkpoint) if cfg.pseudo_masks.checkpoint
            else Path(cfg.work_dir) / STEP_DIRS[4]}


def run(cfg) -> dict:
    """Write ``5_pseudo_masks/<id>.png`` for every image with CAMs (resuming)."""
    if cfg.pseudo_masks.background not in ("threshold", "walk"):
        raise ConfigError(f"key 'pseudo_masks.background' must be threshold or walk, "
                          f"got {cfg.pseudo_masks.background!r}")
    checkpoint = Path(cfg.pseudo_masks.checkpoint or step_dir(cfg.work_dir, 4) / "best.pt")
    if not checkpoint.is_file():
        raise ConfigError(f"key 'pseudo_masks.checkpoint': IRNet checkpoint not found: {checkpoint}")
    device = resolve_device(cfg.device)
    step = start_image_step(cfg, 5, cfg.pseudo_masks.split, ".png", DEFAULTS, step_inputs(cfg),
                            reads_cams=True, auto_keys=("bg_thres", "bg_power"))
    maker = PseudoMaskMaker(checkpoint, device, cfg.pseudo_masks)
    cam_dir, out_dir = step_dir(cfg.work_dir, 2), step.out_dir

    def make(image_id: str) -> None:
        mask, walked = maker(step.source.load_image(image_id),
                             load_cams(cam_dir / f"{image_id}.npz"))
        if cfg.pseudo_masks.save_rw:  # before the mask: a mask on disk means the image is done
            atomic_write(out_dir / f"{image_id}.npz", lambda tmp: np.savez_compressed(
                tmp, keys=walked["keys"], rw=walked["rw"].astype(np.float16)))
        save_png(out_dir / f"{image_id}.png", mask)

    with torch.no_grad():
        written, failed = run_over_images(step.todo, make, STEP_DIRS[5], cfg.on_error)
    return step.finish(written, failed)


def summary_line(summary: dict) -> str:
    return image_summary_line(STEP_DIRS[5], summary)
