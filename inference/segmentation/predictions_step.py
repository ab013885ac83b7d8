"""Step 7 inside the pipeline: run the standalone submission script on a dataset split.

The submission folder imports nothing from this repo, so the pipeline runs it exactly as a
user would, as a separate process, on a folder of image files. Generated datasets (toy)
have no files: their split is written out once as PNGs first.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from model_training.common.config import ConfigError, Schema, StepError
from model_training.common.image_step import start_image_step
from model_training.common.image_step import summary_line as image_summary_line
from model_training.common.step_io import STEP_DIRS, atomic_write

SUBMIT_DIR = Path(__file__).resolve().parent / "submit"

SHARDABLE = True

DEFAULTS = Schema({
    "predictions": {
        "split": None,  # None: dataset.test_split
        # The submission folder's own config (TTA scales, flip, input size, weights); None:
        # <work_dir>/6_segmentation/export_config.yaml, which step 6 writes beside model.pt.
        "config": None,
    },
}, types={"predictions.split": str, "predictions.config": str})


def predicted_split(cfg) -> str:
    """The split step 7 predicts: ``predictions.split``, else the dataset's test split."""
    return cfg.predictions.split or cfg.dataset.test_split


def split_image_folder(cfg, source) -> tuple[Path, Path]:
    """(DATA_DIR, ids file) for the script: the dataset's own images, or a written-out copy.

    The ids file keeps the split's order, so the script's ``--shard`` takes the images
    ``shard_ids`` gives this process; it is written atomically (shards write it at once).
    """
    ids_file = Path(cfg.work_dir) / f"{source.split}_ids.txt"
    text = "\n".join(source.ids) + "\n"
    atomic_write(ids_file, lambda tmp: Path(tmp).write_text(text))
    root = getattr(source, "root", None)
    if root is not None and (Path(root) / "JPEGImages").is_dir():
        return Path(root) / "JPEGImages", ids_file
    folder = Path(cfg.work_dir) / f"images_{source.split}"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for image_id in source.ids:
        path = folder / f"{image_id}.png"
        if not path.is_file():
            image = source.load_image(image_id)
            atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    return folder, ids_file


def step_inputs(cfg) -> dict[str, Path]:
    """What this step reads (``provenance``): step 6's folder, or the submission config named."""
    return {"model": Path(cfg.predictions.config) if cfg.predictions.config
            else Path(cfg.work_dir) / STEP_DIRS[6]}


def run(cfg) -> dict:
    """Predict every image of ``predicted_split`` into ``7_predictions/``; returns a summary."""
    submit_config = Path(cfg.predictions.config or Path(cfg.work_dir) / STEP_DIRS[6]
                         / "export_config.yaml")
    if not submit_config.is_file():
        raise ConfigError(f"key 'predictions.config': submission config not found: {submit_config}")
    step = start_image_step(cfg, 7, predicted_split(cfg), ".png", DEFAULTS, step_inputs(cfg))
    data_dir, ids_file = split_image_folder(cfg, step.source)
    command = [sys.executable, str(SUBMIT_DIR / "generate_predictions.py"), str(step.out_dir),
               str(data_dir), "--config", str(submit_config), "--device", cfg.device,
               "--ids", str(ids_file.resolve())]
    if cfg.shard:  # the script splits its shard again by torchrun rank, as shard_ids does
        command += ["--shard", cfg.shard]
    if cfg.overwrite:
        command.append("--overwrite")
    result = subprocess.run(command)
    if result.returncode != 0:
        raise StepError(f"generate_predictions.py exited with code {result.returncode} "
                        f"(its own message is above)")
    failed = [i for i in step.todo if not (step.out_dir / f"{i}.png").is_file()]
    return step.finish(len(step.todo) - len(failed), failed, split=step.source.split)


def summary_line(summary: dict) -> str:
    return f"{image_summary_line(STEP_DIRS[7], summary)}, split {summary['split']}"
