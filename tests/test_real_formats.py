"""The committed configs of real datasets, run end to end on generated miniatures in the exact
file formats, so a broken key or a format the loaders misread fails here and not on a user's
download. Only sizes, epochs, weights and the root are overridden."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import REPO

TINY = ["device=cpu", "num_workers=0", "crf.num_workers=1", "train.epochs=1",
        "train.batch_size=2", "data.resize_long=[64,64]", "data.crop_size=64",
        "data.input_long_side=64", "cam.scales=[1.0]", "export.scales=[1.0]",
        "model.weights=none", "irn.weights=none", "model.encoder_weights=none",
        "model.freeze_bn=false"]  # frozen BatchNorm needs trained statistics: none here


def voc_palette() -> list[int]:
    """VOC's colour map: class c's RGB bits come from c's bits, three at a time."""
    palette = []
    for c in range(256):
        r = g = b = 0
        for shift in range(8):
            r |= ((c >> (3 * shift)) & 1) << (7 - shift)
            g |= ((c >> (3 * shift + 1)) & 1) << (7 - shift)
            b |= ((c >> (3 * shift + 2)) & 1) << (7 - shift)
        palette += [r, g, b]
    return palette


def make_voc2012(root, splits: dict[str, int]) -> None:
    """A VOCdevkit/VOC2012 layout: JPEG photos, palette-PNG masks with a 255 border around
    each object (as VOC draws it), ImageSets/Segmentation lists, no classes.txt."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = voc_palette()
    for split, count in splits.items():
        ids = [f"2007_{split}{n:02d}" for n in range(count)]
        for n, image_id in enumerate(ids):
            image = Image.fromarray(rng.integers(0, 80, (48, 64, 3), dtype=np.uint8))
            mask = Image.new("P", (64, 48), 0)
            for k, class_id in enumerate((15, 1 + n % 20)):  # person, then another class
                box = [4 + 30 * k, 6, 28 + 30 * k, 40]
                ImageDraw.Draw(image).rectangle(box, fill=tuple(palette[3 * class_id: 3 * class_id + 3]))
                ImageDraw.Draw(mask).rectangle(box, fill=class_id, outline=255)
            mask.putpalette(palette)
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
            mask.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def test_palette_matches_voc_colours():
    palette = voc_palette()
    assert palette[3:6] == [128, 0, 0] and palette[15 * 3: 15 * 3 + 3] == [192, 128, 128]
    assert palette[255 * 3: 255 * 3 + 3] == [224, 224, 192]


def test_voc12_configs_run_all_seven_steps_on_a_voc2012_miniature(tmp_path):
    root = tmp_path / "VOC2012"
    make_voc2012(root, {"train": 6, "val": 3})
    work_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), str(REPO / "configs" / "voc12"),
                           f"dataset.root={root}", f"work_dir={work_dir}", *TINY],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work_dir / "report.json").read_text())
    assert report["num_classes"] == 21
    assert set(report["stages"]) == {"cam", "ir_label", "pseudo_mask", "segmentation"}
    assert report["stages"]["segmentation"]["images"] == 3
    assert list(report["stages"]["cam"]["per_class_iou"])[15] == "person"
    predictions = sorted((work_dir / "7_predictions").glob("*.png"))
    assert [p.stem for p in predictions] == [f"2007_val{n:02d}" for n in range(3)]
    assert all(np.asarray(Image.open(p)).shape == (48, 64) for p in predictions)
    config = (work_dir / "3_ir_labels" / "config.yaml").read_text()
    assert "conf_fg_thres: 0.3" in config and "conf_bg_thres: 0.05" in config
