"""Scoring step outputs against ground truth: PNG label folders and CAM ``.npz`` folders.

Ground truth comes through a ``load_gt(id)`` callable so the same code scores a folder of
PNGs (the CLI) and a generated dataset with no files on disk (toy, inside the pipeline).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .metrics import IGNORE_INDEX, ConfusionMatrix
from .step_io import load_cams, load_png, report_failure

DEFAULT_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))

MaskLoader = Callable[[str], "np.ndarray | None"]


def png_folder_loader(folder) -> MaskLoader:
    folder = Path(folder)

    def load(image_id: str):
        path = folder / f"{image_id}.png"
        return load_png(path) if path.is_file() else None

    return load


def evaluate_label_folder(pred_dir, load_gt: MaskLoader, num_classes: int,
                          ids: Iterable[str] | None = None, unsure_label: int | None = None,
                          class_names: Sequence[str] | None = None) -> dict:
    """mIoU of ``<id>.png`` predictions. With ``unsure_label`` (255 for IR labels) those pixels
    are left out and the share of the rest is returned as ``coverage`` (percent)."""
    pred_dir = Path(pred_dir)
    ids = sorted(p.stem for p in pred_dir.glob("*.png")) if ids is None else list(ids)
    matrix = ConfusionMatrix(num_classes)
    confident = total = scored = 0
    missing: list[str] = []
    for image_id in tqdm(ids, desc=f"eval {pred_dir.name}", unit="img", dynamic_ncols=True):
        pred_path = pred_dir / f"{image_id}.png"
        gt = load_gt(image_id)
        if gt is None:
            continue
        if not pred_path.is_file():
            missing.append(image_id)
            continue
        try:
            pred = load_png(pred_path)
            if pred.shape != gt.shape:
                raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        except Exception as err:  # noqa: BLE001 - a bad file is reported, the rest still count
            report_failure(image_id, err)
            missing.append(image_id)
            continue
        if unsure_label is not None:
            keep = pred != unsure_label
            confident += int(keep.sum())
            total += keep.size
            gt = np.where(keep, gt, IGNORE_INDEX)
        matrix.update(pred, gt)
        scored += 1
    result = matrix.summary(list(class_names) if class_names else None)
    result.update({"images": scored, "missing": len(missing)})
    if unsure_label is not None:
        result["coverage"] = round(100.0 * confident / total, 4) if total else None
    return result


def evaluate_cam_folder(cam_dir, load_gt: MaskLoader, num_classes: int,
                        ids: Iterable[str] | None = None,
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        class_names: Sequence[str] | None = None) -> dict:
    """Sweep the background threshold over ``high_res`` CAMs; report the best (as eval_cam)."""
    cam_dir = Path(cam_dir)
    ids = sorted(p.stem for p in cam_dir.glob("*.npz")) if ids is None else list(ids)
    matrices = [ConfusionMatrix(num_classes) for _ in thresholds]
    scored = 0
    for image_id in tqdm(ids, desc=f"eval {cam_dir.name}", unit="img", dynamic_ncols=True):
        gt = load_gt(image_id)
        path = cam_dir / f"{image_id}.npz"
        if gt is None or not path.is_file():
            continue
        try:
            data = load_cams(path)
            cams, keys = data["high_res"], data["keys"]
            if cams.shape[1:] != gt.shape:
                raise ValueError(f"CAM size {cams.shape[1:]} and ground truth {gt.shape} differ")
        except Exception as err:  # noqa: BLE001
            report_failure(image_id, err)
            continue
        fg_max = cams.max(axis=0) if len(keys) else np.zeros(gt.shape, np.float32)
        fg_label = keys[cams.argmax(axis=0)] if len(keys) else np.zeros(gt.shape, np.int64)
        for threshold, matrix in zip(thresholds, matrices):
            matrix.update(np.where(fg_max > threshold, fg_label, 0), gt)
        scored += 1
    sweep = {float(t): m.summary()["miou"] for t, m in zip(thresholds, matrices)}
    best = max(range(len(thresholds)), key=lambda i: -1 if sweep[float(thresholds[i])] is None
               else sweep[float(thresholds[i])])
    result = matrices[best].summary(list(class_names) if class_names else None)
    result.update({"threshold": float(thresholds[best]), "sweep": sweep, "images": scored})
    return result


def format_table(result: dict, title: str = "") -> str:
    """Per class IoU, precision and recall, then mIoU and pixel accuracy, for the terminal."""
    lines = [title] if title else []
    columns = [result.get(key, {}) for key in ("per_class_iou", "per_class_precision",
                                               "per_class_recall")]
    if columns[0]:
        lines.append(f"  {'class':<20s} {'IoU':>6s} {'prec.':>6s} {'recall':>6s}")
    for name in columns[0]:
        cells = [column.get(name) for column in columns]
        lines.append(f"  {name:<20s} " + " ".join("     -" if v is None else f"{v:6.2f}"
                                                  for v in cells))
    extras = [f"mIoU {result['miou']:.2f}" if result.get("miou") is not None else "mIoU -"]
    if result.get("pixel_accuracy") is not None:
        extras.append(f"pixel acc {result['pixel_accuracy']:.2f}")
    for key in ("threshold", "coverage", "images", "missing"):
        if result.get(key) is not None:
            extras.append(f"{key} {result[key]}")
    lines.append("  " + " | ".join(extras))
    return "\n".join(lines)
