"""The example figure: image | CAM | IR labels | pseudo mask | prediction | ground truth."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .step_io import STEP_DIRS, atomic_write, load_cams, load_png
from .visualize import cam_overlay, colorize_labels, image_grid

SUBMIT_DIR = Path(__file__).resolve().parents[1] / "segmentation" / "submit"
TITLES = ["image", "CAM", "IR labels", "pseudo mask", "prediction", "ground truth"]


def _submission_script():
    """``submit/generate_predictions.py`` as a module. The folder is not a package (its script
    imports ``model`` beside it), so it is put on the path for the import only and its
    flat module names are forgotten after, where they could shadow others."""
    sys.path.insert(0, str(SUBMIT_DIR))
    try:
        spec = importlib.util.spec_from_file_location("submit_generate_predictions",
                                                      SUBMIT_DIR / "generate_predictions.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SUBMIT_DIR))
        sys.modules.pop("model", None)
    return module


class _Step7Predictor:
    """Step 7's prediction of one image (its TTA from ``export_config.yaml``), in process."""

    def __init__(self, weights: Path, export_config: Path):
        self.script = _submission_script()
        self.cfg = self.script.load_config(export_config)
        self.loaded = self.script.load_checkpoint(weights, "cpu")

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        tensor = self.script.image_to_tensor(image, self.loaded.mean, self.loaded.std,
                                             torch.device("cpu"))
        return self.script.predict_mask(self.loaded.model, tensor, self.cfg, amp=False)


def write_examples(source, work_dir, out_path, num_images: int = 4) -> Path | None:
    """A grid for the first training images that went through every step; None if none did."""
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
    return atomic_write(out_path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
