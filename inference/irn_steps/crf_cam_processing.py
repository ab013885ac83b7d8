"""Step 3: refine the CAMs of step 2 with a dense CRF into IRNet labels.

    python inference/irn_steps/crf_cam_processing.py --config configs/toy/3_crf.yaml [key=value ...]

Writes ``<work_dir>/3_ir_labels/<id>.png``: 0 background, c class c, 255 unsure.
"""
from inference.common.ir_label_step import DEFAULTS, run
from model_training.common.config import exit_on_config_error, parse_step_args


def main(argv=None) -> dict:
    cfg = parse_step_args(DEFAULTS, __doc__, argv, shardable=True)
    summary = exit_on_config_error(run, cfg)
    print(f"3_ir_labels: {summary['written']} written, {len(summary['failed'])} failed, "
          f"{summary['skipped_existing']} already there ({summary['seconds']} s)")
    return summary


if __name__ == "__main__":
    main()
