"""Step 3 library: CAMs -> IRNet training labels (IRNet `cam_to_ir_label`).

Two dense CRFs on the original image: one on the CAMs cut at a high background score
(`conf_fg_thres`) finds confident foreground, one cut at a low score (`conf_bg_thres`)
finds confident background; whatever neither is sure of becomes 255 ("unsure"), which
IRNet's training ignores.
"""
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from model_training.common import step_io
from model_training.common.crf import crf_inference_many
from model_training.common.metrics import IGNORE_INDEX

UNSURE = IGNORE_INDEX  # IRNet learns nothing from these pixels


def _crf_labels(image, cams, background_scores, crf_params) -> list[np.ndarray]:
    """CRF-refined argmax of [background_score, cams...] for each background score (one CRF
    of the image, its kernels built once); label indices 0..K.

    A tie with the background score goes to background, as argmax over the padded stack does.
    """
    best, best_class = cams.max(axis=0), cams.argmax(axis=0) + 1
    labels = [np.where(best > score, best_class, 0) for score in background_scores]
    return crf_inference_many(image, labels, n_labels=len(cams) + 1, **crf_params)


def cams_to_ir_label(
    image: np.ndarray,
    keys: Iterable[int],
    high_res_cams: np.ndarray,
    conf_fg_thres: float,
    conf_bg_thres: float,
    crf_params: Mapping,
) -> np.ndarray:
    """uint8 HxW label: 0 confident background, class id confident foreground, 255 unsure.

    `keys` are the class ids of the (K,H,W) `high_res_cams` (image size, per-class max 1);
    only these classes and background are CRF labels, which keeps the CRF cheap.
    `crf_params` are keyword arguments of `crf_inference` (t, gt_prob, gaussian, bilateral).
    """
    class_ids = np.asarray(list(keys), dtype=np.int64)
    cams = np.asarray(high_res_cams, dtype=np.float32)
    if cams.ndim != 3 or len(cams) != len(class_ids) or cams.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"CAMs {cams.shape} do not match {len(class_ids)} keys and image {image.shape}"
        )
    if np.any((class_ids < 1) | (class_ids >= UNSURE)):
        raise ValueError(f"class ids must be in 1..{UNSURE - 1}, got {class_ids.tolist()}")
    if len(class_ids) == 0:  # both CRFs could only say background
        return np.zeros(image.shape[:2], np.uint8)

    label_to_class = np.concatenate([[0], class_ids]).astype(np.uint8)
    fg, bg = (label_to_class[labels] for labels in
              _crf_labels(image, cams, (conf_fg_thres, conf_bg_thres), crf_params))

    ir_label = np.where(fg == 0, UNSURE, fg).astype(np.uint8)
    ir_label[(fg == 0) & (bg == 0)] = 0
    return ir_label


def process_image(
    image_id: str,
    load_image: Callable[[str], np.ndarray],
    cam_dir: str | Path,
    out_dir: str | Path,
    conf_fg_thres: float,
    conf_bg_thres: float,
    crf_params: Mapping,
) -> None:
    """Read `<cam_dir>/<id>.npz` and the image, write `<out_dir>/<id>.png` atomically."""
    cams = step_io.load_cams(Path(cam_dir) / f"{image_id}.npz")
    ir_label = cams_to_ir_label(
        load_image(image_id), cams["keys"], cams["high_res"],
        conf_fg_thres, conf_bg_thres, crf_params,
    )
    step_io.save_png(Path(out_dir) / f"{image_id}.png", ir_label)
