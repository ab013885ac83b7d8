"""Step 4: train IRNet's boundary (and optional displacement) branches on the IR labels.

The backbone is ImageNet-pretrained and frozen; only the branches learn, from pairs of
pixels within ``irn.radius`` (stride 4) whose IR labels agree (positive affinity) or
differ (negative). Pixels labelled 255 give no pairs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from model_training.common import distributed
from model_training.common.config import (AT_LEAST_1, COMMON_DEFAULTS, NON_NEGATIVE, NONE_OR_PAIR,
                                          PAIR, POSITIVE, ConfigError, Range, Schema,
                                          StepError, merge_defaults)
from model_training.common.datasets import build_source
from model_training.common.models import check_backbone_keys, weights_error_names
from model_training.common.models.irnet import build_irnet
from model_training.common.path_index import PathIndex, edge_to_affinity
from model_training.common.step_io import STEP_DIRS, load_png, step_dir
from model_training.common.trainer import (TRAIN_DEFAULTS, Trainer, TrainingParts,
                                           finish_training_step, seed_worker,
                                           start_training_step)
from model_training.common.transforms import build_transform

from .irn_targets import affinity_targets, irn_losses, label_to_stride

SHARDABLE = False

DEFAULTS = merge_defaults(COMMON_DEFAULTS, TRAIN_DEFAULTS, Schema({
    "irn": {
        "split": "train",
        "backbone": "resnet50",  # resnet50 | vgg16 | any timm model
        "weights": "imagenet",  # imagenet | none | path to a state dict
        "output_stride": 16,
        "with_displacement": True,  # semantic masks need only the boundary branch
        "displacement_lr_mult": 10.0,
        "radius": 10,  # path-index radius at stride 4 for training pairs
    },
    "data": {
        "resize_long": [320, 640],
        "scale_range": [],
        "crop_size": 512,
        "hflip": True,
    },
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.1},
}, ranges={
    "irn.displacement_lr_mult": POSITIVE,
    "irn.radius": Range(2),  # the path index links pixels at distance >= 1
    "data.resize_long": AT_LEAST_1,
    "data.scale_range": POSITIVE,
    "data.crop_size": NON_NEGATIVE,  # 0 is refused with a reason when the step starts
}, sizes={"data.resize_long": PAIR, "data.scale_range": NONE_OR_PAIR}))


class IRLabelDataset(Dataset):
    """Training images with their ``3_ir_labels`` PNG, augmented jointly (label pad = 255)."""

    def __init__(self, source, ids, label_dir: Path, transform):
        self.source, self.ids, self.label_dir, self.transform = source, list(ids), label_dir, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = self.source.load_image(image_id)
        label = load_png(self.label_dir / f"{image_id}.png")
        if label.shape != image.shape[:2]:
            raise StepError(f"{self.label_dir / image_id}.png: label {label.shape} vs image "
                            f"{image.shape[:2]} (step 3 ran on other images): re-run step 3 "
                            f"with overwrite=true")
        tensor, label = self.transform(image, label)
        return {"image": tensor, "label": label}


def _check(cfg) -> None:
    check_backbone_keys("irn", cfg.irn.backbone, cfg.irn.weights, cfg.irn.output_stride)
    if not cfg.data.crop_size:
        raise ConfigError("key 'data.crop_size' must be set: IRNet trains on square crops")


def step_inputs(cfg) -> dict[str, Path]:
    """What this step reads (``provenance``): step 3's IR labels."""
    return {"ir_labels": Path(cfg.work_dir) / STEP_DIRS[3]}


def _labelled_ids(cfg) -> tuple:
    """(source, ids with an IR label): checked before the step claims its folder."""
    _check(cfg)
    source = build_source(cfg.dataset, cfg.irn.split)
    label_dir = step_dir(cfg.work_dir, 3)
    ids = [i for i in source.ids if (label_dir / f"{i}.png").is_file()]
    if not ids:
        raise ConfigError(f"no IR labels in {label_dir}: run step 3 first")
    return source, ids


def _parts(cfg, source, ids: list[str], device) -> TrainingParts:
    transform = build_transform(True, crop_size=cfg.data.crop_size, resize_long=cfg.data.resize_long,
                                scale_range=cfg.data.scale_range or None, hflip=cfg.data.hflip)
    dataset = IRLabelDataset(source, ids, step_dir(cfg.work_dir, 3), transform)
    sampler = distributed.train_sampler(dataset, cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                        num_workers=cfg.num_workers, worker_init_fn=seed_worker,
                        drop_last=len(sampler) > cfg.train.batch_size,
                        persistent_workers=cfg.num_workers > 0, pin_memory=device.type == "cuda")
    with weights_error_names("irn.weights"):
        model = build_irnet(cfg.irn).to(device)
    path_index = PathIndex(cfg.irn.radius)

    def step_fn(net, batch) -> dict:
        out = net(batch["image"])
        label = label_to_stride(batch["label"], out.edge_logits.shape[-2:])
        targets = affinity_targets(label, path_index)
        affinity = edge_to_affinity(out.boundary, path_index)
        losses = irn_losses(affinity, targets, path_index, out.displacement)
        return {"loss": losses.pop("total"), **losses}

    return TrainingParts(model, model.param_groups(cfg.irn.displacement_lr_mult), loader, step_fn)


def training_parts(cfg, device) -> TrainingParts:
    """The model, loader and loss step 4 trains, without claiming its folder."""
    return _parts(cfg, *_labelled_ids(cfg), device)


def run(cfg) -> dict:
    """Train IRNet into ``4_irn/`` (best.pt = last epoch); returns the trainer's summary."""
    started = time.time()
    source, ids = _labelled_ids(cfg)
    out_dir = step_dir(cfg.work_dir, 4)
    device = start_training_step(cfg, out_dir, DEFAULTS, step_inputs(cfg))
    if len(ids) < len(source.ids):
        print(f"4_irn: {len(source.ids) - len(ids)} images have no IR label and are left out",
              file=sys.stderr)
    parts = _parts(cfg, source, ids, device)
    arch = {k: cfg.irn[k] for k in ("backbone", "weights", "output_stride", "with_displacement")}
    trainer = Trainer(distributed.wrap_model(parts.model, device, cfg.train.sync_bn),
                      parts.param_groups, parts.loader, out_dir, cfg.train, device,
                      step_fn=parts.step_fn,
                      checkpoint_fields={"arch": arch, "config": cfg.to_dict()},
                      resume=cfg.resume)
    return finish_training_step(out_dir, {**trainer.fit(), "images": len(ids)}, started)


def summary_line(summary: dict) -> str:
    return f"{STEP_DIRS[4]}: {summary['images']} images, {summary['seconds']} s"
