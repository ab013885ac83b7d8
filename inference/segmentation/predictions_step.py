"""Step 7 inside the pipeline: run the standalone submission script on a dataset split.

The submission folder imports nothing from this repo, so the pipeline runs it exactly as a
user would, as a separate process, on a folder of image files. Generated datasets (toy)
have no files: their split is written out once as PNGs first.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from inference.segmentation.submit import generate_predictions as submit
from model_training.common.config import ConfigError, Schema, StepError
from model_training.common.checkpoints import read_checkpoint
from model_training.common.image_step import start_image_step
from model_training.common.image_step import summary_line as image_summary_line
from model_training.common.step_io import STEP_DIRS, write_or_stop

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
    The copy's folder is named by the dataset settings too: other settings (a toy of
    another size or seed) never reuse the images of an earlier run.
    """
    ids_file = Path(cfg.work_dir) / f"{source.split}_ids.txt"
    text = "\n".join(source.ids) + "\n"
    write_or_stop(ids_file, lambda tmp: Path(tmp).write_text(text))
    root = getattr(source, "root", None)
    if root is not None and (Path(root) / "JPEGImages").is_dir():
        return Path(root) / "JPEGImages", ids_file
    settings = json.dumps(dict(cfg.dataset), sort_keys=True, default=str).encode()
    folder = Path(cfg.work_dir) / f"images_{source.split}_{hashlib.sha256(settings).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for image_id in source.ids:
        path = folder / f"{image_id}.png"
        if not path.is_file():
            image = source.load_image(image_id)
            write_or_stop(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    return folder, ids_file


def check_classes(weights: Path, dataset_classes: list[str]) -> None:
    """The model predicts this dataset's classes, in its order: a model of another dataset
    would write its own class ids, and the report would score them as these."""
    names = read_checkpoint(weights, "export it again with step 6", keys=("class_names",))["class_names"]
    if list(names) != list(dataset_classes):
        raise StepError(f"{weights}: predicts the classes {list(names)}, this dataset has "
                        f"{list(dataset_classes)}: run step 6 on this dataset")


def step_inputs(cfg) -> dict[str, Path]:
    """What this step reads (``provenance``): step 6's folder, or the submission config named
    and the weights file it names (a new model.pt under the same YAML makes the step stale)."""
    if not cfg.predictions.config:
        return {"model": Path(cfg.work_dir) / STEP_DIRS[6]}
    config = Path(cfg.predictions.config)
    if not config.is_file():
        return {"model": config}  # run() says it is missing
    return {"model": config, "weights": named_weights(config)}


def named_weights(config: Path) -> Path:
    """The weights file a submission config names (relative: beside the config)."""
    try:
        return Path(submit.load_config(config)["weights"])
    except submit.UsageError as error:
        raise ConfigError(f"key 'predictions.config': {error}") from None


def run(cfg) -> dict:
    """Predict every image of ``predicted_split`` into ``7_predictions/``; returns a summary."""
    submit_config = Path(cfg.predictions.config or Path(cfg.work_dir) / STEP_DIRS[6]
                         / "export_config.yaml")
    if not submit_config.is_file():
        raise ConfigError(f"key 'predictions.config': submission config not found: {submit_config}")
    step = start_image_step(cfg, 7, predicted_split(cfg), ".png", DEFAULTS, step_inputs(cfg))
    check_classes(named_weights(submit_config), step.source.class_names)
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
