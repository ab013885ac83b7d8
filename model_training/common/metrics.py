"""Segmentation scores from one confusion matrix: mIoU, per-class IoU, pixel accuracy.

Accumulating a matrix (rather than averaging per-image scores) gives the dataset-level
numbers VOC and IRNet report.
"""
from __future__ import annotations

import numpy as np

# Pixels of this value are never scored or trained on: void in ground truth, padding in
# crops, "unsure" in IR labels and in the segmentation loss (``ignore_index``).
IGNORE_INDEX = 255


class ConfusionMatrix:
    """``matrix[g, p]`` counts pixels of ground-truth class g predicted as p.

    Ground truth 255 is ignored. A prediction outside ``[0, num_classes)`` counts as wrong
    (it lands in an extra column), so a bad prediction file lowers the score instead of
    crashing the evaluation.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
        gt = gt.reshape(-1).astype(np.int64)
        pred = pred.reshape(-1).astype(np.int64)
        valid = (gt != IGNORE_INDEX) & (gt >= 0) & (gt < self.num_classes)
        gt, pred = gt[valid], pred[valid]
        pred = np.where((pred >= 0) & (pred < self.num_classes), pred, self.num_classes)
        index = gt * (self.num_classes + 1) + pred
        self.matrix += np.bincount(index, minlength=self.matrix.size).reshape(self.matrix.shape)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class absent from both prediction and ground truth."""
        square = self.matrix[:, : self.num_classes]
        tp = np.diag(square).astype(np.float64)
        gt_total = self.matrix.sum(axis=1)
        pred_total = square.sum(axis=0)
        union = gt_total + pred_total - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def precision(self) -> np.ndarray:
        """Per class: the share of the pixels predicted c that are c; NaN where none is."""
        square = self.matrix[:, : self.num_classes]
        predicted = square.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(predicted > 0, np.diag(square) / np.maximum(predicted, 1), np.nan)

    def recall(self) -> np.ndarray:
        """Per class: the share of the pixels of class c predicted c; NaN where there are none."""
        actual = self.matrix.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(actual > 0, np.diag(self.matrix) / np.maximum(actual, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes that occur in prediction or ground truth (0-1)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix[:, : self.num_classes]) / total) if total else float("nan")

    def summary(self, class_names: list[str] | None = None) -> dict:
        """Percentages (0-100), the unit of report.json and of the papers. Precision and
        recall say whether a class's IoU is lost to pixels of other classes labelled as it
        (a mask beside the object) or to its own pixels labelled otherwise (too small)."""
        names = class_names or [str(i) for i in range(self.num_classes)]
        per_class = {"per_class_iou": self.iou(), "per_class_precision": self.precision(),
                     "per_class_recall": self.recall()}
        return {
            "miou": _percent(self.miou()),
            "pixel_accuracy": _percent(self.pixel_accuracy()),
            **{key: {name: _percent(v) for name, v in zip(names, values)}
               for key, values in per_class.items()},
        }


def _percent(value: float) -> float | None:
    return None if np.isnan(value) else round(100.0 * float(value), 4)
