"""Step 5: IRNet boundaries + sparse random walk -> pseudo masks.

    python inference/irn_steps/irn_inference.py --config configs/toy/5_irn_inference.yaml [key=value ...]

Writes ``<work_dir>/5_pseudo_masks/<id>.png``: uint8 class ids at the image's size.
"""
from inference.common.pseudo_mask_step import DEFAULTS, run
from model_training.common.config import exit_on_config_error, parse_step_args


def main(argv=None) -> dict:
    cfg = parse_step_args(DEFAULTS, __doc__, argv, shardable=True)
    return exit_on_config_error(run, cfg)


if __name__ == "__main__":
    main()
