"""VOC-style and LID sources, joint transforms."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model_training.common.config import ConfigError, Config, load_config
from model_training.common.datasets import build_source, labels_to_vector
from model_training.common.datasets.base import ImageLoadError
from model_training.common.transforms import build_transform


def make_voc(root, ids=("a", "b"), with_labels=True):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    for n, image_id in enumerate(ids):
        Image.fromarray(np.full((6, 8, 3), 40 * n, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        mask = np.zeros((6, 8), np.uint8)
        mask[:3] = n + 1
        mask[5, 7] = 255
        pal = Image.fromarray(mask, mode="P")
        pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
        pal.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    if with_labels:
        (root / "cls_labels.json").write_text(json.dumps({"a": [1], "b": [1, 2]}))


def test_voc_folder(tmp_path):
    make_voc(tmp_path)
    src = build_source(Config(name="voc", root=str(tmp_path)), "train")
    assert src.class_names == ["background", "cat", "dog"] and src.num_classes == 3
    assert src.ids == ["a", "b"] and src.has_masks
    assert src.labels("b") == [1, 2]
    assert src.load_image("a").shape == (6, 8, 3)
    mask = src.load_mask("b")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 2, 255}


def test_voc_labels_derived_from_masks(tmp_path):
    make_voc(tmp_path, with_labels=False)
    src = build_source(Config(name="voc", root=str(tmp_path)), "train")
    assert src.labels("a") == [1] and src.labels("b") == [2]


def test_voc_missing_split_is_config_error(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(ConfigError, match="val"):
        build_source(Config(name="voc", root=str(tmp_path)), "val")


def test_corrupt_image_names_file(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    src = build_source(Config(name="voc", root=str(tmp_path)), "train")
    with pytest.raises(ImageLoadError, match="a.jpg"):
        src.load_image("a")


def test_voc_without_classes_txt_is_an_error_unless_told(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(ConfigError, match=f"class list not found: {tmp_path / 'classes.txt'}"):
        build_source(Config(name="voc", root=str(tmp_path), classes=""), "train")
    named = build_source(Config(name="voc", root=str(tmp_path), class_names=["bg", "a", "b"]),
                         "train")
    assert named.class_names == ["bg", "a", "b"]
    cfg = load_config(None, [f"dataset={json.dumps({'name': 'voc', 'root': str(tmp_path)})}",
                             "dataset.classes=voc"])
    voc = build_source(cfg.dataset, "train")
    assert voc.num_classes == 21 and voc.class_names[-1] == "tvmonitor"
    with pytest.raises(ConfigError, match="key 'dataset.classes' must be voc or empty, got 'coco'"):
        build_source(Config(name="voc", root=str(tmp_path), classes="coco"), "train")


@pytest.mark.parametrize("labels, message", [
    ({"a": [1], "b": [9]}, "image 'b': class id 9 out of range 0..2"),
    ({"a": [-1]}, "image 'a': class id -1 out of range 0..2"),
    ({"a": [2.7]}, "image 'a': class id 2.7 is not an integer"),
    ({"a": 1}, "image 'a': labels must be a list of class ids, got 1"),
    ([["a", [1]]], "must hold an object of image ids to lists of class ids or names, not a list"),
    (3, "must hold an object of image ids to lists of class ids or names, not a number"),
    (None, "must hold an object of image ids to lists of class ids or names, not null"),
])
def test_voc_bad_labels_name_file_image_and_value(tmp_path, labels, message):
    make_voc(tmp_path)
    (tmp_path / "cls_labels.json").write_text(json.dumps(labels))
    with pytest.raises(ConfigError) as err:
        build_source(Config(name="voc", root=str(tmp_path)), "train")
    assert str(tmp_path / "cls_labels.json") in str(err.value) and str(err.value).endswith(message)


def test_voc_labels_by_class_name_and_an_unknown_name(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "cls_labels.json").write_text(json.dumps({"a": ["cat"], "b": ["dog", 1]}))
    src = build_source(Config(name="voc", root=str(tmp_path)), "train")
    assert src.labels("a") == [1] and src.labels("b") == [2, 1]
    (tmp_path / "cls_labels.json").write_text(json.dumps({"a": ["cat"], "b": ["horse"]}))
    with pytest.raises(ConfigError) as err:
        build_source(Config(name="voc", root=str(tmp_path)), "train")
    assert str(err.value).endswith("image 'b': unknown class name 'horse' (classes: cat, dog)")


def test_voc_split_ids_are_kept_whole_and_a_duplicate_is_refused(tmp_path):
    make_voc(tmp_path, ids=("photo 1", "b"), with_labels=False)
    src = build_source(Config(name="voc", root=str(tmp_path)), "train")
    assert src.ids == ["photo 1", "b"] and src.load_image("photo 1").shape == (6, 8, 3)
    split = tmp_path / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text("photo 1\nb\n  photo 1 \n")
    with pytest.raises(ConfigError, match=f"id 'photo 1' is listed twice in {split}"):
        build_source(Config(name="voc", root=str(tmp_path)), "train")


def test_camvid_reads_unchanged(camvid_root):
    src = build_source(Config(name="voc", root=str(camvid_root)), "train")
    assert src.num_classes == 7 and len(src.ids) == 1468
    image_id = src.ids[2]
    image, mask = src.load_image(image_id), src.load_mask(image_id)
    assert image.shape == (180, 240, 3) and mask.shape == (180, 240)
    assert set(src.labels(image_id)) <= set(np.unique(mask).tolist())


def test_lid_json_and_xml(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nn001 accordion\nn002 airplane\n")
    (tmp_path / "Data" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "Data" / "train" / "x1.JPEG")
    (tmp_path / "train.json").write_text(json.dumps([["Data/train/x1.JPEG", ["airplane", 1]]]))
    src = build_source(Config(name="lid", root=str(tmp_path)), "train")
    assert src.class_names == ["background", "accordion", "airplane"]
    assert src.labels("x1") == [1, 2] and src.load_image("x1").shape == (5, 5, 3)

    (tmp_path / "train.json").unlink()
    ann = tmp_path / "Annotations" / "train"
    ann.mkdir(parents=True)
    (ann / "x1.xml").write_text("<annotation><object><name>n002</name></object>"
                                "<object><name>n999</name></object></annotation>")
    src = build_source(Config(name="lid", root=str(tmp_path)), "train")
    assert src.labels("x1") == [2] and src.load_image("x1").shape == (5, 5, 3)


def test_lid_folder_split_labels_come_from_its_masks(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nn001 accordion\nn002 airplane\n")
    for split in ("val", "test"):
        (tmp_path / split).mkdir()
        for image_id in ("v1", "v2"):
            Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / split / f"{image_id}.JPEG")
    (tmp_path / "val_masks").mkdir()
    mask = np.zeros((4, 6), np.uint8)
    mask[0], mask[1, :2], mask[3] = 2, 1, 255
    Image.fromarray(mask).save(tmp_path / "val_masks" / "v1.png")
    val = build_source(Config(name="lid", root=str(tmp_path)), "val")
    assert val.ids == ["v1", "v2"] and val.has_masks and val.labels("v1") == [1, 2]
    with pytest.raises(ImageLoadError, match=f"image 'v2': mask file not found: {tmp_path}/val_masks/v2.png"):
        val.labels("v2")
    test = build_source(Config(name="lid", root=str(tmp_path)), "test")
    assert not test.has_masks and test.labels("v1") == []
    (tmp_path / "val.json").write_text(json.dumps([["val/v1.JPEG", ["accordion"]]]))
    assert build_source(Config(name="lid", root=str(tmp_path)), "val").labels("v1") == [1]


def test_lid_reads_imagenet_det_layout_and_split_patterns(tmp_path):
    """ILSVRC's own tree: dataset.root is the ILSVRC folder, the split DET/train (or a glob
    of its subfolders, e.g. the 2014 images alone)."""
    (tmp_path / "classes.txt").write_text("background\nn001 accordion\nn00007846 person\n")
    images = {"ILSVRC2013_train/n001/n001_7": "n001", "ILSVRC2014_train_0000/ILSVRC2014_train_00000003": "n00007846"}
    for rel, wnid in images.items():
        xml = tmp_path / "Annotations" / "DET" / "train" / f"{rel}.xml"
        jpeg = tmp_path / "Data" / "DET" / "train" / f"{rel}.JPEG"
        xml.parent.mkdir(parents=True)
        jpeg.parent.mkdir(parents=True)
        xml.write_text(f"<annotation><object><name>{wnid}</name></object></annotation>")
        Image.fromarray(np.zeros((3, 5, 3), np.uint8)).save(jpeg, format="JPEG")
    src = build_source(Config(name="lid", root=str(tmp_path)), "DET/train")
    assert src.class_names == ["background", "accordion", "person"]
    assert src.ids == ["ILSVRC2014_train_00000003", "n001_7"] and not src.has_masks
    assert src.labels("n001_7") == [1] and src.labels("ILSVRC2014_train_00000003") == [2]
    assert src.load_image("n001_7").shape == (3, 5, 3)
    subset = build_source(Config(name="lid", root=str(tmp_path)), "DET/train/ILSVRC2014_train_*")
    assert subset.ids == ["ILSVRC2014_train_00000003"]
    assert subset.load_image(subset.ids[0]).shape == (3, 5, 3)
    with pytest.raises(ConfigError, match=f"no labels for split 'DET/val': none of .*{tmp_path}/DET/val$"):
        build_source(Config(name="lid", root=str(tmp_path)), "DET/val")


def test_lid_unknown_class_name_is_config_error(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nn001 accordion\n")
    (tmp_path / "train.json").write_text(json.dumps([["x.JPEG", ["banjo"]]]))
    with pytest.raises(ConfigError, match="banjo"):
        build_source(Config(name="lid", root=str(tmp_path)), "train")


@pytest.mark.parametrize("entries, message", [
    ([["Data/x.JPEG", [9]]], "image 'x': class id 9 out of range 0..1"),
    ([["Data/x.JPEG", [1.5]]], "image 'x': class id 1.5 is not an integer"),
    ([["Data/x.JPEG", 1]], "entry ['Data/x.JPEG', 1] is not a [path, [labels]] pair"),
    ({"x": [1]}, "must hold a list of [path, [labels]] pairs, not an object"),
])
def test_lid_bad_labels_name_file_image_and_value(tmp_path, entries, message):
    (tmp_path / "classes.txt").write_text("background\nn001 accordion\n")
    (tmp_path / "train.json").write_text(json.dumps(entries))
    with pytest.raises(ConfigError) as err:
        build_source(Config(name="lid", root=str(tmp_path)), "train")
    assert str(tmp_path / "train.json") in str(err.value) and str(err.value).endswith(message)


def test_labels_to_vector_over_outputs():
    assert labels_to_vector([2, 5], [1, 2, 3, 5]).tolist() == [0, 1, 0, 1]
    assert labels_to_vector([4], [1, 2]).tolist() == [0, 0]  # excluded class dropped


def test_joint_transform_keeps_masks_exact():
    torch.manual_seed(0)
    image = np.random.randint(0, 255, (40, 60, 3), np.uint8)
    mask = np.random.randint(0, 4, (40, 60)).astype(np.uint8)
    transform = build_transform(True, crop_size=96, resize_long=(50, 80), scale_range=(0.7, 1.3),
                                color_jitter=0.3)
    for _ in range(5):
        x, y = transform(image, mask)
        assert x.shape == (3, 96, 96) and y.shape == (96, 96)
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest: no blended ids
        assert (y == 255).any()  # the crop is larger than the image: padded with ignore
    x, y = build_transform(False)(image, mask)
    assert torch.equal(y, torch.from_numpy(mask).long())
    assert x.shape == (3, 40, 60) and abs(float(x.mean())) < 3


def _blob_mask(height: int = 120, width: int = 160) -> np.ndarray:
    """Background with ignore pixels along the top and a 3x3 class-2 blob in the far corner."""
    mask = np.zeros((height, width), np.uint8)
    mask[:10] = 255
    mask[-4:-1, -4:-1] = 2
    return mask


def test_class_crop_one_centres_every_crop_on_a_mask_class():
    torch.manual_seed(0)
    image = np.random.randint(0, 255, (120, 160, 3), np.uint8)
    centred = build_transform(True, crop_size=32, hflip=False, class_crop=1.0)
    plain = build_transform(True, crop_size=32, hflip=False)
    holds_blob = [bool((centred(image, _blob_mask())[1] == 2).any()) for _ in range(20)]
    plain_holds = [bool((plain(image, _blob_mask())[1] == 2).any()) for _ in range(20)]
    assert all(holds_blob)
    assert sum(plain_holds) < 5  # a plain random crop rarely reaches the corner


def test_class_crop_never_centres_on_ignore():
    """A mask of background and ignore only holds no class to centre on: every crop is the
    plain random one, so the ignore band along the top is in some crops and not in others
    (centred on it, every crop would hold it). The test above shows background is never
    chosen: half its crops would then miss the corner blob."""
    torch.manual_seed(0)
    image = np.random.randint(0, 255, (120, 160, 3), np.uint8)
    mask = _blob_mask()
    mask[mask == 2] = 0
    transform = build_transform(True, crop_size=32, hflip=False, class_crop=1.0)
    with_ignore = [bool((transform(image, mask)[1] == 255).any()) for _ in range(30)]
    assert 0 < sum(with_ignore) < 30


def test_class_crop_larger_than_the_image_is_padded_with_ignore():
    torch.manual_seed(0)
    image = np.random.randint(0, 255, (20, 30, 3), np.uint8)
    transform = build_transform(True, crop_size=48, hflip=False, class_crop=1.0)
    for _ in range(5):
        x, y = transform(image, _blob_mask(20, 30))
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        assert int((y == 2).sum()) == 9 and int((y == 0).sum()) == 20 * 30 - 10 * 30 - 9
