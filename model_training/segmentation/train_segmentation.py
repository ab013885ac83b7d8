"""Step 6: train a segmentation model on the pseudo masks (or ground truth) and export it.

    python model_training/segmentation/train_segmentation.py --config configs/toy/6_segmentation.yaml [key=value ...]

Writes <work_dir>/6_segmentation/: best.pt, last.pt, metrics.csv, tb/, config.yaml, and
model.pt + export_config.yaml for inference/segmentation/submit/generate_predictions.py.
"""
from __future__ import annotations

from model_training.common.config import exit_on_config_error, parse_step_args
from model_training.segmentation.segmentation_training import DEFAULTS, train_segmentation


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_step_args(DEFAULTS, __doc__, argv)
    result = exit_on_config_error(train_segmentation, cfg)
    miou = "n/a (no val masks)" if result["miou"] is None else f"{result['miou']:.2f}"
    print(f"step 6: val mIoU {miou} (best epoch {result['best_epoch']}/{result['epochs']}, "
          f"split {result['split']}, {result['seconds']:.0f}s); exported {result['model']}")
    return result


if __name__ == "__main__":
    main()
