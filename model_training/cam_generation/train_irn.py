"""Step 4: train IRNet (class-boundary + displacement branches) on the IR labels of step 3.

    python model_training/cam_generation/train_irn.py --config configs/toy/4_irn.yaml [key=value ...]

Writes ``<work_dir>/4_irn/``: best.pt / last.pt, metrics.csv, tb/ and the resolved config.yaml.
"""
from model_training.cam_generation.irn_training import DEFAULTS, run
from model_training.common.config import exit_on_config_error, parse_step_args


def main(argv=None) -> dict:
    cfg = parse_step_args(DEFAULTS, __doc__, argv)
    summary = exit_on_config_error(run, cfg)
    print(f"4_irn: {summary['images']} images, {summary['seconds']} s")
    return summary


if __name__ == "__main__":
    main()
