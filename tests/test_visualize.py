"""The example figure's legend: every class colour named, white (255) outlined, wrapped."""
import numpy as np

from inference.scoring.visualize import IGNORE_COLOR, PALETTE, legend_strip

NAMES = ["background", "car", "pedestrian", "bicyclist", "pole", "fence", "signsymbol"]


def _has_color(image, color) -> bool:
    return bool((image.reshape(-1, 3) == np.array(color, np.uint8)).all(axis=1).any())


def test_the_legend_shows_each_class_colour_and_an_outlined_white_swatch():
    strip = legend_strip(NAMES, width=900)
    assert strip.shape[1] == 900 and strip.dtype == np.uint8
    for class_id in range(1, len(NAMES)):
        assert _has_color(strip, PALETTE[class_id]), NAMES[class_id]
    assert _has_color(strip, PALETTE[0])  # background is black, as in the label maps
    assert _has_color(strip, IGNORE_COLOR)


def test_a_narrow_figure_wraps_the_legend_onto_more_lines():
    wide, narrow = legend_strip(NAMES, width=1200), legend_strip(NAMES, width=200)
    assert narrow.shape[1] == 200 and narrow.shape[0] > 2 * wide.shape[0]
    for class_id in range(1, len(NAMES)):
        assert _has_color(narrow, PALETTE[class_id])
