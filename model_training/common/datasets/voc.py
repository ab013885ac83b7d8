"""VOC-style folders (PASCAL VOC 2012, camvid-wsss, anything laid out the same way).

Layout: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (evaluation only),
ImageSets/Segmentation/<split>.txt, optional cls_labels.json ({"<id>": [class ids or names]}),
optional classes.txt (one name a line, background first).
"""
from __future__ import annotations

from pathlib import Path

from .base import (FolderSource, ImageLoadError, check_label_ids, class_id_of, json_kind,
                   labels_from_mask, read_json)

VOC2012_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

def read_class_names(root: Path, configured: list[str] | None, classes: str = "") -> list[str]:
    """The config's names, else VOC 2012's where ``dataset.classes`` is voc, else classes.txt:
    a folder without it is an error, not quietly a 21-class VOC model."""
    if configured:
        return list(configured)
    if classes == "voc":
        return list(VOC2012_CLASSES)
    if classes:
        raise ValueError(f"key 'dataset.classes' must be voc or empty, got {classes!r}")
    path = root / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path} (or set dataset.class_names, "
                                f"or dataset.classes: voc for the VOC 2012 names)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_id_list(path: Path) -> list[str]:
    """Image ids, one a line as in VOC's ImageSets/Segmentation, kept whole: an id may hold a
    space (a user's photo names), so only the line's ends are stripped."""
    text = Path(path).read_text(encoding="utf-8")
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:  # it would be trained, written and scored twice
            raise ValueError(f"id '{image_id}' is listed twice in {path}")
        seen.add(image_id)
    return ids


def read_split_ids(root: Path, split: str) -> list[str]:
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    return read_id_list(path)

class VOCSource(FolderSource):
    """One split of a VOC-style folder; labels from cls_labels.json or derived from masks."""

    def __init__(self, root, split: str, class_names: list[str] | None = None,
                 labels_file: str | None = None, name: str = "voc", classes: str = ""):
        self.root = Path(root)
        self.name = name
        self.split = split
        self.class_names = read_class_names(self.root, class_names, classes)
        self.ids = read_split_ids(self.root, split)
        self.mask_dir = self.root / "SegmentationClass"
        self.has_masks = self.mask_dir.is_dir() and all(
            (self.mask_dir / f"{i}.png").is_file() for i in self.ids[:20])
        labels_path = Path(labels_file) if labels_file else self.root / "cls_labels.json"
        self._labels = self._read_labels(labels_path) if labels_path.is_file() else None
        if self._labels is None and not self.has_masks:
            raise FileNotFoundError(
                f"no image-level labels for split '{split}': {labels_path} is missing "
                f"and {self.mask_dir} has no masks to derive them from")

    def _read_labels(self, path: Path) -> dict[str, list[int]]:
        """``{"<id>": [class ids or names]}``, every list checked against the classes."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"labels file {path} must hold an object of image ids to lists of "
                             f"class ids or names, not {json_kind(data)}")
        index = {name: n for n, name in enumerate(self.class_names)}
        labels = {}
        for image_id, names in data.items():
            where = f"labels file {path}: image '{image_id}'"
            names = [class_id_of(name, index, where) for name in names] \
                if isinstance(names, list) else names
            labels[str(image_id)] = check_label_ids(names, self.num_classes, where)
        return labels

    def image_path(self, image_id: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "JPEGImages" / f"{image_id}{suffix}"
            if path.is_file():
                return path
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def labels(self, image_id: str) -> list[int]:
        if self._labels is not None and image_id in self._labels:
            return [c for c in self._labels[image_id] if 0 < c < self.num_classes]
        mask = self.load_mask(image_id)
        if mask is None:
            raise ImageLoadError(f"no labels for image '{image_id}' and no mask to derive them")
        return labels_from_mask(mask, self.num_classes)
