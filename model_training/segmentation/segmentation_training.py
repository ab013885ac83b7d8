"""Step 6: train a segmentation network on the pseudo masks of step 5 (or on ground truth).

``mask_source: pseudo`` reads ``<work_dir>/5_pseudo_masks/<id>.png`` for the training split;
``mask_source: gt`` trains on the dataset's own masks with the same settings, the fully
supervised upper bound the pseudo-mask model is judged against. Validation scores the
full-size val images with step 7's own prediction code (one view, no gate),
``best.pt`` is the best val mIoU, and the end of the run exports ``model.pt`` (from ``best.pt``,
or with ``export.epoch: last`` from the final epoch's ``last.pt``) plus
``export_config.yaml`` in the format of the standalone submission folder (step 7).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from inference.segmentation.submit.generate_predictions import DEFAULTS as SUBMIT_DEFAULTS
from inference.segmentation.submit.generate_predictions import (checkpoint_metadata,
                                                                make_checkpoint, network_stride,
                                                                predict_probabilities)
from model_training.common import distributed
from model_training.common.checkpoints import read_checkpoint
from model_training.common.config import (AT_LEAST_1, AT_LEAST_ONE_ITEM, FRACTION,
                                          NON_NEGATIVE, NONE_OR_PAIR, POSITIVE, Config,
                                          ConfigError, Schema, StepError, merge_defaults)
from model_training.common.datasets import ImageLoadError, ImageSource, build_source
from model_training.common.metrics import IGNORE_INDEX, ConfusionMatrix
from model_training.common.models.segmentation import build_model, model_config_from
from model_training.common.progress import progress
from model_training.common.sampling import RepeatFactorSampler, repeat_factors
from model_training.common.step_io import (STEP_DIRS, first_line, load_png, report_failure,
                                           step_dir, stopped_at, write_or_stop)
from model_training.common.trainer import (CHECKPOINT_EPOCHS, TRAIN_DEFAULTS, Trainer,
                                           TrainingParts, finish_training_step, seed_worker,
                                           start_training_step)
from model_training.common.transforms import (IMAGENET_MEAN, IMAGENET_STD, build_transform,
                                              image_to_tensor)

STEP = 6
RERUN_STEP_6 = "re-run step 6 with overwrite=true"
BEST_KEYS = ("model", "model_config", "class_names", "epoch")  # what best.pt needs for export
MASK_SOURCES = ("pseudo", "gt")

SHARDABLE = False

DEFAULTS = merge_defaults(TRAIN_DEFAULTS, Schema({
    "mask_source": "pseudo",  # pseudo | gt (the fully supervised upper bound)
    "pseudo_mask_dir": None,  # folder of <id>.png; null = <work_dir>/5_pseudo_masks
    "model": {
        "arch": "DeepLabV3Plus",  # any smp architecture
        "encoder_name": "tu-tf_efficientnet_lite0",  # any smp encoder, tu-<timm name> included
        "encoder_output_stride": 16,  # 8 | 16 where the arch takes it; null for other archs
        "encoder_weights": "imagenet",  # imagenet | none | <state-dict file>
    },
    "data": {
        "input_long_side": None,  # long side the network sees (train base, val, step 7); null = as is
        "scale_range": [0.5, 1.5],  # random rescale of training images around input_long_side
        "crop_size": 320,  # square training crop (padded with ignore); a multiple of the stride
        "hflip": True,
        "color_jitter": 0.0,
        "repeat_threshold": 0.0,  # repeat-factor sampling (LVIS) by the classes each mask holds; 0: off
        "class_crop": 0.0,  # share of crops centred on a pixel of one of the mask's classes; 0: off
    },
    "loss": {
        "class_weights": None,  # null or one weight per class (background first)
    },
    "val": {
        "max_images": 0,  # choose best.pt on the first N val images (0 = all); the report holds out the rest
    },
    "export": {  # test-time augmentation written to export_config.yaml for step 7
        "epoch": "best",  # model.pt from best.pt (best val mIoU) or last.pt (the final epoch, as IRNet)
        "scales": list(SUBMIT_DEFAULTS["scales"]),
        "flip": SUBMIT_DEFAULTS["flip"],
    },
    "train": {
        "epochs": 30,
        "batch_size": 8,
        "lr": 0.01,
        "new_layer_lr_mult": 10.0,
    },
}, ranges={
    "data.input_long_side": AT_LEAST_1,
    "data.scale_range": POSITIVE,
    "data.crop_size": NON_NEGATIVE,  # a multiple of the network's stride: checked at the start
    "data.color_jitter": NON_NEGATIVE,
    "data.repeat_threshold": FRACTION,
    "data.class_crop": FRACTION,
    "loss.class_weights": NON_NEGATIVE,
    "val.max_images": NON_NEGATIVE,
    "export.scales": POSITIVE,
}, types={"pseudo_mask_dir": str, "data.input_long_side": int, "loss.class_weights": list},
   sizes={"data.scale_range": NONE_OR_PAIR, "export.scales": AT_LEAST_ONE_ITEM}))


# ---- model --------------------------------------------------------------------------------

def param_groups(model: nn.Module, new_layer_lr_mult: float) -> list[dict]:
    """Encoder at the base LR; decoder and head (new layers) at ``new_layer_lr_mult`` times it."""
    encoder = list(model.encoder.parameters())
    encoder_ids = {id(p) for p in encoder}
    new = [p for p in model.parameters() if id(p) not in encoder_ids]
    return [{"params": encoder, "lr_mult": 1.0, "name": "encoder"},
            {"params": new, "lr_mult": new_layer_lr_mult, "name": "decoder"}]


# ---- data ---------------------------------------------------------------------------------

def mask_dir_for(cfg: Config) -> Path | None:
    """Where the training masks come from: a pseudo-mask folder, or None for ground truth."""
    if cfg.mask_source not in MASK_SOURCES:
        raise ConfigError(f"key 'mask_source' must be pseudo or gt, got {cfg.mask_source!r}")
    if cfg.mask_source == "gt":
        return None
    folder = step_inputs(cfg)["masks"]
    if not folder.is_dir():
        raise ConfigError(f"key 'pseudo_mask_dir': folder not found: {folder} (run step 5 first, "
                          f"or set mask_source=gt)")
    return folder


class SegmentationDataset(Dataset):
    """Training pairs (image tensor, long mask) of one split: pseudo masks or ground truth.

    Images without a mask file are left out (reported once, as a count). An image or mask
    that fails to load is reported and replaced by the next one, unless ``on_error`` is stop.
    """

    def __init__(self, source: ImageSource, mask_dir: Path | None, transform,
                 on_error: str = "skip"):
        self.source, self.mask_dir, self.transform, self.on_error = source, mask_dir, transform, on_error
        if mask_dir is None:
            if not source.has_masks:
                raise ConfigError(f"mask_source=gt: dataset '{source.name}' has no ground-truth "
                                  f"masks for this split")
            self.ids = list(source.ids)
        else:
            present = {p.stem for p in mask_dir.glob("*.png")}
            self.ids = [i for i in source.ids if i in present]
            missing = len(source.ids) - len(self.ids)
            if missing:
                print(f"warning: {missing} of {len(source.ids)} training images have no mask in "
                      f"{mask_dir}; left out", file=sys.stderr)
        if not self.ids:
            raise ConfigError(f"no training masks in {mask_dir}")

    def __len__(self) -> int:
        return len(self.ids)

    def load_mask(self, image_id: str) -> np.ndarray | None:
        """The training mask as stored: a pseudo mask, or the ground truth (None if absent)."""
        if self.mask_dir is None:
            return self.source.load_mask(image_id)
        path = self.mask_dir / f"{image_id}.png"
        try:
            return load_png(path)
        except OSError as err:
            raise ImageLoadError(f"cannot read mask {path}: {err}") from None

    def load_pair(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 image and mask at the image's original size."""
        image = self.source.load_image(image_id)
        mask = self.load_mask(image_id)
        if mask is None or mask.shape != image.shape[:2]:
            shape = None if mask is None else mask.shape
            raise ImageLoadError(f"mask of {image_id} has shape {shape}, image {image.shape[:2]}")
        if np.any((mask >= self.source.num_classes) & (mask != IGNORE_INDEX)):
            raise ImageLoadError(f"mask of {image_id} holds ids beyond the "
                                 f"{self.source.num_classes} classes")
        return image, mask

    def mask_classes(self) -> np.ndarray:
        """(images, foreground classes) 0/1: which classes each training mask holds, for
        repeat-factor sampling; a mask that cannot be read holds none (training reports it)."""
        present = np.zeros((len(self.ids), self.source.num_classes - 1), dtype=np.float64)
        for row, image_id in enumerate(self.ids):
            try:
                mask = self.load_mask(image_id)
            except ImageLoadError:
                continue
            if mask is None:
                continue
            classes = np.unique(mask)
            classes = classes[(classes > 0) & (classes < self.source.num_classes)]
            present[row, classes - 1] = 1.0
        return present

    def __getitem__(self, index: int):
        for offset in range(len(self.ids)):
            image_id = self.ids[(index + offset) % len(self.ids)]
            try:
                return self.transform(*self.load_pair(image_id))
            except ImageLoadError as err:
                report_failure(image_id, err)
                if self.on_error == "stop":
                    raise stopped_at(image_id, err) from None
        raise StepError("no training image could be read (see the warnings above)")


