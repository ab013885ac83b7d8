"""Embedded toy dataset: cluttered synthetic scenes generated on the fly from a seed.

It lets the whole pipeline run (and be tested) with no download. Image ``i`` of a split
depends only on ``(seed, split, i)``, so load order and worker count never change it.
Classes differ by *shape only*: colour and texture are drawn independently of the class,
and backgrounds carry textures and clutter (lines, dots, squiggles) that stay background,
so a classifier has to learn shapes. The data also has the two problems the method targets:
uneven class frequencies, and a frequent person-like class whose image-level label is
missing in a share of the images where it is present (its mask pixels are always kept).
"""
from __future__ import annotations

import colorsys
import zlib
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from ..config import COMMON_DEFAULTS
from .base import ImageLoadError, ImageSource, labels_from_mask

CLASS_NAMES = ["background", "person", "disc", "square", "triangle", "cross", "ring"]
PERSON = 1

# Defaults of the ``dataset.toy`` config section.
TOY_DEFAULTS: dict[str, Any] = COMMON_DEFAULTS["dataset"]["toy"]

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Scene statistics. Person is in ~45% of images, ring (the rare class) in ~8%.
_PERSON_RATE = 0.48
_OTHER_CLASSES = np.array([2, 3, 4, 5, 6])
_OTHER_WEIGHTS = np.array([0.29, 0.26, 0.22, 0.195, 0.035])
# Image i always holds class (i % _FORCE_PERIOD) when that is a class id, so every class
# appears in any split of at least _FORCE_PERIOD images whatever the seed.
_FORCE_PERIOD = 25
_OBJECT_COUNTS = np.array([1, 2, 3])
_OBJECT_COUNT_PROBS = np.array([0.3, 0.4, 0.3])
_SIZE_RANGE = (0.3, 0.62)  # object extent as a share of the image's short side
_MIN_VISIBLE = 0.55  # an occluded object keeps at least this share of its own area
_PLACEMENT_TRIES = 20
_MIN_CONTRAST = 70.0  # RGB distance between an object's mean colour and what it covers
# Renders kept per process (a DataLoader worker has its own): up to this many bytes, so
# the default toy splits render once per worker, not once per epoch (4-5 ms an image).
_CACHE_BYTES = 128 * 2**20

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel shape geometry
_ONE = 1 << _SHIFT


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points) * _ONE).astype(np.int32)


def _pose(points: np.ndarray, center: np.ndarray, angle: float) -> np.ndarray:
    """Rotate local (x, y) points by ``angle`` and move them to ``center``."""
    cos, sin = np.cos(angle), np.sin(angle)
    return np.asarray(points, np.float64) @ np.array([[cos, sin], [-sin, cos]]) + center


def _draw_disc(canvas, rng, center, radius, angle):
    axes = (radius, radius * rng.uniform(0.85, 1.0))
    cv2.ellipse(canvas, tuple(_fixed(center)), tuple(_fixed(axes)), np.degrees(angle),
                0, 360, 1, -1, cv2.LINE_8, _SHIFT)


def _draw_ring(canvas, rng, center, radius, angle):
    _draw_disc(canvas, rng, center, radius, angle)
    hole = radius * rng.uniform(0.45, 0.62)
    cv2.circle(canvas, tuple(_fixed(center)), int(hole * _ONE), 0, -1, cv2.LINE_8, _SHIFT)


def _draw_square(canvas, rng, center, radius, angle):
    half = radius * 0.8
    aspect = rng.uniform(0.87, 1.15)
    w, h = half * aspect, half / aspect
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    cv2.fillPoly(canvas, [_fixed(_pose(corners, center, angle))], 1, cv2.LINE_8, _SHIFT)


def _draw_triangle(canvas, rng, center, radius, angle):
    theta = np.radians([-90.0, 30.0, 150.0]) + rng.uniform(-0.1, 0.1, 3)
    r = radius * 1.05 * rng.uniform(0.92, 1.05, 3)
    corners = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    cv2.fillPoly(canvas, [_fixed(_pose(corners, center, angle))], 1, cv2.LINE_8, _SHIFT)


def _draw_cross(canvas, rng, center, radius, angle):
    arm, half_width = radius, radius * rng.uniform(0.26, 0.34)
    bar = np.array([[-arm, -half_width], [arm, -half_width], [arm, half_width], [-arm, half_width]])
    for turn in (0.0, np.pi / 2):
        cv2.fillPoly(canvas, [_fixed(_pose(bar, center, angle + turn))], 1, cv2.LINE_8, _SHIFT)


