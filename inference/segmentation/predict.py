"""Step 7 with the pipeline's configs: the standalone submission folder on a dataset split.

    python inference/segmentation/predict.py --config configs/toy/7_submit.yaml [key=value ...]

Runs ``submit/generate_predictions.py`` (as a separate process: it imports nothing from this
repo) with step 6's ``model.pt`` and ``export_config.yaml`` on ``submit.split`` (default
``dataset.test_split``); writes ``<work_dir>/7_predictions/<id>.png``. On images outside any
dataset, call ``submit/generate_predictions.py SAVE_DIR DATA_DIR`` directly (INSTRUCTIONS.md).
"""
from inference.segmentation.predict_step import DEFAULTS, run
from model_training.common.config import exit_on_config_error, parse_step_args


def main(argv=None) -> dict:
    cfg = parse_step_args(DEFAULTS, __doc__, argv, shardable=True)
    summary = exit_on_config_error(run, cfg)
    print(f"7_predictions: {summary['written']} masks of split {summary['split']} "
          f"({summary['seconds']} s)")
    return summary


if __name__ == "__main__":
    main()
