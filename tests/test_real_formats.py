"""The committed configs of real datasets, run end to end on generated miniatures in the exact
file formats, so a broken key or a format the loaders misread fails here and not on a user's
download. Only sizes, epochs, weights and the root are overridden."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model_training.common.config import Config
from model_training.common.datasets import build_source
from tests.conftest import REPO

TINY = ["device=cpu", "num_workers=0", "ir_labels.num_workers=1", "train.epochs=1",
        "train.batch_size=2", "data.resize_long=[64,64]", "data.crop_size=64",
        "data.input_long_side=64", "cams.scales=[1.0]", "export.scales=[1.0]",
        "cams.input_long_side=64",  # configs/lid's CAMs see 352 pixels
        "model.weights=none", "irn.weights=none", "model.encoder_weights=none",
        "model.freeze_bn=false"]  # frozen BatchNorm needs trained statistics: none here


def run_configs(dataset: str, root, work_dir) -> tuple[str, dict]:
    """``run_pipeline.py configs/<dataset>`` on ``root`` at TINY sizes: (its stdout, report)."""
    proc = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), str(REPO / "configs" / dataset),
                           f"dataset.root={root}", f"work_dir={work_dir}", *TINY],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((Path(work_dir) / "report.json").read_text())


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
    _, report = run_configs("voc12", root, work_dir)
    assert report["num_classes"] == 21
    assert set(report["stages"]) == {"cam", "ir_label", "pseudo_mask", "segmentation"}
    assert report["stages"]["segmentation"]["images"] == 3
    assert list(report["stages"]["cam"]["per_class_iou"])[15] == "person"
    predictions = sorted((work_dir / "7_predictions").glob("*.png"))
    assert [p.stem for p in predictions] == [f"2007_val{n:02d}" for n in range(3)]
    assert all(np.asarray(Image.open(p)).shape == (48, 64) for p in predictions)
    config = (work_dir / "3_ir_labels" / "config.yaml").read_text()
    assert "conf_fg_thres: 0.3" in config and "conf_bg_thres: 0.05" in config


# WordNet ids of DET classes (classes.txt order = the mask ids), and one DET class this
# miniature leaves out of classes.txt: its objects are skipped.
LID_CLASSES = [("n02672831", "accordion"), ("n02691156", "airplane"), ("n02219486", "ant"),
               ("n00007846", "person")]
UNLISTED_WNID = "n02769748"  # backpack
DET_TRAIN = {  # image path under Data/DET/train (and Annotations/DET/train): WordNet ids
    "ILSVRC2013_train/n02672831/n02672831_12": ["n02672831"],
    "ILSVRC2013_train/n02691156/n02691156_40": ["n02691156", "n02691156"],
    "ILSVRC2013_train/n02219486/n02219486_7": ["n02219486", "n00007846"],
    "ILSVRC2013_train_extra3/ILSVRC2013_train_00030021": [UNLISTED_WNID, "n02672831"],
    "ILSVRC2014_train_0000/ILSVRC2014_train_00000003": ["n00007846", "n02691156"],
    "ILSVRC2014_train_0000/ILSVRC2014_train_00000017": ["n02219486"],
    "ILSVRC2014_train_0001/ILSVRC2014_train_00010002": ["n00007846"],
}
LID_IMAGES = {"val": {"ILSVRC2012_val_00000011": (48, 64), "ILSVRC2012_val_00000425": (64, 48),
                      "ILSVRC2013_val_00001204": (40, 56)},
              "test": {"ILSVRC2012_test_00000003": (56, 40), "ILSVRC2012_test_00000196": (48, 64)}}


def det_xml(folder: str, name: str, size: tuple[int, int], objects) -> str:
    """An ImageNet-DET annotation as the DET release writes it (boxes xmin, xmax, ymin, ymax)."""
    boxes = "".join(f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n"
                    f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymin>{y0}</ymin>\n\t\t\t<ymax>{y1}</ymax>\n"
                    f"\t\t</bndbox>\n\t</object>\n" for wnid, (x0, y0, x1, y1) in objects)
    return (f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{name}</filename>\n"
            f"\t<source>\n\t\t<database>ILSVRC_2014</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{size[1]}</width>\n\t\t<height>{size[0]}</height>\n\t</size>\n"
            f"{boxes}</annotation>\n")


def make_lid(root) -> None:
    """The ILSVRC folder of ImageNet-DET (XML annotations with WordNet ids, JPEG photos; the
    2014 images are the person classifier's reliable subset) with LID 2020 track 1 beside it:
    val/ and test/ JPEG folders, val_masks/ as grey PNGs of class ids with 255 borders, and
    classes.txt ("<WordNet id> <name>", background first)."""
    rng = np.random.default_rng(0)
    wnid_ids = {wnid: n + 1 for n, (wnid, _) in enumerate(LID_CLASSES)}
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(["background"] + [" ".join(c) for c in LID_CLASSES]) + "\n")

    def draw(size, class_ids, path, mask_path=None):
        image = Image.fromarray(rng.integers(0, 80, (*size, 3), dtype=np.uint8))
        mask = Image.new("L", size[::-1], 0)
        boxes = []
        for k, class_id in enumerate(class_ids):
            box = (3 + 22 * k, 4, min(22 + 22 * k, size[1] - 3), size[0] - 5)
            ImageDraw.Draw(image).rectangle(box, fill=(60 * (class_id % 5), 200, 40 * class_id))
            ImageDraw.Draw(mask).rectangle(box, fill=class_id, outline=255)
            boxes.append(box)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG", quality=90)
        if mask_path is not None:
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            mask.save(mask_path)
        return boxes

    for rel, wnids in DET_TRAIN.items():
        size = (48, 64)
        boxes = draw(size, [wnid_ids.get(w, 5) for w in wnids], root / "Data/DET/train" / f"{rel}.JPEG")
        xml = root / "Annotations/DET/train" / f"{rel}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(det_xml(Path(rel).parent.name, Path(rel).name, size, zip(wnids, boxes)))
    for split, images in LID_IMAGES.items():
        for n, (image_id, size) in enumerate(images.items()):
            masks = root / f"{split}_masks" / f"{image_id}.png" if split == "val" else None
            people = [4] if n != 1 else []  # a person in all but one
            draw(size, people + [1 + n % 3], root / split / f"{image_id}.JPEG", masks)


def test_lid_configs_run_all_seven_steps_and_the_person_route_on_a_lid_miniature(tmp_path):
    root = tmp_path / "ILSVRC"
    make_lid(root)
    work_dir = tmp_path / "run"
    stdout, report = run_configs("lid", root, work_dir)
    assert report["num_classes"] == 5
    assert set(report["stages"]) == {"segmentation"}  # DET train has no masks to score
    assert report["stages"]["segmentation"]["images"] == 3
    assert list(report["stages"]["segmentation"]["per_class_iou"])[4] == "person"
    # The main classifier lost the person and its 3 images; the person's trained on the 2014 ones.
    main = json.loads((work_dir / "1_classifier" / "done.json").read_text())
    person = json.loads((work_dir / "1_classifier_person" / "done.json").read_text())
    assert main["class_ids"] == [1, 2, 3] and main["num_train_images"] == 4
    assert person["class_ids"] == [4] and person["num_train_images"] == 3
    assert (work_dir / "1_classifier_person" / "best.pt").is_file()
    assert 0.0 <= report["extra_classifiers"]["person"]["val_map"] <= 1.0
    assert "person classifier (val mAP x100)" in stdout
    assert len(list((work_dir / "2_cams").glob("*.npz"))) == len(DET_TRAIN)
    config = (work_dir / "2_cams" / "config.yaml").read_text()
    assert "method: gradcam++" in config and "- person" in config
    predictions = sorted((work_dir / "7_predictions").glob("*.png"))
    assert [p.stem for p in predictions] == sorted(LID_IMAGES["val"])
    assert all(np.asarray(Image.open(p)).shape == LID_IMAGES["val"][p.stem] for p in predictions)
    test = build_source(Config(name="lid", root=str(root)), "test")  # step 7 with predictions.split=test
    assert test.ids == sorted(LID_IMAGES["test"]) and not test.has_masks and test.labels(test.ids[0]) == []
