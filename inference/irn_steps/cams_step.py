"""Step 2 as a function: multiscale CAMs of every training image -> ``2_cams/<id>.npz``.

Images load in DataLoader workers while the model runs; each image's maps are computed on
the (optionally upscaled) network input and resized back to the image's own size, so the
files line up pixel for pixel with the image and its mask.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from model_training.common.config import (AT_LEAST_1, AT_LEAST_ONE_ITEM, FRACTION, POSITIVE,
                                          ConfigError, Schema, resolve_device)
from model_training.common.image_step import start_image_step
from model_training.common.image_step import summary_line as image_summary_line
from model_training.common.models import load_cam_classifier
from model_training.common.step_io import STEP_DIRS, classifier_dir, run_over_images, save_cams
from model_training.common.trainer import CHECKPOINT_EPOCHS
from model_training.common.transforms import network_input

from .cam import (CAM_STRIDE, DEFAULT_SCALES, LABEL_MODES, METHODS, NORMALIZATIONS, geometric_mean,
                  merge_cams, multiscale_cams, select_outputs)


SHARDABLE = True

DEFAULTS = Schema({
    "cams": {
        "split": "train",
        "checkpoint": None,  # None: <work_dir>/1_classifier/<classifier_epoch>.pt
        # best: the highest val mAP (best.pt); last: the final epoch's weights (last.pt), as
        # IRNet's CAMs use; also for extra_classifiers
        "classifier_epoch": "best",
        "method": "gradcam++",  # cam | gradcam | gradcam++ | layercam
        "scales": list(DEFAULT_SCALES),  # IRNet's
        "flip": True,
        "normalize": "class",  # class: each map by its own max | global: by the max over classes
        "labels": "gt",  # gt | pred | union: which classes get a map
        "threshold": 0.5,  # sigmoid threshold of predicted labels
        "target_layer": None,  # None: the classifier's features (closed form); else autograd
        # a finer layer (e.g. stride 8) whose LayerCAM maps multiply the maps above (geometric
        # mean): its detail trims their blobs; None: off
        "fine_layer": None,
        "input_long_side": None,  # upscale small images to this long side before the network
        "extra_checkpoints": [],  # binary classifiers of excluded classes: CAMs merged in
        "extra_classifiers": [],  # variants of step 1 (e.g. person): 1_classifier_<v>/
    },
}, ranges={
    "cams.scales": POSITIVE,
    "cams.threshold": FRACTION,
    "cams.input_long_side": AT_LEAST_1,
}, types={"cams.checkpoint": str, "cams.target_layer": str, "cams.fine_layer": str,
          "cams.input_long_side": int},
   sizes={"cams.scales": AT_LEAST_ONE_ITEM})


class _ImageList(Dataset):
    """(id, original uint8 image, or the error text) so a bad file never stops the loader."""

    def __init__(self, source, ids):
        self.source, self.ids = source, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        try:
            return image_id, self.source.load_image(image_id), None
        except Exception as err:  # noqa: BLE001 - reported by the consumer
            return image_id, None, str(err)


def _to_image_size(maps: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(stride-4 map, full-size map) of the original image from maps of the network input,
    renormalised so every class keeps its max of 1 after resizing."""
    strided = (math.ceil(height / CAM_STRIDE), math.ceil(width / CAM_STRIDE))
    if len(maps) == 0:  # no class to show: a background-only image still gets its file
        return (np.zeros((0, *strided), np.float32), np.zeros((0, height, width), np.float32))
    tensor = torch.from_numpy(maps)[None]
    out = []
    for size in (strided, (height, width)):
        resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]
        peak = resized.amax((1, 2), keepdim=True)
        out.append((resized / torch.where(peak > 0, peak, 1)).numpy())
    return out[0], out[1]


