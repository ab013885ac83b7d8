"""The example figure: image | CAM | IR labels | pseudo mask | prediction | ground truth."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inference.segmentation.submit import generate_predictions as submit
from model_training.common.step_io import STEP_DIRS, load_cams, load_png, write_or_stop

from .visualize import cam_overlay, colorize_labels, image_grid, legend_strip

TITLES = ["image", "CAM", "IR labels", "pseudo mask", "prediction", "ground truth"]


class _Step7Predictor:
    """Step 7's prediction of one image (its TTA from ``export_config.yaml``), in process."""

    def __init__(self, weights: Path, export_config: Path):
        self.cfg = submit.load_config(export_config)
        self.loaded = submit.load_checkpoint(weights, "cpu")

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        tensor = submit.image_to_tensor(image, self.loaded.mean, self.loaded.std, torch.device("cpu"))
        return submit.predict_mask(self.loaded.model, tensor, self.cfg, amp=False)


def write_examples(source, work_dir, out_path, num_images: int = 4) -> Path | None:
    """A grid for the first training images that went through every step, with a legend of
    the class colours under it; None if no image went through every step."""
    work_dir = Path(work_dir)
    folders = {step: work_dir / STEP_DIRS[step] for step in (2, 3, 5)}
    ids = [i for i in source.ids
           if (folders[2] / f"{i}.npz").is_file() and (folders[3] / f"{i}.png").is_file()
           and (folders[5] / f"{i}.png").is_file()][:num_images]
    weights = work_dir / STEP_DIRS[6] / "model.pt"
    export_config = work_dir / STEP_DIRS[6] / "export_config.yaml"
    if not ids or not weights.is_file() or not export_config.is_file():
        return None
    predict = _Step7Predictor(weights, export_config)
    rows = []
    for image_id in ids:
        image = source.load_image(image_id)
        gt = source.load_mask(image_id)
        rows.append([
            image,
            cam_overlay(image, load_cams(folders[2] / f"{image_id}.npz")["high_res"]),
            colorize_labels(load_png(folders[3] / f"{image_id}.png")),
            colorize_labels(load_png(folders[5] / f"{image_id}.png")),
            colorize_labels(predict(image)),
            colorize_labels(gt) if gt is not None else np.zeros_like(image),
        ])
    grid = image_grid(rows, TITLES)
    grid = np.concatenate([grid, legend_strip(source.class_names, grid.shape[1])])
    return write_or_stop(out_path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
