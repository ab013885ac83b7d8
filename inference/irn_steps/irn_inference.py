"""Step 5: IRNet boundaries + sparse random walk -> pseudo masks.

    python inference/irn_steps/irn_inference.py --config configs/toy/5_pseudo_masks.yaml [key=value ...]

Writes ``<work_dir>/5_pseudo_masks/<id>.png``: uint8 class ids at the image's size.
"""
from inference.irn_steps import pseudo_masks_step
from model_training.common.step_cli import run_script


def main(argv: list[str] | None = None) -> dict:
    return run_script(pseudo_masks_step, __doc__, argv)


if __name__ == "__main__":
    main()
