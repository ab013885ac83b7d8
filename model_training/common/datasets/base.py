"""The one interface every dataset offers the steps: images, image-level labels, masks.

A source is one split of one dataset. Steps wrap it into their own torch Dataset with the
transforms they need, so adding a dataset means writing one source class.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageLoadError(Exception):
    """An image or mask that cannot be read; the message names the file."""


class ImageSource:
    """One split of a dataset. Subclasses fill ``ids`` and implement the three loaders."""

    name: str = "dataset"
    class_names: list[str] = []
    ids: list[str] = []
    has_masks: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, image_id: str) -> np.ndarray:
        """uint8 HxWx3 RGB; raises ImageLoadError naming the file."""
        raise NotImplementedError

    def load_mask(self, image_id: str) -> np.ndarray | None:
        """uint8 HxW class ids, 255 = ignore; None where the split has no ground truth."""
        return None

    def labels(self, image_id: str) -> list[int]:
        """The image's foreground class ids (1..num_classes-1), as the training labels say."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)


class FolderSource(ImageSource):
    """A source whose images and masks are files: subclasses set ``mask_dir`` and say
    where an image lives (``image_path``)."""

    mask_dir: Path

    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def load_image(self, image_id: str) -> np.ndarray:
        path = self.image_path(image_id)
        if not path.is_file():
            raise ImageLoadError(f"image file not found: {path}")
        return read_rgb(path)

    def load_mask(self, image_id: str) -> np.ndarray | None:
        path = self.mask_dir / f"{image_id}.png"
        return read_mask(path) if path.is_file() else None


def read_rgb(path) -> np.ndarray:
    """Read any image file as uint8 RGB, turning every reader failure into ImageLoadError."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from None


def read_mask(path) -> np.ndarray:
    """A palette or grey PNG read as its raw indices (a palette image's indices are its ids)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                img = img.convert("L")
            return np.asarray(img).astype(np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageLoadError(f"cannot read mask {path}: {err}") from None


def labels_from_mask(mask: np.ndarray, num_classes: int) -> list[int]:
    """Image-level labels of a mask: its foreground classes (as IRNet derives VOC's)."""
    present = np.unique(mask)
    return [int(c) for c in present if 0 < c < num_classes]


def read_json(path: Path) -> Any:
    """A labels file's JSON; an unreadable one is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read labels file {path}: {err}") from None


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words, for errors about a file's shape."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds[type(value)]


def class_id_of(label: Any, class_index: Mapping[str, int], where: str) -> Any:
    """A label given by name as its id; any other label is left for check_label_ids."""
    if not isinstance(label, str):
        return label
    if label not in class_index:
        known = list(class_index)[1:]
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise ValueError(f"{where}: unknown class name {label!r} (classes: {shown})")
    return class_index[label]


def check_label_ids(labels: Any, num_classes: int, where: str) -> list[int]:
    """One image's class ids from a labels file, all integers in [0, num_classes): an id out
    of range or a fraction would otherwise be dropped or truncated without a word."""
    if not isinstance(labels, list):
        raise ValueError(f"{where}: labels must be a list of class ids, got {labels!r}")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"{where}: class id {label!r} is not an integer")
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: class id {label} out of range 0..{num_classes - 1}")
    return labels


def labels_to_vector(class_ids: Iterable[int], output_class_ids: Sequence[int]) -> np.ndarray:
    """Multi-hot float32 vector over a classifier's outputs (output i is class output_class_ids[i])."""
    index = {c: i for i, c in enumerate(output_class_ids)}
    vector = np.zeros(len(output_class_ids), dtype=np.float32)
    for c in class_ids:
        if c in index:
            vector[index[c]] = 1.0
    return vector