def build_train_loader(dataset: SegmentationDataset, batch_size: int, num_workers: int, seed: int,
                       pin_memory: bool, repeat_threshold: float = 0.0) -> DataLoader:
    """Shuffled batches; with ``repeat_threshold`` an image whose mask holds a class that few
    masks hold is drawn up to sqrt(t / share) times an epoch (step 1 draws by labels alike)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    if repeat_threshold > 0:
        sampler = RepeatFactorSampler(repeat_factors(dataset.mask_classes(), repeat_threshold),
                                      seed=seed, num_replicas=distributed.world_size(),
                                      rank=distributed.rank())
    elif distributed.world_size() > 1:  # each rank takes its share of every epoch
        sampler = distributed.train_sampler(dataset, seed)
    else:  # one process shuffles with the loader's generator
        sampler = None
    per_rank = len(dataset) if sampler is None else len(sampler)
    # BatchNorm cannot train on a batch of one: drop a ragged last batch when there is a full one.
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=num_workers, drop_last=per_rank >= batch_size,
                      pin_memory=pin_memory,
                      worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=num_workers > 0)


# ---- validation ---------------------------------------------------------------------------

def usable_val_ids(source: ImageSource, ids: Sequence[str], on_error: str = "skip") -> list[str]:
    """The val ids whose image and mask load and fit each other, checked once before
    training: a bad val mask would otherwise end the run in the first validation, after a
    whole epoch. A bad one is reported and left out (``on_error`` stop: a one-line error)."""
    pairs = SegmentationDataset(source, None, transform=None)
    usable = []
    for image_id in ids:
        try:
            pairs.load_pair(image_id)
        except ImageLoadError as err:
            if on_error == "stop":
                raise ConfigError(f"val: {first_line(err)} (on_error=stop)") from None
            report_failure(image_id, err)
            continue
        usable.append(image_id)
    if ids and not usable:
        raise ConfigError(f"none of the {len(ids)} val images of '{source.name}' has a usable mask")
    return usable


@torch.inference_mode()
def evaluate(model: nn.Module, source: ImageSource, ids: Sequence[str],
             input_long_side: int | None, on_error: str = "skip") -> dict:
    """mIoU, pixel accuracy and per-class IoU (percent) of ``ids`` against their ground truth.

    ``model`` is expected in eval mode; an unreadable image is reported and left out.
    """
    device = next(model.parameters()).device
    matrix = ConfusionMatrix(source.num_classes)
    for image_id in progress(ids, "val", unit="img", leave=False):
        try:
            image, mask = source.load_image(image_id), source.load_mask(image_id)
        except ImageLoadError as err:
            report_failure(image_id, err)
            if on_error == "stop":
                raise stopped_at(image_id, err) from None
            continue
        tensor = image_to_tensor(image)[None].to(device)
        pred = predict_probabilities(model, tensor, [1.0], False, input_long_side).argmax(0)
        matrix.update(pred.cpu().numpy(), mask)
    return matrix.summary(source.class_names)


# ---- export -------------------------------------------------------------------------------

def export_chosen_epoch(out_dir: Path, cfg: Config) -> int:
    """Export ``best.pt`` or ``last.pt`` (``export.epoch``) as step 7's model; returns its epoch.
    ``last`` takes the final epoch whatever val says: a best epoch chosen on the images that
    also score the model is chosen partly on their noise."""
    chosen = read_checkpoint(out_dir / f"{cfg.export.epoch}.pt", RERUN_STEP_6, keys=BEST_KEYS)
    checkpoint = {**make_checkpoint(chosen["model"], chosen["model_config"], chosen["class_names"],
                                    IMAGENET_MEAN, IMAGENET_STD), "epoch": chosen["epoch"]}
    export_for_submission(out_dir, checkpoint, cfg)
    return chosen["epoch"]


def export_for_submission(out_dir: Path, checkpoint: Mapping, cfg: Config) -> Path:
    """``model.pt`` and a step-7 ``export_config.yaml`` that resizes as training did."""
    model_path = write_or_stop(out_dir / "model.pt", lambda tmp: torch.save(dict(checkpoint), tmp))
    submit_cfg = {**SUBMIT_DEFAULTS, "weights": model_path.name, "scales": list(cfg.export.scales),
                  "flip": bool(cfg.export.flip), "input_long_side": cfg.data.input_long_side}
    text = ("# Step-7 config for generate_predictions.py --config (written by step 6).\n"
            + yaml.safe_dump(submit_cfg, sort_keys=False))
    write_or_stop(out_dir / "export_config.yaml", lambda tmp: Path(tmp).write_text(text))
    return model_path


# ---- the step -----------------------------------------------------------------------------

def _check_settings(cfg: Config, num_classes: int) -> None:
    if cfg.export.epoch not in CHECKPOINT_EPOCHS:
        raise ConfigError(f"key 'export.epoch' must be one of {', '.join(CHECKPOINT_EPOCHS)}, "
                          f"got {cfg.export.epoch!r}")
    weights = cfg.loss.class_weights
    if weights is not None and (not isinstance(weights, list) or len(weights) != num_classes):
        raise ConfigError(f"key 'loss.class_weights' must be null or a list of {num_classes} numbers")


def _check_crop(crop: int, stride: int) -> None:
    """Training batches go through the network uncropped: their side must fit its stride."""
    if crop < stride or crop % stride:
        raise ConfigError(f"key 'data.crop_size' must be a multiple of the network stride {stride}, got {crop}")


def _parts(cfg: Config, device: torch.device, mask_dir: Path | None,
           train_source: ImageSource, val_source: ImageSource) -> tuple[TrainingParts, dict]:
    """The network on ``mask_dir`` (None: ground truth) and its loader, loss and validation;
    with the model's configuration."""
    model_config = model_config_from(cfg.model, train_source.num_classes)
    model = build_model(model_config, cfg.model.encoder_weights).to(device)
    _check_crop(cfg.data.crop_size, network_stride(model))

    data = cfg.data
    transform = build_transform(True, crop_size=data.crop_size, resize_long=data.input_long_side,
                                scale_range=data.scale_range, hflip=data.hflip,
                                color_jitter=data.color_jitter, class_crop=data.class_crop)
    dataset = SegmentationDataset(train_source, mask_dir, transform, cfg.on_error)
    loader = build_train_loader(dataset, cfg.train.batch_size, cfg.num_workers,
                                cfg.seed, pin_memory=device.type == "cuda",
                                repeat_threshold=data.repeat_threshold)

    weights = cfg.loss.class_weights
    criterion = nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
        ignore_index=IGNORE_INDEX)

    def step_fn(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, masks = batch
        return {"loss": criterion(net(images).float(), masks)}

    validate_fn = None
    if val_source.has_masks:
        val_ids = usable_val_ids(val_source, val_source.ids[: cfg.val.max_images or None],
                                 cfg.on_error)

        def validate_fn(net: nn.Module) -> dict:
            return evaluate(net, val_source, val_ids, data.input_long_side, cfg.on_error)
    else:
        print(f"warning: split '{cfg.dataset.val_split}' has no masks: no validation, "
              f"best.pt is the last epoch", file=sys.stderr)
    parts = TrainingParts(model, param_groups(model, cfg.train.new_layer_lr_mult), loader,
                          step_fn, validate_fn)
    return parts, model_config


def training_parts(cfg: Config, device: torch.device) -> TrainingParts:
    """The network, loader and loss step 6 trains, without claiming its folder."""
    train_source = build_source(cfg.dataset, cfg.dataset.train_split)
    val_source = build_source(cfg.dataset, cfg.dataset.val_split)
    mask_dir = mask_dir_for(cfg)
    _check_settings(cfg, train_source.num_classes)
    return _parts(cfg, device, mask_dir, train_source, val_source)[0]


def _train(cfg: Config, device: torch.device, out_dir: Path, mask_dir: Path | None,
           train_source: ImageSource, val_source: ImageSource) -> dict:
    """Train the network on ``mask_dir`` (None: ground truth) into ``out_dir``; returns the
    Trainer's result."""
    parts, model_config = _parts(cfg, device, mask_dir, train_source, val_source)
    metadata = checkpoint_metadata(model_config, train_source.class_names, IMAGENET_MEAN,
                                   IMAGENET_STD)
    fields = {**metadata, "mask_source": cfg.mask_source, "config": cfg.to_dict()}
    masks = "ground-truth" if mask_dir is None else str(mask_dir)
    draws = (f"{len(parts.loader.sampler)} draws an epoch by repeat_threshold "
             f"{cfg.data.repeat_threshold:g}; " if cfg.data.repeat_threshold > 0 else "")
    ema = f", weights averaged (ema_decay {cfg.train.ema_decay:g})" if cfg.train.ema_decay > 0 else ""
    print(f"6_segmentation: {len(parts.loader.dataset)} training images ({draws}masks: {masks}), "
          f"{model_config['arch']} / {model_config['encoder_name']}, device {device}{ema}", file=sys.stderr)
    trainer = Trainer(distributed.wrap_model(parts.model, device, cfg.train.sync_bn),
                      parts.param_groups, parts.loader, out_dir, cfg.train, device,
                      step_fn=parts.step_fn, validate_fn=parts.validate_fn,
                      best_metric="miou" if parts.validate_fn else None,
                      checkpoint_fields=fields, resume=cfg.resume)
    return trainer.fit()


def step_inputs(cfg: Config) -> dict[str, Path]:
    """What this step reads besides the dataset (``provenance``): the pseudo masks, or
    nothing with ``mask_source=gt``."""
    if cfg.mask_source == "gt":
        return {}
    return {"masks": Path(cfg.pseudo_mask_dir or Path(cfg.work_dir) / STEP_DIRS[5])}


def run(cfg: Config) -> dict:
    """Train, validate and export; returns the best val mIoU (percent) and the file paths."""
    started = time.time()
    out_dir = step_dir(cfg.work_dir, STEP)
    dataset_cfg = cfg.dataset
    train_source = build_source(dataset_cfg, dataset_cfg.train_split)
    val_source = build_source(dataset_cfg, dataset_cfg.val_split)
    mask_dir = mask_dir_for(cfg)
    _check_settings(cfg, train_source.num_classes)
    device = start_training_step(cfg, out_dir, DEFAULTS, step_inputs(cfg))

    result = _train(cfg, device, out_dir, mask_dir, train_source, val_source)
    validated = val_source.has_masks
    exported_epoch = export_chosen_epoch(out_dir, cfg) if distributed.is_main() else None
    return finish_training_step(out_dir, {
        "miou": result["best_score"] if validated else None, "best_epoch": result["best_epoch"],
        "exported_epoch": exported_epoch, "epochs": result["epochs"], "split": dataset_cfg.val_split,
        "model": str(out_dir / "model.pt"), "export_config": str(out_dir / "export_config.yaml")},
        started)


def summary_line(summary: dict) -> str:
    miou = "n/a (no val masks)" if summary["miou"] is None else f"{summary['miou']:.2f}"
    epoch = summary.get("exported_epoch")  # absent from a done.json older than export.epoch
    exported = f" (epoch {epoch})" if epoch is not None else ""
    return (f"{STEP_DIRS[6]}: val mIoU {miou} (best epoch {summary['best_epoch']}/"
            f"{summary['epochs']}, split {summary['split']}, {summary['seconds']:.0f}s); "
            f"exported {summary['model']}{exported}")
