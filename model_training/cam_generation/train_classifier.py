"""Step 1: train the multi-label CAM classifier on image-level labels.

    python model_training/cam_generation/train_classifier.py --config configs/toy/1_classifier.yaml [key=value ...]

Writes ``<work_dir>/1_classifier/``: best.pt (by val mAP), last.pt (resume with
``resume=true``), metrics.csv, tb/ (TensorBoard) and the resolved config.yaml.
"""
from model_training.cam_generation import classifier_training
from model_training.common.step_cli import run_script


def main(argv: list[str] | None = None) -> dict:
    return run_script(classifier_training, __doc__, argv)


if __name__ == "__main__":
    main()
