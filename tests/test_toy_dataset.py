"""The toy generator: deterministic from its seed, masks that agree with labels, all classes."""
import numpy as np
import pytest

from model_training.common.datasets.base import ImageLoadError
from model_training.common.datasets.toy import (
    CLASS_NAMES, PERSON, TOY_DEFAULTS, ToySource, build_toy_source,
)

SPLIT_SIZE = 60


@pytest.fixture(scope="module")
def samples():
    """(image, mask, observed labels, true labels) for a 60-image train split."""
    source = ToySource("train", num_images=SPLIT_SIZE, seed=0)
    return [(source.load_image(i), source.load_mask(i), source.labels(i), source.true_labels(i))
            for i in source.ids]


def test_arrays_have_the_promised_types(samples):
    for image, mask, _, _ in samples:
        assert image.dtype == np.uint8 and image.shape == (96, 128, 3)
        assert mask.dtype == np.uint8 and mask.shape == (96, 128)
        assert mask.max() < len(CLASS_NAMES)


def test_image_size_is_configurable():
    source = ToySource("val", num_images=2, image_size=(64, 80))
    assert source.load_image(source.ids[1]).shape == (64, 80, 3)
    assert source.load_mask(source.ids[1]).shape == (64, 80)


def test_same_seed_gives_identical_data_in_any_load_order(samples):
    source = ToySource("train", num_images=SPLIT_SIZE, seed=0)
    for index in reversed(range(0, SPLIT_SIZE, 7)):
        image_id = source.ids[index]
        image, mask, labels, true_labels = samples[index]
        np.testing.assert_array_equal(source.load_image(image_id), image)
        np.testing.assert_array_equal(source.load_mask(image_id), mask)
        assert source.labels(image_id) == labels
        assert source.true_labels(image_id) == true_labels


def test_other_seed_or_split_gives_other_images(samples):
    other_seed = ToySource("train", num_images=5, seed=1)
    other_split = ToySource("val", num_images=5, seed=0)
    for index in range(5):
        image = samples[index][0]
        assert not np.array_equal(other_seed.load_image(other_seed.ids[index]), image)
        assert not np.array_equal(other_split.load_image(other_split.ids[index]), image)


def test_masks_agree_with_labels(samples):
    for _, mask, labels, true_labels in samples:
        in_mask = sorted(int(c) for c in np.unique(mask) if c != 0)
        assert in_mask == true_labels
        assert 1 <= len(true_labels) <= 3
        assert labels, "every image keeps at least one observed label"
        assert set(labels) <= set(true_labels)
        assert set(true_labels) - set(labels) <= {PERSON}, "only person labels go missing"


@pytest.mark.parametrize("seed", [0, 7])
def test_every_class_appears_in_a_small_split(seed):
    source = ToySource("test", num_images=SPLIT_SIZE, seed=seed)
    present = set()
    for image_id in source.ids:
        present.update(source.true_labels(image_id))
    assert present == set(range(1, len(CLASS_NAMES)))


def test_person_label_is_missing_in_some_images(samples):
    with_person = [(labels, true) for _, _, labels, true in samples if PERSON in true]
    dropped = [labels for labels, _ in with_person if PERSON not in labels]
    assert 0 < len(dropped) < len(with_person)


def test_missing_label_rate_bounds():
    kept = ToySource("train", num_images=40, missing_label_rate=0.0)
    dropped = ToySource("train", num_images=40, missing_label_rate=1.0)
    for image_id in kept.ids:
        assert kept.labels(image_id) == kept.true_labels(image_id)
        true_labels = dropped.true_labels(image_id)
        if PERSON in true_labels and len(true_labels) > 1:
            assert dropped.labels(image_id) == [c for c in true_labels if c != PERSON]
        # The rate only decides labels; it never changes the pixels.
        np.testing.assert_array_equal(kept.load_image(image_id), dropped.load_image(image_id))


def test_factory_reads_the_toy_config_section():
    cfg = {"name": "toy", "toy": {**TOY_DEFAULTS, "num_val": 12, "seed": 3,
                                  "image_size": [64, 96], "missing_label_rate": 1.0}}
    val = build_toy_source(cfg, "val")
    assert (val.name, val.num_classes, val.has_masks) == ("toy", 7, True)
    assert val.class_names == CLASS_NAMES and val.ids[0] == "val_00000" and len(val) == 12
    assert val.load_image(val.ids[0]).shape == (64, 96, 3)
    # Labels go missing in training only; val and test labels are complete.
    assert all(val.labels(i) == val.true_labels(i) for i in val.ids)
    assert build_toy_source(cfg, "train").missing_label_rate == 1.0
    assert len(build_toy_source({"name": "toy"}, "train")) == TOY_DEFAULTS["num_train"]
    with pytest.raises(ValueError, match="trainval"):
        build_toy_source(cfg, "trainval")


def test_unknown_id_is_a_load_error():
    source = ToySource("train", num_images=3)
    with pytest.raises(ImageLoadError, match="train_00003"):
        source.load_image("train_00003")
