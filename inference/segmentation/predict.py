"""Step 7 with the pipeline's configs: the standalone submission folder on a dataset split.

    python inference/segmentation/predict.py --config configs/toy/7_predictions.yaml [key=value ...]

Runs ``submit/generate_predictions.py`` (as a separate process: it imports nothing from this
repo) with step 6's ``model.pt`` and ``export_config.yaml`` on ``predictions.split`` (default
``dataset.test_split``); writes ``<work_dir>/7_predictions/<id>.png``. On images outside any
dataset, call ``submit/generate_predictions.py SAVE_DIR DATA_DIR`` directly (INSTRUCTIONS.md).
"""
from inference.segmentation import predictions_step
from model_training.common.step_cli import run_script


def main(argv: list[str] | None = None) -> dict:
    return run_script(predictions_step, __doc__, argv)


if __name__ == "__main__":
    main()
