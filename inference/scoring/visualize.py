"""Pictures of the steps' outputs: coloured label maps, CAM heat maps, example grids."""
from __future__ import annotations

import cv2
import numpy as np

IGNORE_COLOR = (255, 255, 255)


def label_palette(num_colors: int = 256) -> np.ndarray:
    """PASCAL VOC's bit-interleaved palette (class 0 black), so colours match VOC figures."""
    palette = np.zeros((num_colors, 3), np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    palette[255] = IGNORE_COLOR
    return palette


PALETTE = label_palette()


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """uint8 class ids -> RGB; 255 (unsure / ignore) shows white."""
    return PALETTE[labels.astype(np.uint8)]


def cam_overlay(image: np.ndarray, cams: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The per-pixel max over an image's class maps as a jet heat map on the image."""
    heat = cams.max(axis=0) if cams.shape[0] else np.zeros(image.shape[:2], np.float32)
    heat = np.clip(heat, 0.0, 1.0)
    colored = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (alpha * colored + (1 - alpha) * image).astype(np.uint8)


def image_grid(rows: list[list[np.ndarray]], titles: list[str], pad: int = 4,
               min_tile_width: int = 192) -> np.ndarray:
    """Rows of equally sized RGB tiles, with a title band over each column; small tiles are
    enlarged (nearest neighbour, so label maps stay crisp) to ``min_tile_width``."""
    tile_h, tile_w = rows[0][0].shape[:2]
    if tile_w < min_tile_width:
        tile_h, tile_w = round(tile_h * min_tile_width / tile_w), min_tile_width
    band = 18
    height = band + len(rows) * (tile_h + pad) + pad
    width = len(titles) * (tile_w + pad) + pad
    canvas = np.full((height, width, 3), 255, np.uint8)
    for col, title in enumerate(titles):
        x = pad + col * (tile_w + pad)
        cv2.putText(canvas, title, (x + 2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for row, tiles in enumerate(rows):
        y = band + pad + row * (tile_h + pad)
        for col, tile in enumerate(tiles):
            x = pad + col * (tile_w + pad)
            if tile.shape[:2] != (tile_h, tile_w):
                tile = cv2.resize(tile, (tile_w, tile_h), interpolation=cv2.INTER_NEAREST)
            canvas[y:y + tile_h, x:x + tile_w] = tile
    return canvas


def legend_strip(class_names: list[str], width: int, pad: int = 4, swatch: int = 12,
                 unsure_label: str = "unsure / ignore (255)") -> np.ndarray:
    """A white strip naming each class's colour (and white = 255), wrapped to ``width``, so a
    figure of label maps reads without the code. Swatches have a black outline."""
    entries = [(name, tuple(int(v) for v in PALETTE[c])) for c, name in enumerate(class_names)]
    entries.append((unsure_label, IGNORE_COLOR))
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    line_h = swatch + pad
    placed, x, y = [], pad, pad
    for name, color in entries:
        entry_w = swatch + 4 + cv2.getTextSize(name, font, scale, 1)[0][0] + 3 * pad
        if x + entry_w > width and x > pad:
            x, y = pad, y + line_h
        placed.append((x, y, name, color))
        x += entry_w
    strip = np.full((y + line_h + pad, width, 3), 255, np.uint8)
    for x, y, name, color in placed:
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), color, cv2.FILLED)
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), (0, 0, 0), 1)
        cv2.putText(strip, name, (x + swatch + 4, y + swatch - 2), font, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return strip
