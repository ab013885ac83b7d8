"""Score a folder of predictions against ground truth.

    python inference/evaluate.py --pred DIR --gt DIR --num-classes N [--json FILE]

PNG folders get mIoU, per-class IoU and pixel accuracy (``--unsure 255`` scores only
confident pixels and reports coverage, for IR labels); a folder of CAM ``.npz`` files gets
a background-threshold sweep and its best threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inference.common.evaluation import (evaluate_cam_folder, evaluate_label_folder,
                                         format_table, png_folder_loader)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", required=True, help="folder of <id>.png or <id>.npz")
    parser.add_argument("--gt", required=True, help="folder of ground-truth <id>.png (255 = ignore)")
    parser.add_argument("--num-classes", type=int, required=True, help="including background")
    parser.add_argument("--class-names", help="classes.txt: one name a line, background first")
    parser.add_argument("--unsure", type=int, default=None,
                        help="prediction value to leave out and report coverage for (255 for IR labels)")
    parser.add_argument("--json", help="also write the result here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for flag, folder in (("--pred", pred_dir), ("--gt", gt_dir)):
        if not folder.is_dir():
            print(f"error: {flag}: folder does not exist: {folder}", file=sys.stderr)
            return 2
    names = None
    if args.class_names:
        if not Path(args.class_names).is_file():
            print(f"error: --class-names: file does not exist: {args.class_names}", file=sys.stderr)
            return 2
        names = [l.strip() for l in Path(args.class_names).read_text().splitlines() if l.strip()]
    load_gt = png_folder_loader(gt_dir)
    # Masks first: step 5 may keep its walked maps (.npz) beside its masks.
    if any(pred_dir.glob("*.png")):
        result = evaluate_label_folder(pred_dir, load_gt, args.num_classes,
                                       unsure_label=args.unsure, class_names=names)
    elif any(pred_dir.glob("*.npz")):
        result = evaluate_cam_folder(pred_dir, load_gt, args.num_classes, class_names=names)
    else:
        print(f"error: --pred: no .png or .npz files in {pred_dir}", file=sys.stderr)
        return 2
    if not result["images"]:
        print(f"error: no prediction in {pred_dir} has a ground truth in {gt_dir}", file=sys.stderr)
        return 2
    print(format_table(result, f"{pred_dir} vs {gt_dir}"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items()
                      if k != "sweep" and not k.startswith("per_class")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
