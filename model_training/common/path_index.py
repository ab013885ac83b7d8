"""Pixel pairs and the paths between them, for IRNet's boundary -> affinity step.

IRNet links every pixel to the pixels within `radius` (at stride 4) and scores a pair by
the strongest class boundary on the straight line between them: a boundary anywhere on
that line separates the two pixels. Only half of the neighbourhood is listed ("search
directions": dy > 0, or dy == 0 and dx > 0); the other half is the same pairs seen from
the other end, so affinities are symmetric by construction.

Layout used throughout (training losses and random walk): a pair map has shape
(B, D, h, w) where entry [b, d, y, x] is the pair ((y, x), (y, x) + offsets[d]). Pairs
whose far end leaves the image exist in the layout but are invalid: their affinity is 0
and `valid_pairs` is False there.
"""
import numpy as np
import torch
import torch.nn.functional as F


def search_offsets(radius: int) -> np.ndarray:
    """(D, 2) int (dy, dx) offsets with 0 < dy^2 + dx^2 < radius^2 in the forward half-plane."""
    if int(radius) != radius or radius < 2:
        raise ValueError(f"radius must be an integer >= 2, got {radius}")
    span = range(-radius + 1, radius)
    return np.array(
        [
            (dy, dx)
            for dy in range(radius)
            for dx in span
            if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius
        ],
        dtype=np.int64,
    )


def line_path(dy: int, dx: int) -> np.ndarray:
    """(L, 2) pixels on the segment from (0, 0) to (dy, dx), both ends included.

    A pixel belongs to the path when it lies in the segment's bounding box and its centre
    is less than one pixel away from the line through the two ends.
    """
    length_sq = dy * dy + dx * dx
    ys = np.arange(min(0, dy), max(0, dy) + 1)
    xs = np.arange(min(0, dx), max(0, dx) + 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    cross = dy * xx - dx * yy  # |cross| / |(dy, dx)| is the distance to the line
    on_line = cross * cross < length_sq
    return np.stack([yy[on_line], xx[on_line]], axis=1)


class PathIndex:
    """Search directions of one radius and the pixel path of each direction.

    `radius` 10 at stride 4 is IRNet's training neighbourhood, 5 its inference one.
    """

    def __init__(self, radius: int):
        self.radius = int(radius)
        self.offsets = search_offsets(self.radius)
        self.paths = [line_path(int(dy), int(dx)) for dy, dx in self.offsets]
        # Largest |dy| or |dx|: how far a pair can reach below / left / right.
        self.reach = self.radius - 1

    @property
    def num_directions(self) -> int:
        return len(self.offsets)

    def _pad(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """Pad the last two dims so every pair's far end has a slot (left, right, bottom)."""
        r = self.reach
        return F.pad(x, (r, r, 0, r), value=value)

    def _shifted(self, padded: torch.Tensor, dy: int, dx: int, size: tuple[int, int]):
        h, w = size
        r = self.reach
        return padded[..., dy : dy + h, r + dx : r + dx + w]

    def neighbours(self, x: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """(..., h, w) -> (..., D, h, w): the value at each pair's far end.

        Far ends outside the image read `pad_value`.
        """
        size = tuple(x.shape[-2:])
        padded = self._pad(x, pad_value)
        return torch.stack(
            [self._shifted(padded, int(dy), int(dx), size) for dy, dx in self.offsets], dim=-3
        )

    def valid_pairs(self, size: tuple[int, int], device=None) -> torch.Tensor:
        """(D, h, w) bool: the pair's far end lies inside an image of `size`."""
        h, w = size
        offsets = torch.as_tensor(self.offsets, device=device)
        ys = torch.arange(h, device=device).view(1, h, 1) + offsets[:, 0].view(-1, 1, 1)
        xs = torch.arange(w, device=device).view(1, 1, w) + offsets[:, 1].view(-1, 1, 1)
        return (ys < h) & (xs >= 0) & (xs < w)


def edge_to_affinity(edge: torch.Tensor, path_index: PathIndex) -> torch.Tensor:
    """Boundary probabilities (B, 1, h, w) or (B, h, w) -> affinities (B, D, h, w).

    affinity = 1 - max boundary over the pixels of the pair's path; invalid pairs get 0.
    Differentiable w.r.t. `edge`: the max is located without autograd and its value then
    gathered with autograd. The gradient is the one of autograd through the max (it flows
    to the arg-max pixel), but backward keeps one index per pair instead of every path
    pixel (~7x less memory at radius 10). Without grad the max values are used directly.
    """
    if edge.dim() == 4:
        if edge.shape[1] != 1:
            raise ValueError(f"edge must have one channel, got shape {tuple(edge.shape)}")
        edge = edge[:, 0]
    if edge.dim() != 3:
        raise ValueError(f"edge must be (B, 1, h, w) or (B, h, w), got {tuple(edge.shape)}")
    batch, h, w = edge.shape
    shape = (batch, path_index.num_directions, h, w)
    r = path_index.reach
    padded = path_index._pad(edge, 1.0)  # outside the image counts as a boundary
    padded_width = w + 2 * r
    needs_grad = edge.requires_grad and torch.is_grad_enabled()

    with torch.no_grad():
        if needs_grad:
            rows = torch.arange(h, device=edge.device).view(h, 1) * padded_width
            pixel_index = rows + torch.arange(w, device=edge.device) + r  # flat, in `padded`
            max_index = torch.empty(shape, dtype=torch.long, device=edge.device)
        else:
            path_max = torch.empty(shape, dtype=edge.dtype, device=edge.device)
        for d, path in enumerate(path_index.paths):
            along_path = torch.stack(
                [path_index._shifted(padded, int(py), int(px), (h, w)) for py, px in path], dim=1
            )
            if needs_grad:
                steps = torch.as_tensor(path[:, 0] * padded_width + path[:, 1], device=edge.device)
                # max().indices: same result as argmax, several times faster on CPU
                max_index[:, d] = pixel_index + steps[along_path.max(dim=1).indices]
            else:
                path_max[:, d] = along_path.amax(dim=1)

    if needs_grad:
        path_max = padded.reshape(batch, -1).gather(1, max_index.view(batch, -1)).view(shape)
    return 1.0 - path_max
