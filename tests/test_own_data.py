"""README's "Your own data" recipe, followed literally on a generated miniature: the folder
layout it names, the config folder it says to copy, the one edit it lists (``dataset.root``),
plus tiny sizes and epochs; and the mistakes a user can make on that path, one line each."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import REPO

CLASSES = ["background", "cat", "dog", "sofa"]
COLOURS = {1: (200, 60, 40), 2: (40, 200, 60), 3: (60, 40, 200)}
TINY = ["device=cpu", "num_workers=0", "ir_labels.num_workers=1", "train.epochs=1",
        "train.min_iterations=0", "train.batch_size=2", "data.resize_long=[64,64]",
        "data.crop_size=64",
        "data.input_long_side=64", "cams.input_long_side=64", "pseudo_masks.input_long_side=64",
        "cams.scales=[1.0]", "export.scales=[1.0]", "model.weights=none", "irn.weights=none",
        "model.encoder_weights=none"]


def make_own_dataset(root, num_train: int = 8, num_val: int = 3) -> None:
    """The recipe's layout: photos, two split lists, labels by class name, classes.txt, and
    masks for the val images only (so val is scored and train is not)."""
    for folder in ("JPEGImages", "ImageSets/Segmentation", "SegmentationClass"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for split, count in (("train", num_train), ("val", num_val)):
        ids = [f"{split}_photo {n}" if n == 0 else f"{split}_photo_{n}" for n in range(count)]
        for n, image_id in enumerate(ids):
            classes = [1 + n % 3] + ([1 + (n + 1) % 3] if n % 2 else [])
            image = Image.fromarray(rng.integers(0, 60, (48, 64, 3), dtype=np.uint8))
            mask = Image.new("L", (64, 48), 0)
            for k, class_id in enumerate(classes):
                box = [4 + 30 * k, 8, 28 + 30 * k, 40]
                ImageDraw.Draw(image).rectangle(box, fill=COLOURS[class_id])
                ImageDraw.Draw(mask).rectangle(box, fill=class_id)
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
            if split == "val":
                mask.save(root / "SegmentationClass" / f"{image_id}.png")
            labels[image_id] = [CLASSES[c] for c in classes]
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "cls_labels.json").write_text(json.dumps(labels, indent=1))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def copy_recipe_configs(tmp_path, root):
    """``cp -r configs/own_data configs/my_dataset`` and set ``dataset.root`` in its common.yaml."""
    config_dir = tmp_path / "configs" / "my_dataset"
    shutil.copytree(REPO / "configs" / "own_data", config_dir)
    common = config_dir / "common.yaml"
    text, count = re.subn(r"(?m)^  root: .*$", f"  root: {root}", common.read_text())
    assert count == 1, "the recipe's edit: one 'root:' line in common.yaml"
    common.write_text(text)
    return config_dir


def run_pipeline(config_dir, work_dir, *extra):
    return subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), str(config_dir),
                           f"work_dir={work_dir}", *TINY, *extra],
                          capture_output=True, text=True, cwd=REPO)


def test_the_recipe_runs_all_seven_steps_to_a_report(tmp_path):
    root = tmp_path / "my_dataset"
    make_own_dataset(root)
    work_dir = tmp_path / "run"
    proc = run_pipeline(copy_recipe_configs(tmp_path, root), work_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work_dir / "report.json").read_text())
    assert report["num_classes"] == 4
    assert set(report["stages"]) == {"segmentation"}  # only val has masks
    seg = report["stages"]["segmentation"]
    assert seg["images"] == 3 and list(seg["per_class_iou"]) == CLASSES
    assert len(list((work_dir / "5_pseudo_masks").glob("*.png"))) == 8
    assert (work_dir / "5_pseudo_masks" / "train_photo 0.png").is_file()  # an id with a space
    predictions = sorted(p.stem for p in (work_dir / "7_predictions").glob("*.png"))
    assert predictions == ["val_photo 0", "val_photo_1", "val_photo_2"]
    assert (work_dir / "examples.png").is_file()


def _unknown_class(root):
    labels = json.loads((root / "cls_labels.json").read_text())
    labels["train_photo_1"] = ["cat", "horse"]
    (root / "cls_labels.json").write_text(json.dumps(labels))


MISTAKES = {
    "unknown class name": (_unknown_class, ["cls_labels.json", "train_photo_1", "'horse'", "cat, dog, sofa"]),
    "no classes.txt": (lambda root: (root / "classes.txt").unlink(), ["classes.txt", "dataset.class_names"]),
    "no split list": (lambda root: (root / "ImageSets/Segmentation/val.txt").unlink(), ["val.txt"]),
    "no labels": (lambda root: (root / "cls_labels.json").unlink(), ["cls_labels.json", "train"]),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_mistake_on_the_recipe_path_is_one_line_naming_the_fix(tmp_path, mistake):
    root = tmp_path / "my_dataset"
    make_own_dataset(root, num_train=2, num_val=1)
    spoil, named = MISTAKES[mistake]
    spoil(root)
    proc = run_pipeline(copy_recipe_configs(tmp_path, root), tmp_path / "run")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().endswith(errors[0])
    assert all(word in errors[0] for word in named), errors[0]
    assert not (tmp_path / "run" / "1_classifier" / "best.pt").exists()
