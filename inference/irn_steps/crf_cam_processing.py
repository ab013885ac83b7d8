"""Step 3: refine the CAMs of step 2 with a dense CRF into IRNet labels.

    python inference/irn_steps/crf_cam_processing.py --config configs/toy/3_ir_labels.yaml [key=value ...]

Writes ``<work_dir>/3_ir_labels/<id>.png``: 0 background, c class c, 255 unsure.
"""
from inference.irn_steps import ir_labels_step
from model_training.common.step_cli import run_script


def main(argv: list[str] | None = None) -> dict:
    return run_script(ir_labels_step, __doc__, argv)


if __name__ == "__main__":
    main()
