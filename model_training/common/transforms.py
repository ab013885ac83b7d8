"""Joint image/mask transforms (torchvision.transforms.v2 on tv_tensors).

Masks ride along as ``tv_tensors.Mask`` so every geometric op keeps them nearest-neighbour,
and padding fills the mask with 255 (ignore), never with a class id.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from model_training.common.metrics import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


def _long_side_size(height: int, width: int, long_side: int) -> list[int]:
    scale = long_side / max(height, width)
    return [max(1, round(height * scale)), max(1, round(width * scale))]


class ResizeLong(v2.Transform):
    """Resize so the long side is ``long_side`` (a random one from a range when given two)."""

    def __init__(self, long_side: int | Sequence[int]):
        super().__init__()
        self.range = (long_side, long_side) if isinstance(long_side, int) else tuple(long_side)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        long_side = int(torch.randint(self.range[0], self.range[1] + 1, ()).item())
        return {"size": _long_side_size(height, width, long_side)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


class RandomScale(v2.Transform):
    """Rescale by a factor drawn uniformly from ``scale_range`` (IRNet's random scaling)."""

    def __init__(self, scale_range: Sequence[float]):
        super().__init__()
        self.low, self.high = float(scale_range[0]), float(scale_range[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


class ClassCentredCrop(v2.RandomCrop):
    """A random crop that, with probability ``prob``, is centred on a pixel of one class of
    the mask instead (the class drawn uniformly among its foreground ids, then one of its
    pixels): nnU-Net's foreground oversampling, so that a small, rare class is not cropped
    away from most of the draws of its image. Padding as ``RandomCrop(pad_if_needed=True)``."""

    def __init__(self, size: int, prob: float):
        super().__init__(size, pad_if_needed=True, fill=PAD_FILL)
        self.prob = prob

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        if float(torch.rand(())) >= self.prob:
            return params
        masks = [inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask)]
        if not masks:
            return params
        mask = masks[0].as_subclass(torch.Tensor)
        classes = mask.unique()
        classes = classes[(classes > 0) & (classes != IGNORE_INDEX)]
        if not len(classes):
            return params
        chosen = classes[torch.randint(len(classes), ())]
        rows, cols = (mask == chosen).nonzero(as_tuple=True)
        pixel = torch.randint(len(rows), ())
        pad_left, pad_top, pad_right, pad_bottom = params["padding"]
        height, width = mask.shape[-2] + pad_top + pad_bottom, mask.shape[-1] + pad_left + pad_right
        params["top"] = _centred(int(rows[pixel]) + pad_top, params["height"], height)
        params["left"] = _centred(int(cols[pixel]) + pad_left, params["width"], width)
        return params


def _centred(position: int, crop: int, side: int) -> int:
    """The crop's first row (or column) that puts ``position`` in its middle, kept inside."""
    return min(max(position - crop // 2, 0), max(side - crop, 0))


class JointTransform:
    """Apply a v2 pipeline to a uint8 HWC image and an optional HW mask.

    Returns a normalised float CHW tensor and a long HW mask tensor (or None), the shape
    every training dataset in the repo hands its DataLoader.
    """

    def __init__(self, ops: Sequence[v2.Transform], mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.pipeline = v2.Compose(list(ops) or [v2.Identity()])
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None):
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        if mask is None:
            return self.normalize(self.pipeline(img)), None
        msk = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
        img, msk = self.pipeline(img, msk)
        return self.normalize(img), msk.as_subclass(torch.Tensor).long()


def build_transform(train: bool, crop_size: int | None = None, resize_long: Any = None,
                    scale_range: Sequence[float] | None = None, hflip: bool = True,
                    color_jitter: float = 0.0, class_crop: float = 0.0) -> JointTransform:
    """The usual recipe: resize-long, random scale, crop with ignore padding, flip, jitter.

    ``class_crop``: the share of crops centred on a mask class (``ClassCentredCrop``).
    ``train=False`` keeps only the deterministic resize, for validation and inference.
    """
    ops: list[v2.Transform] = []
    if resize_long:
        ops.append(ResizeLong(resize_long if train else _fixed(resize_long)))
    if train:
        if scale_range:
            ops.append(RandomScale(scale_range))
        if color_jitter:
            ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if crop_size:  # class_crop 0 keeps RandomCrop: its random stream, so earlier runs repeat
            ops.append(ClassCentredCrop(crop_size, class_crop) if class_crop > 0
                       else v2.RandomCrop(crop_size, pad_if_needed=True, fill=PAD_FILL))
    return JointTransform(ops)


def _fixed(resize_long: Any) -> int:
    """Validation uses the middle of a training long-side range."""
    if isinstance(resize_long, (list, tuple)):
        return int(round(sum(resize_long) / len(resize_long)))
    return int(resize_long)


def image_to_tensor(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 HWC -> normalised float CHW, the network input at inference time."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mean_t = torch.tensor(mean, dtype=tensor.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=tensor.dtype).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def network_input(image: np.ndarray, long_side: int | None = None) -> torch.Tensor:
    """``image_to_tensor``, resized (bilinear) to ``long_side`` when one is given: steps 2
    and 5 upscale small images so that stride-16 maps get more cells."""
    tensor = image_to_tensor(image)
    height, width = image.shape[:2]
    if long_side and max(height, width) != long_side:
        scale = long_side / max(height, width)
        size = (round(height * scale), round(width * scale))
        tensor = F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0]
    return tensor
