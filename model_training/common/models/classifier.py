"""The CAM classifier: backbone -> global average pooling -> bias-free 1x1 conv.

With this head a class score is exactly S_c = W_c . mean_hw(A), so CAMs (W_c . A), and
Grad-CAM / Grad-CAM++ for every class, come from one forward pass (step 2's fast path).
Optionally a second head as in ReCAM (Chen et al., CVPR 2022), whose weights multiply the
first's in the CAMs (``cam_weight``).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from ..checkpoints import read_checkpoint
from ..config import ConfigError, StepError
from .backbones import build_backbone


class CamClassifier(nn.Module):
    """Multi-label classifier whose output ``i`` is the dataset class ``class_ids[i]``.

    ``arch`` (backbone name, output stride) is what a checkpoint needs to rebuild it.
    ``freeze_bn`` keeps BatchNorm statistics fixed while training (small batches, as IRNet).
    ``recam`` adds ReCAM's head, trained by ``recam_loss`` on the features each CAM selects.
    """

    def __init__(self, backbone: nn.Module, channels: int, class_ids: Sequence[int],
                 arch: dict | None = None, freeze_bn: bool = False, recam: bool = False):
        super().__init__()
        if not class_ids:
            raise ValueError("a CamClassifier needs at least one output class")
        self.backbone = backbone
        self.classifier = nn.Conv2d(channels, len(class_ids), 1, bias=False)
        self.recam_head = nn.Conv2d(channels, len(class_ids), 1, bias=False) if recam else None
        self.class_ids = [int(c) for c in class_ids]
        self.arch = dict(arch or {})
        self.freeze_bn = freeze_bn

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The map A (B,C,h,w), non-negative, that the head pools and CAMs weight."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Class scores (B,K); with ``with_features`` also the map A they pool (for ReCAM's
        loss, through the same call a DDP wrapper sees)."""
        feats = self.features(x)
        logits = self.classifier(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return (logits, feats) if with_features else logits

    def cam_weight(self) -> torch.Tensor:
        """The (K,C) weight step 2 applies to A: the head's, times ReCAM's where it has one."""
        weight = self.classifier.weight.flatten(1)
        return weight if self.recam_head is None else weight * self.recam_head.weight.flatten(1)

    def train(self, mode: bool = True) -> "CamClassifier":
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def parameter_groups(self, new_lr_mult: float = 10.0) -> list[dict]:
        """Pretrained backbone at the base LR, new layers (head, VGG's extra convs) faster."""
        new_modules = [self.classifier, *getattr(self.backbone, "new_modules", [])]
        if self.recam_head is not None:
            new_modules.append(self.recam_head)
        new_ids = {id(p) for m in new_modules for p in m.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [
            {"name": "backbone", "params": [p for p in trainable if id(p) not in new_ids],
             "lr_mult": 1.0},
            {"name": "new", "params": [p for p in trainable if id(p) in new_ids],
             "lr_mult": new_lr_mult},
        ]

    def checkpoint_fields(self) -> dict:
        """What a checkpoint stores beside the weights so ``load_cam_classifier`` can rebuild."""
        return {"class_ids": list(self.class_ids), "arch": dict(self.arch)}


def build_cam_classifier(backbone: str, weights: str, output_stride: int,
                         class_ids: Sequence[int], freeze_bn: bool = False,
                         recam: bool = False) -> CamClassifier:
    module, channels = build_backbone(backbone, weights, output_stride)
    arch = {"backbone": backbone, "output_stride": int(output_stride)}
    if recam:  # only then: a plain classifier's arch (and checkpoints) stay as they were
        arch["recam"] = True
    return CamClassifier(module, channels, class_ids, arch=arch, freeze_bn=freeze_bn, recam=recam)


def _check_classes(path, checkpoint: dict, dataset_classes: list[str]) -> None:
    names = checkpoint.get("class_names") or [None] * len(checkpoint["class_ids"])
    for class_id, name in zip(checkpoint["class_ids"], names):
        if not 0 < class_id < len(dataset_classes):
            found = f"class id {class_id}, not a foreground class of this dataset"
        elif name is not None and name != dataset_classes[class_id]:
            found = f"class {class_id} '{name}', '{dataset_classes[class_id]}' in this dataset"
        else:
            continue
        raise StepError(f"{path}: trained on other classes ({found}): run step 1 on this "
                        f"dataset (overwrite=true)")


def init_from_checkpoint(model: CamClassifier, path: str | os.PathLike) -> None:
    """Start ``model`` from a trained step-1 checkpoint of the same backbone and classes (as
    ReCAM fine-tunes a trained classifier); a head the checkpoint lacks (ReCAM's) stays new."""
    checkpoint = read_checkpoint(path, "key 'model.init_from' must name a step-1 best.pt or last.pt",
                                 keys=("model", "arch", "class_ids"))
    arch = checkpoint["arch"]
    same = {key: arch.get(key) for key in ("backbone", "output_stride")} == {
        key: model.arch.get(key) for key in ("backbone", "output_stride")}
    if not same or list(checkpoint["class_ids"]) != model.class_ids:
        raise ConfigError(f"key 'model.init_from': {path} has backbone {arch.get('backbone')} at "
                          f"stride {arch.get('output_stride')} for classes {checkpoint['class_ids']}, "
                          f"this step {model.arch.get('backbone')} at stride "
                          f"{model.arch.get('output_stride')} for {model.class_ids}")
    missing, _ = model.load_state_dict(checkpoint["model"], strict=False)
    if any(not key.startswith("recam_head.") for key in missing):
        raise ConfigError(f"key 'model.init_from': {path} lacks weights of this model: {missing[0]}")


def load_cam_classifier(path: str | os.PathLike, map_location="cpu",
                        dataset_classes: Sequence[str] | None = None) -> CamClassifier:
    """A trained classifier from a step-1 checkpoint (best.pt / last.pt), in eval mode;
    with ``dataset_classes`` (the class names of the dataset it will see) checked against
    them: a classifier of another dataset would give its maps under wrong class ids."""
    checkpoint = read_checkpoint(path, "re-run step 1 with overwrite=true", map_location,
                                 keys=("model", "arch", "class_ids"))
    if dataset_classes is not None:
        _check_classes(path, checkpoint, list(dataset_classes))
    arch = checkpoint["arch"]
    model = build_cam_classifier(arch["backbone"], "none", arch["output_stride"],
                                 checkpoint["class_ids"], recam=arch.get("recam", False))
    model.load_state_dict(checkpoint["model"])
    return model.to(map_location).eval()
