"""Scoring every stage of a pipeline run into ``report.json`` (DESIGN.md section 3)."""
from __future__ import annotations

import json
from pathlib import Path

from model_training.common.datasets import build_source

from .evaluation import evaluate_cam_folder, evaluate_label_folder
from .step_io import STEP_DIRS, atomic_write, read_done

# The stage each step's output is scored as (steps 4 and 6 train models: time only).
STAGE_OF_STEP = {STEP_DIRS[2]: "cam", STEP_DIRS[3]: "ir_label", STEP_DIRS[5]: "pseudo_mask",
                 STEP_DIRS[7]: "segmentation"}


def score_stages(cfg, train_split: str, val_split: str) -> dict:
    """mIoU of each stage that has ground truth: CAM/IR/pseudo on train, predictions on val."""
    work_dir = Path(cfg.work_dir)
    train = build_source(cfg.dataset, train_split)
    stages: dict = {}
    if train.has_masks:
        n = train.num_classes
        cams = evaluate_cam_folder(work_dir / STEP_DIRS[2], train.load_mask, n, train.ids)
        stages["cam"] = {"miou": cams["miou"], "threshold": cams["threshold"]}
        ir = evaluate_label_folder(work_dir / STEP_DIRS[3], train.load_mask, n, train.ids,
                                   unsure_label=255)
        stages["ir_label"] = {"miou": ir["miou"], "coverage": ir["coverage"]}
        pseudo = evaluate_label_folder(work_dir / STEP_DIRS[5], train.load_mask, n, train.ids)
        stages["pseudo_mask"] = {"miou": pseudo["miou"]}
    val = build_source(cfg.dataset, val_split)
    if val.has_masks:
        seg = evaluate_label_folder(work_dir / STEP_DIRS[7], val.load_mask, val.num_classes, val.ids)
        stages["segmentation"] = {"miou": seg["miou"], "split": val_split}
    return stages


def build_report(cfg, stages: dict, seconds: dict) -> dict:
    classifier = read_done(Path(cfg.work_dir) / STEP_DIRS[1]) or {}
    return {
        "dataset": cfg.dataset.name if cfg.dataset.name != "voc" else Path(cfg.dataset.root).name,
        "num_classes": build_source(cfg.dataset, cfg.dataset.val_split).num_classes,
        "classifier": {"val_map": classifier.get("val_map")},
        "stages": stages,
        "seconds": seconds,
    }


def write_report(report: dict, work_dir) -> Path:
    path = Path(work_dir) / "report.json"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))


def _stage_cell(key: str, stage: dict) -> str:
    """What a stage's mIoU was measured on, e.g. ``CAM (train, threshold 0.60)``."""
    if key == "cam":
        return f"CAM (train, best threshold {stage['threshold']:.2f})"
    if key == "ir_label":
        return f"IR labels (train, confident; coverage {stage['coverage']:.1f} %)"
    if key == "pseudo_mask":
        return "pseudo masks (train)"
    return f"segmentation ({stage.get('split', 'val')})"


def format_report(report: dict) -> str:
    """The table the runner prints: one row per step, its stage's mIoU and its seconds."""
    rows = []
    for name, seconds in report["seconds"].items():
        title, score = "", None
        if name == STEP_DIRS[1] and report["classifier"].get("val_map") is not None:
            title, score = "classifier (val mAP x100)", 100 * report["classifier"]["val_map"]
        key = STAGE_OF_STEP.get(name)
        stage = report["stages"].get(key) if key else None
        if stage and stage.get("miou") is not None:
            title, score = _stage_cell(key, stage), stage["miou"]
        rows.append((name, title, f"{score:.2f}" if score is not None else "-", f"{seconds:.1f}"))
    rows.append(("total", "", "", f"{sum(report['seconds'].values()):.1f}"))
    header = ("step", "stage", "mIoU", "seconds")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]:>{widths[2]}}  "
             f"{header[3]:>{widths[3]}}", "-" * (sum(widths) + 6)]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}"
              for a, b, c, d in rows]
    return "\n".join(lines)
