"""LID 2020 / ImageNet-DET: 200 classes + background, labels from a JSON list or DET XML.

Training labels come either from a JSON list ``[[relative/path.JPEG, [labels]], ...]``
(labels as class ids or class names) or from the DET ``Annotations/<split>/**/*.xml`` files
(object ``<name>`` = WordNet id, mapped through ``classes.txt``); the split may be a glob
pattern, so ``DET/train/ILSVRC2014_train_*`` names DET's 2014 images alone. Val/test images
are a folder ``<split>/``, their masks PNGs named after the image in ``<split>_masks/``,
which also give a folder split its image-level labels.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .base import (FolderSource, ImageLoadError, check_label_ids, class_id_of, json_kind,
                   labels_from_mask,
                   read_json)

IMAGE_SUFFIXES = (".JPEG", ".jpg", ".jpeg", ".png")

def _class_index(class_names: list[str]) -> dict[str, int]:
    """Both names and ids in ``classes.txt`` lines like 'n02672831 accordion' resolve."""
    index: dict[str, int] = {}
    for i, line in enumerate(class_names):
        for token in line.replace(",", " ").split():
            index.setdefault(token, i)
        index.setdefault(line, i)
    return index

def read_json_list(path: Path, class_index: dict[str, int],
                   num_classes: int) -> dict[str, tuple[str, list[int]]]:
    """``[[path, [labels]]]`` -> {id: (path, class ids)}; an unknown class name, an id out
    of range or an entry of another shape is an error naming the file and the image."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"labels file {path} must hold a list of [path, [labels]] pairs, "
                         f"not {json_kind(entries)}")
    out: dict[str, tuple[str, list[int]]] = {}
    for entry in entries:
        pair = isinstance(entry, list) and len(entry) == 2
        if not (pair and isinstance(entry[0], str) and isinstance(entry[1], list)):
            raise ValueError(f"labels file {path}: entry {entry!r} is not a [path, [labels]] pair")
        rel_path, labels = entry
        where = f"labels file {path}: image '{Path(rel_path).stem}'"
        ids = check_label_ids([class_id_of(label, class_index, where) for label in labels],
                              num_classes, where)
        out[Path(rel_path).stem] = (rel_path, sorted(set(ids)))
    return out

def read_det_xml(path: Path, class_index: dict[str, int]) -> list[int]:
    """Class ids of the objects in one DET annotation (unknown WordNet ids are skipped)."""
    root = ET.parse(path).getroot()
    names = [obj.findtext("name") for obj in root.iter("object")]
    return sorted({class_index[n] for n in names if n in class_index})

class LIDSource(FolderSource):
    """One split of LID: ``train`` from the JSON list or XMLs, ``val``/``test`` from folders
    (labels from their masks where the split has them, else none)."""

    def __init__(self, root, split: str, class_names: list[str] | None = None,
                 labels_file: str | None = None, name: str = "lid"):
        self.root = Path(root)
        self.name = name
        self.split = split
        names_file = self.root / "classes.txt"
        if class_names:
            lines = list(class_names)
        elif names_file.is_file():
            lines = [l.strip() for l in names_file.read_text().splitlines() if l.strip()]
        else:
            raise FileNotFoundError(f"class list not found: {names_file}")
        self.class_names = [line.split()[-1] for line in lines]
        index = _class_index(lines)
        # (relative image path, class ids); None: an image folder's, read from its mask
        self._entries: dict[str, tuple[str, list[int] | None]] = {}
        labels_path = Path(labels_file) if labels_file else self.root / f"{split}.json"
        ann_root = self.root / "Annotations"
        ann_dirs = sorted(p for p in ann_root.glob(split) if p.is_dir())
        if labels_path.is_file():
            self._entries = read_json_list(labels_path, index, len(self.class_names))
        elif ann_dirs:
            for xml in sorted(x for d in ann_dirs for x in d.rglob("*.xml")):
                rel = xml.relative_to(ann_root).with_suffix("")
                self._entries[xml.stem] = (str(Path("Data") / rel), read_det_xml(xml, index))
        else:
            image_dir = self.root / split
            if not image_dir.is_dir():
                raise FileNotFoundError(f"no labels for split '{split}': none of {labels_path}, "
                                        f"{ann_root / split}, {image_dir}")
            for path in sorted(p for p in image_dir.rglob("*") if p.suffix in IMAGE_SUFFIXES):
                self._entries[path.stem] = (str(path.relative_to(self.root)), None)
        self.ids = sorted(self._entries)
        self.mask_dir = self.root / f"{split}_masks"
        self.has_masks = self.mask_dir.is_dir()

    def image_path(self, image_id: str) -> Path:
        rel = Path(self._entries[image_id][0])
        path = self.root / rel
        if path.suffix:
            return path
        for suffix in IMAGE_SUFFIXES:
            if path.with_suffix(suffix).is_file():
                return path.with_suffix(suffix)
        return path.with_suffix(".JPEG")

    def labels(self, image_id: str) -> list[int]:
        labels = self._entries[image_id][1]
        if labels is not None:
            return list(labels)
        if not self.has_masks:
            return []
        mask = self.load_mask(image_id)
        if mask is None:
            raise ImageLoadError(f"no labels for image '{image_id}': mask file not found: "
                                 f"{self.mask_dir / image_id}.png")
        return labels_from_mask(mask, self.num_classes)
