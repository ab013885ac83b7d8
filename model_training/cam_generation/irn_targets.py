"""Step 4 targets and losses: IR labels -> pair labels -> IRNet's affinity / displacement losses.

An IR label map (0 background, c class c, 255 unsure) at stride 4 says, for every pixel
pair of the path index, whether the two pixels surely belong together (same label:
background pair or foreground pair) or surely apart (different labels); pairs touching an
unsure pixel or leaving the image teach nothing.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model_training.common.metrics import IGNORE_INDEX
from model_training.common.path_index import PathIndex

EPS = 1e-5


class AffinityTargets(NamedTuple):
    """(B, D, h, w) float masks over the path index's pairs."""

    bg_pos: torch.Tensor  # both background
    fg_pos: torch.Tensor  # same foreground class
    neg: torch.Tensor  # different labels


def label_to_stride(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) labels to the network's stride-4 `size`."""
    resized = F.interpolate(label[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].to(torch.long)


def affinity_targets(
    label: torch.Tensor, path_index: PathIndex, ignore_index: int = IGNORE_INDEX
) -> AffinityTargets:
    """(B, h, w) integer labels -> pair masks for IRNet's AffinityDisplacementLoss."""
    label = label.long()
    far = path_index.neighbours(label, pad_value=ignore_index)  # (B, D, h, w)
    near = label[:, None]
    valid = (near != ignore_index) & (far != ignore_index)
    same = (near == far) & valid
    return AffinityTargets(
        bg_pos=(same & (near == 0)).float(),
        fg_pos=(same & (near != 0)).float(),
        neg=(~same & valid).float(),
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (values * mask).sum() / (scale * mask.sum() + EPS)


def irn_losses(
    affinity: torch.Tensor,
    targets: AffinityTargets,
    path_index: PathIndex,
    displacement: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """IRNet's losses; `total` is what to backpropagate.

    affinity (B, D, h, w) from `edge_to_affinity` of the boundary probabilities;
    displacement (B, 2, h, w) (dy, dx) or None when the branch is off. Positive pairs pull
    affinity to 1 (background and foreground pairs weighted equally), negative pairs to 0;
    the displacement difference of a foreground pair must equal its offset (both pixels
    point at the same centroid), that of a background pair must be 0.
    """
    bg_pos = _masked_mean(-torch.log(affinity + EPS), targets.bg_pos)
    fg_pos = _masked_mean(-torch.log(affinity + EPS), targets.fg_pos)
    neg = _masked_mean(-torch.log(1.0 + EPS - affinity), targets.neg)
    losses = {"bg_pos_aff": bg_pos, "fg_pos_aff": fg_pos, "pos_aff": (bg_pos + fg_pos) / 2}
    losses["neg_aff"] = neg
    total = (losses["pos_aff"] + neg) / 2
    if displacement is not None:
        # difference between each pixel's vector and its partner's: (B, 2, D, h, w)
        diff = displacement[:, :, None] - path_index.neighbours(displacement)
        offsets = torch.as_tensor(path_index.offsets, dtype=diff.dtype, device=diff.device)
        offsets = offsets.T.reshape(1, 2, -1, 1, 1)
        losses["dp_fg"] = _masked_mean((diff - offsets).abs(), targets.fg_pos[:, None], 2.0)
        losses["dp_bg"] = _masked_mean(diff.abs(), targets.bg_pos[:, None], 2.0)
        total = total + (losses["dp_fg"] + losses["dp_bg"]) / 2
    losses["total"] = total
    return losses