class CamExtractor:
    """One classifier's CAMs of an image, for its labels (or its predictions)."""

    def __init__(self, checkpoint: Path, device: torch.device, cam_cfg,
                 dataset_classes: Sequence[str] | None = None):
        self.model = load_cam_classifier(checkpoint, device, dataset_classes)
        for key in ("target_layer", "fine_layer"):
            layer = cam_cfg[key]
            if layer and self.model.recam_head is not None:
                raise ConfigError(f"key 'cams.{key}': {checkpoint} is a ReCAM classifier, "
                                  f"whose maps come from its features only (set it to null)")
            if layer and layer not in dict(self.model.named_modules()):
                raise ConfigError(f"key 'cams.{key}': {checkpoint} has no layer {layer!r}")
        self.cfg = cam_cfg
        self.device = device

    @torch.no_grad()
    def _logits(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.model(tensor[None].to(self.device))[0]

    def __call__(self, image: np.ndarray, labels: list[int], mode: str) -> dict:
        """Maps for ``mode`` gt | pred | union; ``confident`` = union without the top-1
        fallback, for a binary classifier that must say nothing when it sees nothing."""
        cfg = self.cfg
        tensor = network_input(image, cfg.input_long_side)
        logits = self._logits(tensor) if mode != "gt" else None
        if mode == "confident":
            probs = logits.float().sigmoid().cpu().numpy()
            labels = list(labels) + [c for c, p in zip(self.model.class_ids, probs)
                                     if p >= cfg.threshold]
            mode = "gt"
        outputs = select_outputs(mode, labels, self.model.class_ids, logits, cfg.threshold)
        maps = multiscale_cams(self.model, tensor, outputs, cfg.method, cfg.scales, cfg.flip,
                               cfg.target_layer, cfg.normalize)
        if cfg.fine_layer:
            fine = multiscale_cams(self.model, tensor, outputs, "layercam", cfg.scales, cfg.flip,
                                   cfg.fine_layer, cfg.normalize)
            maps = geometric_mean(maps, fine, cfg.normalize)
        height, width = image.shape[:2]
        if tensor.shape[1:] == (height, width):
            cam, high_res = maps.cam, maps.high_res
        else:
            cam, high_res = _to_image_size(maps.high_res, height, width)
        keys = np.array([self.model.class_ids[i] for i in outputs], dtype=np.int64)
        return {"keys": keys, "cam": cam, "high_res": high_res}


def _check(cfg) -> list[Path]:
    c = cfg.cams
    for key, value, allowed in (("method", c.method, METHODS), ("labels", c.labels, LABEL_MODES),
                                ("normalize", c.normalize, NORMALIZATIONS),
                                ("classifier_epoch", c.classifier_epoch, CHECKPOINT_EPOCHS)):
        if value not in allowed:
            raise ConfigError(f"key 'cams.{key}' must be one of {', '.join(allowed)}, got {value!r}")
    weights = f"{c.classifier_epoch}.pt"
    checkpoints = [("cams.checkpoint", Path(c.checkpoint or classifier_dir(cfg.work_dir) / weights))]
    checkpoints += [("cams.extra_checkpoints", Path(p)) for p in c.extra_checkpoints]
    checkpoints += [("cams.extra_classifiers", classifier_dir(cfg.work_dir, v) / weights)
                    for v in c.extra_classifiers]
    for key, path in checkpoints:
        if not path.is_file():
            raise ConfigError(f"key '{key}': classifier checkpoint not found: {path}")
    return [path for _, path in checkpoints]


def step_inputs(cfg) -> dict[str, Path]:
    """What this step reads (``provenance``): step 1's folder (or the checkpoint named), and
    the extra classifiers' checkpoints or folders."""
    inputs = {"classifier": Path(cfg.cams.checkpoint) if cfg.cams.checkpoint
              else classifier_dir(cfg.work_dir)}
    inputs.update({f"extra_checkpoints[{i}]": Path(p) for i, p in enumerate(cfg.cams.extra_checkpoints)})
    inputs.update({f"classifier_{v}": classifier_dir(cfg.work_dir, v) for v in cfg.cams.extra_classifiers})
    return inputs


def run(cfg) -> dict:
    """Write ``2_cams/<id>.npz`` for every image of ``cams.split`` (resuming); returns a summary."""
    checkpoints = _check(cfg)
    device = resolve_device(cfg.device)
    step = start_image_step(cfg, 2, cfg.cams.split, ".npz", DEFAULTS, step_inputs(cfg))
    source = step.source
    main = CamExtractor(checkpoints[0], device, cfg.cams, source.class_names)
    # An excluded class's binary classifier adds its map where it predicts the class.
    extras = [CamExtractor(path, device, cfg.cams, source.class_names) for path in checkpoints[1:]]
    loader = DataLoader(_ImageList(source, step.todo), batch_size=None, num_workers=cfg.num_workers)
    background_only = []

    def extract(item) -> None:
        image_id, image, error = item
        if error is not None:
            raise OSError(error)
        labels = source.labels(image_id)
        cams = main(image, labels, cfg.cams.labels)
        for extra in extras:
            extra_cams = extra(image, labels, "confident")
            present = np.isin(extra_cams["keys"], cams["keys"], invert=True)
            cams = merge_cams(cams, {k: v[present] for k, v in extra_cams.items()})
        save_cams(step.out_dir / f"{image_id}.npz", cams["keys"], cams["cam"], cams["high_res"])
        if len(cams["keys"]) == 0:
            background_only.append(image_id)

    written, failed = run_over_images(loader, extract, STEP_DIRS[2], cfg.on_error)
    return step.finish(written, failed, background_only=len(background_only))


def summary_line(summary: dict) -> str:
    return (f"{image_summary_line(STEP_DIRS[2], summary)}; {summary['background_only']} with "
            f"no class: all background")
