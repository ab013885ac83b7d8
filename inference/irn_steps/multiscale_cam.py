"""Step 2: multiscale CAM / Grad-CAM / Grad-CAM++ of every training image.

    python inference/irn_steps/multiscale_cam.py --config configs/toy/2_cam.yaml [key=value ...]

Writes ``<work_dir>/2_cams/<id>.npz``: keys (K,), cam (K,h,w) at stride 4, high_res (K,H,W).
"""
from inference.common.cam_step import DEFAULTS, run
from model_training.common.config import exit_on_config_error, parse_step_args


def main(argv=None) -> dict:
    cfg = parse_step_args(DEFAULTS, __doc__, argv, shardable=True)
    return exit_on_config_error(run, cfg)


if __name__ == "__main__":
    main()
