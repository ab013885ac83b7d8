"""Step 4: train IRNet (class-boundary + displacement branches) on the IR labels of step 3.

    python model_training/cam_generation/train_irn.py --config configs/toy/4_irn.yaml [key=value ...]

Writes ``<work_dir>/4_irn/``: best.pt / last.pt, metrics.csv, tb/ and the resolved config.yaml.
"""
from model_training.cam_generation import irn_training
from model_training.common.step_cli import run_script


def main(argv: list[str] | None = None) -> dict:
    return run_script(irn_training, __doc__, argv)


if __name__ == "__main__":
    main()