def _draw_person(canvas, rng, center, radius, angle):
    """Stick figure: head disc over a thick torso, two legs and two arms (round caps)."""
    h = 2.3 * radius  # a person is a bit taller than the other shapes are wide
    hand_x, hand_y = rng.uniform(0.16, 0.3, 2) * h, rng.uniform(-0.28, 0.08, 2) * h
    foot_x = rng.uniform(0.07, 0.17, 2) * h
    limbs = [  # (start, end, thickness as a share of h)
        ((0, -0.26), (0, 0.05), 0.25),
        ((-0.04, 0.08), (-foot_x[0] / h, 0.44), 0.11),
        ((0.04, 0.08), (foot_x[1] / h, 0.44), 0.11),
        ((0, -0.2), (-hand_x[0] / h, hand_y[0] / h), 0.085),
        ((0, -0.2), (hand_x[1] / h, hand_y[1] / h), 0.085),
    ]
    for start, end, width in limbs:
        ends = _fixed(_pose(np.array([start, end]) * h, center, angle))
        cv2.line(canvas, tuple(ends[0]), tuple(ends[1]), 1, max(2, round(width * h)),
                 cv2.LINE_8, _SHIFT)
    head = _pose(np.array([[0.0, -0.37 * h]]), center, angle)[0]
    cv2.circle(canvas, tuple(_fixed(head)), int(0.14 * h * _ONE), 1, -1, cv2.LINE_8, _SHIFT)


_DRAWERS: dict[int, Callable] = {
    1: _draw_person, 2: _draw_disc, 3: _draw_square,
    4: _draw_triangle, 5: _draw_cross, 6: _draw_ring,
}


def _random_color(rng: np.random.Generator, value_range=(0.15, 1.0)) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(*value_range))
    return np.array(rgb) * 255.0


