"""IRNet (Ahn et al., CVPR 2019) heads over a frozen multi-level backbone.

The backbone (the classifier's features, e.g. `build_multilevel_backbone`) stays frozen:
IRNet learns only light 1x1-conv heads on its features, which keeps step 4 cheap and the
features the CAMs came from unchanged. Two heads, both at stride 4:
- boundary branch: every level -> 32 channels, all concatenated -> 1 boundary logit;
- displacement branch (optional): a 2-channel vector field pointing to the instance
  centroid. Semantic pseudo masks need only boundaries, so it can be left out.
"""
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import read_checkpoint
from .backbones import build_multilevel_backbone

OUTPUT_STRIDE = 4


class IRNetOutput(NamedTuple):
    """Boundary logits (B, 1, h, w) and displacement (B, 2, h, w) or None, at stride 4."""

    edge_logits: torch.Tensor
    displacement: torch.Tensor | None

    @property
    def boundary(self) -> torch.Tensor:
        """Boundary probabilities (B, 1, h, w)."""
        return torch.sigmoid(self.edge_logits)


def _conv_gn(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    """1x1 conv + GroupNorm: IRNet's per-level projection (batch-size independent norm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.GroupNorm(groups, out_channels)
    )


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring a feature map to `size` on the same pixel grid.

    Coarser maps are upsampled by the integer stride ratio and cropped (as IRNet does for
    its stride-8/16 levels), so feature pixel centres stay aligned with the image.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    factor = max(1, round(size[0] / h))
    up = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    if up.shape[-2] < size[0] or up.shape[-1] < size[1]:
        up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return up[..., : size[0], : size[1]]


class RunningMeanCentering(nn.Module):
    """Subtract the displacement field's running mean at inference (IRNet's MeanShift).

    Training sees only displacement differences, so the field's offset is free; centring
    by the training-time mean makes the absolute vectors usable.
    """

    def __init__(self, channels: int = 2, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                batch_mean = x.mean(dim=(0, 2, 3))
                self.running_mean.lerp_(batch_mean, self.momentum)
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


class BoundaryBranch(nn.Module):
    """Levels -> 32 channels each at stride 4 -> concatenation -> one boundary logit."""

    def __init__(self, channels: Sequence[int], width: int = 32):
        super().__init__()
        self.levels = nn.ModuleList(_conv_gn(c, width, 4) for c in channels)
        self.predict = nn.Conv2d(width * len(channels), 1, 1, bias=True)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = [F.relu(resize_to(level(f), size)) for level, f in zip(self.levels, features)]
        return self.predict(torch.cat(maps, dim=1))


class DisplacementBranch(nn.Module):
    """IRNet's displacement head: deep levels fused at the finest deep resolution, then
    upsampled and fused with the shallow (stride <= 4) levels at stride 4 -> 2 channels."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.shallow_ids = [i for i, s in enumerate(strides) if s <= OUTPUT_STRIDE]
        self.deep_ids = [i for i, s in enumerate(strides) if s > OUTPUT_STRIDE]
        shallow_widths = [64 if k == 0 else 128 for k in range(len(self.shallow_ids))]
        self.shallow = nn.ModuleList(
            _conv_gn(channels[i], w, w // 8) for i, w in zip(self.shallow_ids, shallow_widths)
        )
        self.deep = nn.ModuleList(_conv_gn(channels[i], 256, 16) for i in self.deep_ids)
        self.fuse_deep = _conv_gn(256 * len(self.deep_ids), 256, 16) if self.deep_ids else None
        fused_width = sum(shallow_widths) + (256 if self.deep_ids else 0)
        self.predict = nn.Sequential(
            _conv_gn(fused_width, 256, 16),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 2, 1, bias=False),
            RunningMeanCentering(2),
        )

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = [
            F.relu(resize_to(conv(features[i]), size))
            for conv, i in zip(self.shallow, self.shallow_ids)
        ]
        if self.deep_ids:
            deep_size = tuple(max(features[i].shape[-2:] for i in self.deep_ids))
            deep = [
                F.relu(resize_to(conv(features[i]), deep_size))
                for conv, i in zip(self.deep, self.deep_ids)
            ]
            fused = self.fuse_deep(torch.cat(deep, dim=1))
            maps.append(F.relu(resize_to(fused, size)))
        return self.predict(torch.cat(maps, dim=1))


