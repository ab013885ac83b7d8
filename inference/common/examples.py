"""The example figure: image | CAM | IR labels | pseudo mask | prediction | ground truth."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model_training.common.transforms import image_to_tensor

from .step_io import STEP_DIRS, atomic_write, load_cams, load_png
from .visualize import cam_overlay, colorize_labels, image_grid

SUBMIT_MODEL = Path(__file__).resolve().parents[1] / "segmentation" / "submit" / "model.py"
TITLES = ["image", "CAM", "IR labels", "pseudo mask", "prediction", "ground truth"]


def _load_submit_model(weights: Path):
    """The exported model through the submission folder's own loader (it is not a package)."""
    spec = importlib.util.spec_from_file_location("submit_model", SUBMIT_MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_checkpoint(weights, "cpu")


@torch.no_grad()
def _predict(loaded, image: np.ndarray) -> np.ndarray:
    stride = 32
    h, w = image.shape[:2]
    x = image_to_tensor(image, loaded.mean, loaded.std)[None]
    x = F.pad(x, (0, (-w) % stride, 0, (-h) % stride))
    logits = loaded.model(x)[..., :h, :w]
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def write_examples(source, work_dir, out_path, num_images: int = 4) -> Path | None:
    """A grid for the first training images that went through every step; None if none did."""
    work_dir = Path(work_dir)
    folders = {step: work_dir / STEP_DIRS[step] for step in (2, 3, 5)}
    ids = [i for i in source.ids
           if (folders[2] / f"{i}.npz").is_file() and (folders[3] / f"{i}.png").is_file()
           and (folders[5] / f"{i}.png").is_file()][:num_images]
    weights = work_dir / STEP_DIRS[6] / "model.pt"
    if not ids or not weights.is_file():
        return None
    loaded = _load_submit_model(weights)
    loaded.model.eval()
    rows = []
    for image_id in ids:
        image = source.load_image(image_id)
        gt = source.load_mask(image_id)
        rows.append([
            image,
            cam_overlay(image, load_cams(folders[2] / f"{image_id}.npz")["high_res"]),
            colorize_labels(load_png(folders[3] / f"{image_id}.png")),
            colorize_labels(load_png(folders[5] / f"{image_id}.png")),
            colorize_labels(_predict(loaded, image)),
            colorize_labels(gt) if gt is not None else np.zeros_like(image),
        ])
    grid = image_grid(rows, TITLES)
    return atomic_write(out_path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