class _SceneRenderer:
    """Draws one scene: textured background, clutter, then 1-3 occluding shapes."""

    def __init__(self, image_size: tuple[int, int]):
        self.height, self.width = image_size
        self.yy, self.xx = np.mgrid[0:self.height, 0:self.width].astype(np.float32)

    # -- fields in [0, 1] used to mix two colours -------------------------------------
    def _smooth_noise(self, rng, cells: int) -> np.ndarray:
        grid = rng.random((cells, max(2, round(cells * self.width / self.height))))
        field = cv2.resize(grid.astype(np.float32), (self.width, self.height),
                           interpolation=cv2.INTER_CUBIC)
        return np.clip(field, 0.0, 1.0)

    def _ramp(self, rng) -> np.ndarray:
        angle = rng.uniform(0, 2 * np.pi)
        proj = self.xx * np.cos(angle) + self.yy * np.sin(angle)
        return (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)

    def _stripes(self, rng, period_range, hard: bool) -> np.ndarray:
        angle = rng.uniform(0, np.pi)
        proj = self.xx * np.cos(angle) + self.yy * np.sin(angle)
        wave = np.sin(2 * np.pi * proj / rng.uniform(*period_range) + rng.uniform(0, 2 * np.pi))
        return (wave > 0).astype(np.float32) if hard else 0.5 + 0.5 * wave

    @staticmethod
    def _mix(field: np.ndarray, color_a: np.ndarray, color_b: np.ndarray) -> np.ndarray:
        return color_a + field[..., None] * (color_b - color_a)

    # -- scene parts -------------------------------------------------------------------
    def background(self, rng) -> np.ndarray:
        kind = rng.integers(3)
        if kind == 0:
            field = self._smooth_noise(rng, rng.integers(3, 8))
        elif kind == 1:
            field = self._ramp(rng)
        else:
            field = self._stripes(rng, (8, 30), hard=False)
        return self._mix(field, _random_color(rng), _random_color(rng)).astype(np.float32)

    def clutter(self, rng, image: np.ndarray) -> None:
        """Lines, dots and squiggles: not any class, so they stay background in the mask."""
        size = np.array([self.width, self.height])
        for _ in range(rng.integers(2, 8)):
            ends = _fixed(rng.uniform(-0.1, 1.1, (2, 2)) * size)
            cv2.line(image, tuple(ends[0]), tuple(ends[1]), _random_color(rng).tolist(),
                     int(rng.integers(1, 3)), cv2.LINE_8, _SHIFT)
        for _ in range(rng.integers(5, 20)):
            center = _fixed(rng.uniform(0, 1, 2) * size)
            radius = int(rng.uniform(0.8, 3.5) * _ONE)
            cv2.circle(image, tuple(center), radius, _random_color(rng).tolist(), -1,
                       cv2.LINE_8, _SHIFT)
        for _ in range(rng.integers(1, 4)):
            start = rng.uniform(0, 1, 2) * size
            points = start + np.cumsum(rng.normal(0, 6, (rng.integers(3, 6), 2)), axis=0)
            cv2.polylines(image, [_fixed(points)], False, _random_color(rng).tolist(), 1,
                          cv2.LINE_8, _SHIFT)

    def shape_mask(self, rng, class_id: int) -> np.ndarray:
        short = min(self.height, self.width)
        radius = 0.5 * short * rng.uniform(*_SIZE_RANGE)
        reach = 1.15 * radius if class_id == PERSON else radius  # half the extent
        margin = 0.8 * reach
        center = np.array([rng.uniform(margin, self.width - margin),
                           rng.uniform(margin, self.height - margin)])
        # People stand roughly upright; the other shapes take any rotation.
        angle = rng.uniform(-0.35, 0.35) if class_id == PERSON else rng.uniform(0, 2 * np.pi)
        canvas = np.zeros((self.height, self.width), np.uint8)
        _DRAWERS[class_id](canvas, rng, center, radius, angle)
        return canvas.astype(bool)

    def texture(self, rng, covered_mean: np.ndarray) -> np.ndarray:
        """A flat, striped or mottled surface whose mean colour stands out from below."""
        for _ in range(10):
            color_a = _random_color(rng)
            if np.linalg.norm(color_a - covered_mean) >= _MIN_CONTRAST:
                break
        kind = rng.integers(3)
        if kind == 0:
            return (color_a * (1 + 0.25 * (self._ramp(rng)[..., None] - 0.5))).astype(np.float32)
        color_b = np.clip(color_a + rng.normal(0, 45, 3), 0, 255)
        if kind == 1:
            field = self._stripes(rng, (3, 9), hard=True)
        else:
            field = self._smooth_noise(rng, rng.integers(4, 11))
        return self._mix(field, color_a, color_b).astype(np.float32)

    def place_objects(self, rng, classes: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """Instance map (0 = none, k = k-th placed object) and each instance's class.

        A placement is accepted only if every earlier object keeps ``_MIN_VISIBLE`` of its
        area, so each object in the list is clearly visible in the final mask.
        """
        instances = np.zeros((self.height, self.width), np.int32)
        areas: list[int] = [0]
        placed: list[int] = []
        for class_id in classes:
            for _ in range(_PLACEMENT_TRIES):
                mask = self.shape_mask(rng, class_id)
                visible = np.bincount(instances[~mask], minlength=len(areas))
                if all(visible[k] >= _MIN_VISIBLE * areas[k] for k in range(1, len(areas))):
                    instances[mask] = len(areas)
                    areas.append(int(mask.sum()))
                    placed.append(class_id)
                    break
        return instances, placed

    def render(self, rng, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        instances, placed = self.place_objects(rng, classes)
        image = self.background(rng)
        self.clutter(rng, image)
        mask = np.zeros((self.height, self.width), np.uint8)
        for k, class_id in enumerate(placed, start=1):
            region = instances == k
            texture = self.texture(rng, image[region].mean(axis=0))
            image[region] = texture[region]
            mask[region] = class_id
        image += rng.normal(0, rng.uniform(2, 8), image.shape).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), mask


VERIFIED_EVERY = 4  # the verified training subset: every 4th image


def _split_code(split: str) -> int:
    return _SPLIT_CODES.get(split, zlib.crc32(split.encode()))


class ToySource(ImageSource):
    """One split of the toy dataset; ids are ``<split>_<index:05d>``.

    ``labels`` are the observed image-level labels: the person label is dropped with
    probability ``missing_label_rate`` where a person is present beside another class.
    ``true_labels`` and the mask always hold every visible class. ``every`` > 1 keeps every
    n-th image (the same images as the full split).
    """

    name = "toy"
    has_masks = True

    def __init__(self, split: str = "train", num_images: int = 800,
                 image_size: Sequence[int] = (96, 128), seed: int = 0,
                 missing_label_rate: float = 0.5, every: int = 1):
        if not 0.0 <= missing_label_rate <= 1.0:
            raise ValueError(f"toy missing_label_rate must be in [0, 1], got {missing_label_rate}")
        height, width = (int(v) for v in image_size)
        if min(height, width) < 32:
            raise ValueError(f"toy image_size must be at least 32x32, got {height}x{width}")
        self.split = split
        self.seed = int(seed)
        self.missing_label_rate = float(missing_label_rate)
        self.image_size = (height, width)
        self.class_names = list(CLASS_NAMES)
        self._index = {f"{split}_{i:05d}": i for i in range(0, int(num_images), int(every))}
        self.ids = list(self._index)
        self._renderer = _SceneRenderer(self.image_size)
        self._renders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = max(8, _CACHE_BYTES // (height * width * 4))  # RGB + mask
        self._true_labels: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _split_code(self.split), index, stream])

    def _classes(self, rng: np.random.Generator, index: int) -> list[int]:
        """The classes to place, in drawing order (later ones occlude earlier ones)."""
        count = rng.choice(_OBJECT_COUNTS, p=_OBJECT_COUNT_PROBS)
        classes = [PERSON] if rng.random() < _PERSON_RATE else []
        weights = _OTHER_WEIGHTS / _OTHER_WEIGHTS.sum()
        classes += rng.choice(_OTHER_CLASSES, count - len(classes), p=weights).tolist()
        rng.shuffle(classes)
        forced = index % _FORCE_PERIOD
        if 0 < forced < self.num_classes:
            # Placed first, so it is never rejected for hiding an earlier object.
            classes = [forced] + classes[: count - 1]
        return [int(c) for c in classes]

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._renders:
            self._renders.move_to_end(index)
            return self._renders[index]
        rng = self._rng(index, stream=0)
        image, mask = self._renderer.render(rng, self._classes(rng, index))
        image.setflags(write=False)
        mask.setflags(write=False)
        self._renders[index] = (image, mask)
        if len(self._renders) > self._cache_size:
            self._renders.popitem(last=False)
        self._true_labels[index] = labels_from_mask(mask, self.num_classes)
        return image, mask

    def _lookup(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise ImageLoadError(f"toy {self.split}: no image with id {image_id!r}") from None

    def load_image(self, image_id: str) -> np.ndarray:
        return self._render(self._lookup(image_id))[0].copy()

    def load_mask(self, image_id: str) -> np.ndarray:
        return self._render(self._lookup(image_id))[1].copy()

    def true_labels(self, image_id: str) -> list[int]:
        """Every class visible in the image (what the mask holds)."""
        index = self._lookup(image_id)
        if index not in self._true_labels:
            self._render(index)
        return list(self._true_labels[index])

    def labels(self, image_id: str) -> list[int]:
        """Observed labels: the person label is missing in a share of its images.

        Only where another class is present too, so no image is left without labels.
        """
        index = self._lookup(image_id)
        labels = self.true_labels(image_id)
        # A stream of its own, so changing the rate never changes the images.
        droppable = PERSON in labels and len(labels) > 1
        if droppable and self._rng(index, stream=1).random() < self.missing_label_rate:
            labels.remove(PERSON)
        return labels


def build_toy_source(dataset_cfg: Mapping[str, Any], split: str) -> ToySource:
    """The toy source for ``split`` from the ``dataset.toy`` config section.

    Person labels go missing in the training split only: val and test labels come from
    their masks, as they would for a dataset with pixel annotations. ``verified_only``: the
    training split is its verified quarter (every 4th image) with complete labels, as a
    subset whose labels were checked (LID's reliable person labels) would be.
    """
    toy = {**TOY_DEFAULTS, **(dataset_cfg.get("toy") or {})}
    sizes = {"train": toy["num_train"], "val": toy["num_val"], "test": toy["num_test"]}
    if split not in sizes:
        raise ValueError(f"toy dataset has splits {sorted(sizes)}, not {split!r}")
    verified = toy["verified_only"] and split == "train"
    return ToySource(
        split=split,
        num_images=sizes[split],
        image_size=toy["image_size"],
        seed=toy["seed"],
        missing_label_rate=toy["missing_label_rate"] if split == "train" and not verified else 0.0,
        every=VERIFIED_EVERY if verified else 1,
    )