def probe_strides(backbone: nn.Module, probe_size: int = 64) -> list[int]:
    """Stride of every level of a multi-level backbone, from one forward of a blank image."""
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, probe_size, probe_size, device=device))
    return [max(1, round(probe_size / f.shape[-2])) for f in features]


class IRNet(nn.Module):
    """Boundary (+ optional displacement) heads at stride 4 over a frozen backbone.

    `backbone(x)` returns feature maps shallow -> deep with `channels` channels. Their
    output `strides` come from the argument, else the backbone's `reductions` attribute
    (as `build_multilevel_backbone` sets it), else one probing forward.
    """

    def __init__(
        self,
        backbone: nn.Module,
        channels: Sequence[int],
        with_displacement: bool = True,
        strides: Sequence[int] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        if strides is None:
            strides = getattr(backbone, "reductions", None) or probe_strides(backbone)
        strides = list(strides)
        if len(strides) != len(channels):
            raise ValueError(f"{len(channels)} channel counts but {len(strides)} levels")
        self.strides = strides
        self.edge_branch = BoundaryBranch(channels)
        self.displacement_branch = (
            DisplacementBranch(channels, strides) if with_displacement else None
        )

    def train(self, mode: bool = True) -> "IRNet":
        """Heads follow `mode`; the frozen backbone stays in eval (BatchNorm statistics fixed)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> IRNetOutput:
        size = (-(-x.shape[-2] // OUTPUT_STRIDE), -(-x.shape[-1] // OUTPUT_STRIDE))
        with torch.no_grad():
            features = [f.detach() for f in self.backbone(x)]
        edge_logits = self.edge_branch(features, size)
        displacement = (
            self.displacement_branch(features, size) if self.displacement_branch else None
        )
        return IRNetOutput(edge_logits, displacement)

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(boundary-branch parameters, displacement-branch parameters)."""
        edge = list(self.edge_branch.parameters())
        disp = list(self.displacement_branch.parameters()) if self.displacement_branch else []
        return edge, disp

    def param_groups(self, displacement_lr_mult: float = 10.0) -> list[dict]:
        """Optimizer groups in the trainer's form: boundary branch at the base LR, the
        displacement branch at ``displacement_lr_mult`` times it (10, as IRNet)."""
        edge, disp = self.trainable_parameters()
        groups = [{"params": edge, "lr_mult": 1.0, "name": "boundary"}]
        if disp:
            groups.append({"params": disp, "lr_mult": displacement_lr_mult, "name": "displacement"})
        return groups


@torch.no_grad()
def predict_boundary(model: IRNet, image: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Boundary probabilities (h, w) at stride 4 for one normalised (3, H, W) image.

    With `flip`, logits of the image and its mirror are averaged before the sigmoid (IRNet's
    test-time augmentation).
    """
    batch = torch.stack([image, image.flip(-1)]) if flip else image[None]
    logits = model(batch).edge_logits[:, 0]
    if flip:
        return torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)
    return torch.sigmoid(logits[0])


def build_irnet(irn_cfg, weights: str | None = None) -> IRNet:
    backbone, channels = build_multilevel_backbone(
        irn_cfg["backbone"], weights or irn_cfg["weights"], irn_cfg["output_stride"])
    return IRNet(backbone, channels, with_displacement=irn_cfg["with_displacement"])


def load_irnet(path, device) -> IRNet:
    """A trained IRNet from a step-4 checkpoint, in eval mode."""
    checkpoint = read_checkpoint(path, "re-run step 4 with overwrite=true", device,
                                 keys=("model", "arch"))
    model = build_irnet(checkpoint["arch"], weights="none")
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
