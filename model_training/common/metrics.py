"""Scores: segmentation from one confusion matrix (mIoU, per-class IoU, pixel accuracy) and
multi-label classification (mAP, F1).

Accumulating a matrix (rather than averaging per-image scores) gives the dataset-level
numbers VOC and IRNet report.
"""
from __future__ import annotations

from typing import Sequence

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


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function over distinct scores
    (the VOC/sklearn definition); NaN for a class without positives."""
    targets = np.asarray(targets, dtype=np.float64)
    if targets.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    sorted_scores, hits = np.asarray(scores)[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(hits) - 1]
    true_pos = np.cumsum(hits)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classification_metrics(scores: np.ndarray, targets: np.ndarray, names: Sequence[str],
                           threshold: float = 0.5) -> dict:
    """mAP, per-class AP and F1 (micro and macro) at ``threshold`` over classes with positives."""
    present = targets.sum(axis=0) > 0
    ap = {name: average_precision(scores[:, k], targets[:, k]) for k, name in enumerate(names)}
    predicted = scores >= threshold
    true_pos = (predicted & (targets > 0)).sum(axis=0)
    false_pos = (predicted & (targets == 0)).sum(axis=0)
    false_neg = (~predicted & (targets > 0)).sum(axis=0)
    per_class_f1 = 2 * true_pos / np.maximum(2 * true_pos + false_pos + false_neg, 1)
    micro = 2 * true_pos.sum() / max(2 * true_pos.sum() + false_pos.sum() + false_neg.sum(), 1)
    return {
        "map": float(np.mean([ap[n] for n, p in zip(names, present) if p])) if present.any()
        else float("nan"),
        "f1_micro": float(micro),
        "f1_macro": float(per_class_f1[present].mean()) if present.any() else float("nan"),
        "ap": {n: v for n, v in ap.items() if not np.isnan(v)},
    }
