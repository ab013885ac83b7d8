"""Step 6: train a segmentation model on the pseudo masks (or ground truth) and export it.

    python model_training/segmentation/train_segmentation.py --config configs/toy/6_segmentation.yaml [key=value ...]

Writes <work_dir>/6_segmentation/: best.pt, last.pt, metrics.csv, tb/, config.yaml, and
model.pt + export_config.yaml for inference/segmentation/submit/generate_predictions.py.
"""
from model_training.common.step_cli import run_script
from model_training.segmentation import segmentation_training


def main(argv: list[str] | None = None) -> dict:
    return run_script(segmentation_training, __doc__, argv)


if __name__ == "__main__":
    main()
