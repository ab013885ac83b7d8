"""Score a folder of predictions against ground truth.

    python inference/evaluate.py --pred DIR --gt DIR --num-classes N [--ids FILE]
        [--allow-missing] [--json FILE]

PNG folders get mIoU, per-class IoU and pixel accuracy (``--unsure 255`` scores only
confident pixels and reports coverage, for IR labels); a folder of CAM ``.npz`` files gets
a background-threshold sweep and its best threshold. The images scored are those of
``--ids`` (a split list), else every id in either folder: one with ground truth but no
prediction is an error unless ``--allow-missing``; the summary counts scored, missing and
skipped (no ground truth) images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model_training.common.config import ConfigError, StepError
from model_training.common.datasets.voc import read_id_list
from model_training.common.evaluation import (evaluate_cam_folder, evaluate_label_folder,
                                              format_table, ids_in_folders, png_folder_loader)
from model_training.common.metrics import IGNORE_INDEX
from model_training.common.step_cli import exit_on_config_error
from model_training.common.step_io import atomic_write


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", required=True, help="folder of <id>.png or <id>.npz")
    parser.add_argument("--gt", required=True, help="folder of ground-truth <id>.png (255 = ignore)")
    parser.add_argument("--num-classes", type=int, required=True, help="including background")
    parser.add_argument("--class-names", help="classes.txt: one name a line, background first")
    parser.add_argument("--ids", help="split list to score (one id a line, as ImageSets/"
                                      "Segmentation/val.txt); default: every id in --pred or --gt")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score the rest when images with ground truth have no prediction")
    parser.add_argument("--unsure", type=int, default=None,
                        help="prediction value to leave out and report coverage for (255 for IR labels)")
    parser.add_argument("--json", help="also write the result here")
    return parser.parse_args(argv)


def check_classes(num_classes: int, unsure: int | None) -> None:
    """A score over fewer than two classes (background and one) says nothing; an unsure
    value that is a class would drop that class's pixels."""
    if num_classes < 2:
        raise ConfigError(f"--num-classes must be at least 2 (background and a class), "
                          f"got {num_classes}")
    if unsure is not None and not num_classes <= unsure <= IGNORE_INDEX:
        raise ConfigError(f"--unsure must lie in {num_classes}..{IGNORE_INDEX} (not a class), "
                          f"got {unsure}")


def class_names_from(path: str | None, num_classes: int) -> list[str] | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--class-names: file does not exist: {path}")
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ConfigError(f"--class-names: {path} names {len(names)} classes, "
                          f"--num-classes is {num_classes}")
    return names


def prepare_json(path: str | None) -> Path | None:
    """Checked (its folder created) before scoring, so a long evaluation ends in its file."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--json: {path} is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--json: cannot create folder {path.parent}: {err.strerror}") from None
    return path


def prediction_suffix(pred_dir: Path) -> str:
    """``.png`` first: step 5 may keep its walked maps (.npz) beside its masks."""
    for suffix in (".png", ".npz"):
        if any(pred_dir.glob(f"*{suffix}")):
            return suffix
    raise ConfigError(f"--pred: no .png or .npz files in {pred_dir}")


def score(args: argparse.Namespace) -> dict:
    """The result of the command line's folders; every bad input is a ConfigError."""
    check_classes(args.num_classes, args.unsure)
    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for flag, folder in (("--pred", pred_dir), ("--gt", gt_dir)):
        if not folder.is_dir():
            raise ConfigError(f"{flag}: folder does not exist: {folder}")
    names = class_names_from(args.class_names, args.num_classes)
    if args.ids and not Path(args.ids).is_file():
        raise ConfigError(f"--ids: file does not exist: {args.ids}")
    suffix = prediction_suffix(pred_dir)
    ids = read_id_list(args.ids) if args.ids else ids_in_folders(pred_dir, suffix, gt_dir)
    common = {"ids": ids, "class_names": names, "allow_missing": args.allow_missing}
    if suffix == ".png":
        result = evaluate_label_folder(pred_dir, png_folder_loader(gt_dir), args.num_classes,
                                       unsure_label=args.unsure, **common)
    else:
        result = evaluate_cam_folder(pred_dir, png_folder_loader(gt_dir), args.num_classes,
                                     **common)
    if not result["images"]:
        raise ConfigError(f"no prediction in {pred_dir} has a ground truth in {gt_dir}")
    return result


def write_json(path: Path, result: dict) -> None:
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    except OSError as err:
        raise StepError(f"--json: cannot write {path}: {err}") from None


def run(args: argparse.Namespace) -> dict:
    json_path = prepare_json(args.json)
    result = score(args)
    print(format_table(result, f"{args.pred} vs {args.gt}"))
    if json_path is not None:
        write_json(json_path, result)
    print(json.dumps({k: v for k, v in result.items()
                      if k != "sweep" and not k.startswith("per_class")}))
    return result


def main(argv=None) -> int:
    exit_on_config_error(run, parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
