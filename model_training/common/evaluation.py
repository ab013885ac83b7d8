"""Scoring step outputs against ground truth: PNG label folders and CAM ``.npz`` folders.

Ground truth comes through a ``load_gt(id)`` callable so the same code scores a folder of
PNGs (the CLI) and a generated dataset with no files on disk (toy, inside the pipeline).

A score never leaves out what it cannot score without saying so: an image with ground truth
but no prediction is an error (or, with ``allow_missing``, counted as ``missing``), one
without ground truth is counted as ``skipped``, and a file of the wrong size or with values
that are not classes is an error naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import numpy as np

from model_training.common.config import ConfigError

from .metrics import IGNORE_INDEX, ConfusionMatrix
from .progress import progress
from .step_io import first_line, load_cams, load_png

DEFAULT_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))

MaskLoader = Callable[[str], "np.ndarray | None"]
Loaded = TypeVar("Loaded")


class PngFolder:
    """Ground truth ``<folder>/<id>.png`` (None where there is none); errors name the file."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.png"

    def __call__(self, image_id: str) -> np.ndarray | None:
        path = self.path(image_id)
        return load_png(path) if path.is_file() else None


def png_folder_loader(folder) -> MaskLoader:
    return PngFolder(folder)


def ids_in_folders(pred_dir, suffix: str, gt_dir) -> list[str]:
    """Every id with a prediction ``<id><suffix>`` or a ground truth ``<id>.png``: what the
    CLI scores without a split list, so neither a missing prediction nor a prediction
    without ground truth goes unseen."""
    names = {p.stem for p in Path(pred_dir).glob(f"*{suffix}")}
    return sorted(names | {p.stem for p in Path(gt_dir).glob("*.png")})


def _gt_name(load_gt: MaskLoader, image_id: str) -> str:
    return str(load_gt.path(image_id)) if isinstance(load_gt, PngFolder) else \
        f"ground truth of {image_id}"


def _read(name: str, load: Callable[[], Loaded]) -> Loaded:
    try:
        return load()
    except Exception as err:  # noqa: BLE001 - readers raise many types for a corrupt file
        raise ConfigError(f"cannot read {name}: {first_line(err)}") from None


def _check_classes(values: np.ndarray, num_classes: int, name: str,
                   allowed: Sequence[int] = (IGNORE_INDEX,)) -> None:
    """Values that are no class would be dropped from the ground truth or counted wrong in a
    prediction, unseen: the sign of a wrong ``num_classes`` or a file of another dataset."""
    foreign = (values < 0) | (values >= num_classes)
    foreign &= ~np.isin(values, list(allowed))
    if foreign.any():
        shown = np.unique(values[foreign])[:5].tolist()
        also = f" nor {' / '.join(map(str, allowed))}" if len(allowed) else ""
        raise ConfigError(f"{name}: values {shown} are not classes 0..{num_classes - 1} "
                          f"(num_classes {num_classes}){also}")


def _check_size(name: str, size: tuple, gt: np.ndarray) -> None:
    if tuple(size) != gt.shape:
        raise ConfigError(f"{name}: size {tuple(size)} but its ground truth is {gt.shape}")


def _ground_truth(load_gt: MaskLoader, image_id: str, num_classes: int) -> np.ndarray | None:
    name = _gt_name(load_gt, image_id)
    gt = _read(name, lambda: load_gt(image_id))
    if gt is not None:
        _check_classes(gt, num_classes, name)
    return gt


def _without_prediction(ids: list[str], folder: Path, suffix: str, load_gt: MaskLoader,
                        allow_missing: bool) -> tuple[int, int]:
    """(missing, skipped) among the ids with no ``<id><suffix>``: missing where the image has
    ground truth, which is an error unless ``allow_missing`` (a score of the rest would read
    as the whole split's), skipped where it has none."""
    missing, skipped = [], 0
    for image_id in ids:
        if (folder / f"{image_id}{suffix}").is_file():
            continue
        if _read(_gt_name(load_gt, image_id), lambda: load_gt(image_id)) is None:
            skipped += 1
        else:
            missing.append(image_id)
    if missing and not allow_missing:
        raise ConfigError(f"{len(missing)} images with ground truth have no {suffix} prediction "
                          f"in {folder} (first: {missing[0]}); --allow-missing scores the rest")
    return len(missing), skipped


def _with_ground_truth(folder: Path, suffix: str, ids: Iterable[str] | None, load_gt: MaskLoader,
                       num_classes: int, allow_missing: bool, counts: dict):
    """(path, ground truth) of every image of ``ids`` (default: the files present) with a
    prediction ``<id><suffix>`` and ground truth; fills ``counts`` with the images scored,
    missing and skipped (see the module docstring)."""
    ids = sorted(p.stem for p in folder.glob(f"*{suffix}")) if ids is None else list(ids)
    missing, skipped = _without_prediction(ids, folder, suffix, load_gt, allow_missing)
    counts.update(images=0, missing=missing, skipped=skipped)
    for image_id in progress(ids, f"eval {folder.name}", unit="img", leave=False):
        path = folder / f"{image_id}{suffix}"
        if not path.is_file():
            continue  # counted above
        gt = _ground_truth(load_gt, image_id, num_classes)
        if gt is None:
            counts["skipped"] += 1
            continue
        yield path, gt
        counts["images"] += 1


