"""Step 2: multiscale CAM / Grad-CAM / Grad-CAM++ of every training image.

    python inference/irn_steps/multiscale_cam.py --config configs/toy/2_cams.yaml [key=value ...]

Writes ``<work_dir>/2_cams/<id>.npz``: keys (K,), cam (K,h,w) at stride 4, high_res (K,H,W).
"""
from inference.irn_steps import cams_step
from model_training.common.step_cli import run_script


def main(argv: list[str] | None = None) -> dict:
    return run_script(cams_step, __doc__, argv)


if __name__ == "__main__":
    main()
