"""Scoring every stage of a pipeline run into ``report.json`` (DESIGN.md section 3)."""
from __future__ import annotations

import json
from pathlib import Path

from model_training.common.datasets import build_source

from .evaluation import evaluate_cam_folder, evaluate_label_folder
from .step_io import STEP_DIRS, atomic_write, read_done

STAGE_TITLES = {"cam": "CAM (train, best threshold)", "ir_label": "IR labels (train, confident)",
                "pseudo_mask": "pseudo masks (train)", "segmentation": "segmentation"}


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


def format_report(report: dict) -> str:
    """The table the runner prints: stage, mIoU, seconds."""
    lines = [f"{'stage':<34s} {'mIoU':>7s}", "-" * 42]
    if report["classifier"].get("val_map") is not None:
        lines.append(f"{'classifier (val mAP x100)':<34s} {100 * report['classifier']['val_map']:7.2f}")
    for key, title in STAGE_TITLES.items():
        stage = report["stages"].get(key)
        if stage and stage.get("miou") is not None:
            extra = {k: v for k, v in stage.items() if k != "miou"}
            lines.append(f"{title:<34s} {stage['miou']:7.2f}  {extra if extra else ''}")
    lines += ["", f"{'step':<34s} {'seconds':>7s}", "-" * 42]
    lines += [f"{name:<34s} {sec:7.1f}" for name, sec in report["seconds"].items()]
    lines.append(f"{'total':<34s} {sum(report['seconds'].values()):7.1f}")
    return "\n".join(lines)
