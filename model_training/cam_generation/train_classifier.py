"""Step 1: train the multi-label CAM classifier on image-level labels.

    python model_training/cam_generation/train_classifier.py --config configs/toy/1_classifier.yaml [key=value ...]

Writes ``<work_dir>/1_classifier/``: best.pt (by val mAP), last.pt (resume with
``resume=true``), metrics.csv, tb/ (TensorBoard) and the resolved config.yaml.
"""
from model_training.cam_generation.classifier_training import DEFAULTS, train_classifier
from model_training.common.config import exit_on_config_error, parse_step_args


def main(argv=None) -> dict:
    cfg = parse_step_args(DEFAULTS, __doc__, argv)
    summary = exit_on_config_error(train_classifier, cfg)
    print(f"1_classifier: best val mAP {summary['best_score']:.4f} at epoch {summary['best_epoch']}"
          f" of {summary['epochs']} ({summary['seconds']} s) -> {summary['out_dir']}")
    return summary


if __name__ == "__main__":
    main()