def evaluate_label_folder(pred_dir, load_gt: MaskLoader, num_classes: int,
                          ids: Iterable[str] | None = None, unsure_label: int | None = None,
                          class_names: Sequence[str] | None = None,
                          allow_missing: bool = False) -> dict:
    """mIoU of ``<id>.png`` predictions of ``ids`` (default: those present). With
    ``unsure_label`` (255 for IR labels) those pixels are left out and the share of the rest
    is returned as ``coverage`` (percent), and per ground-truth class as
    ``per_class_coverage``: an unsure band that takes an object's pixels more often than the
    background's shows there, not in the IoU of the labelled pixels. Also returns how many
    images were scored, ``missing`` and ``skipped`` (see the module docstring)."""
    allowed = (IGNORE_INDEX,) if unsure_label is None else (IGNORE_INDEX, unsure_label)
    matrix = ConfusionMatrix(num_classes)
    confident = total = 0
    class_pixels = np.zeros(num_classes, np.int64)
    class_labelled = np.zeros(num_classes, np.int64)
    counts: dict = {}
    for pred_path, gt in _with_ground_truth(Path(pred_dir), ".png", ids, load_gt, num_classes,
                                            allow_missing, counts):
        pred = _read(str(pred_path), lambda: load_png(pred_path))
        _check_size(str(pred_path), pred.shape, gt)
        _check_classes(pred, num_classes, str(pred_path), allowed)
        if unsure_label is not None:
            keep = pred != unsure_label
            confident += int(keep.sum())
            total += keep.size
            scored = gt != IGNORE_INDEX
            class_pixels += np.bincount(gt[scored], minlength=num_classes)
            class_labelled += np.bincount(gt[scored & keep], minlength=num_classes)
            gt = np.where(keep, gt, IGNORE_INDEX)
        matrix.update(pred, gt)
    result = matrix.summary(list(class_names) if class_names else None)
    result.update(counts)
    if unsure_label is not None:
        result["coverage"] = round(100.0 * confident / total, 4) if total else None
        result["per_class_coverage"] = {
            name: round(100.0 * labelled / pixels, 4) if pixels else None
            for name, labelled, pixels in zip(result["per_class_iou"], class_labelled, class_pixels)}
    return result


def evaluate_cam_folder(cam_dir, load_gt: MaskLoader, num_classes: int,
                        ids: Iterable[str] | None = None,
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        class_names: Sequence[str] | None = None,
                        allow_missing: bool = False) -> dict:
    """Sweep the background threshold over ``high_res`` CAMs of ``ids`` (default: those
    present); report the best (as eval_cam) and the images scored, missing and skipped."""
    matrices = [ConfusionMatrix(num_classes) for _ in thresholds]
    counts: dict = {}
    for path, gt in _with_ground_truth(Path(cam_dir), ".npz", ids, load_gt, num_classes,
                                       allow_missing, counts):
        data = _read(str(path), lambda: load_cams(path))
        cams, keys = data["high_res"], data["keys"]
        _check_size(str(path), cams.shape[1:], gt)
        _check_classes(keys, num_classes, f"{path} (keys)", allowed=())
        fg_max = cams.max(axis=0) if len(keys) else np.zeros(gt.shape, np.float32)
        fg_label = keys[cams.argmax(axis=0)] if len(keys) else np.zeros(gt.shape, np.int64)
        for threshold, matrix in zip(thresholds, matrices):
            matrix.update(np.where(fg_max > threshold, fg_label, 0), gt)
    sweep = {float(t): m.summary()["miou"] for t, m in zip(thresholds, matrices)}
    best = max(range(len(thresholds)), key=lambda i: -1 if sweep[float(thresholds[i])] is None
               else sweep[float(thresholds[i])])
    result = matrices[best].summary(list(class_names) if class_names else None)
    result.update({"threshold": float(thresholds[best]), "sweep": sweep, **counts})
    return result


def format_table(result: dict, title: str = "") -> str:
    """Per class IoU, precision, recall (and the labelled share of its pixels, where unsure
    pixels were left out), then mIoU and pixel accuracy, for the terminal."""
    lines = [title] if title else []
    headers = {"per_class_iou": "IoU", "per_class_precision": "prec.",
               "per_class_recall": "recall", "per_class_coverage": "labelled"}
    columns = {header: result[key] for key, header in headers.items() if result.get(key)}
    if columns:
        lines.append(f"  {'class':<20s} " + " ".join(f"{h:>8s}" for h in columns))
    for name in result.get("per_class_iou", {}):
        cells = [column.get(name) for column in columns.values()]
        lines.append(f"  {name:<20s} " + " ".join("       -" if v is None else f"{v:8.2f}"
                                                  for v in cells))
    extras = [f"mIoU {result['miou']:.2f}" if result.get("miou") is not None else "mIoU -"]
    if result.get("pixel_accuracy") is not None:
        extras.append(f"pixel acc {result['pixel_accuracy']:.2f}")
    for key in ("threshold", "coverage", "images", "missing", "skipped"):
        if result.get(key) is not None:
            extras.append(f"{key} {result[key]}")
    lines.append("  " + " | ".join(extras))
    return "\n".join(lines)
