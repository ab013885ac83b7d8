"""Step 1: train the multi-label classifier the CAMs come from (docs/design.md).

Missing labels and class imbalance are handled here, before the shared training loop:
``exclude_classes`` leaves classes out of the head, ``drop_images_with`` removes images that
carry them from the training list ("no people allowed"), ``negative_weight`` trusts a
missing label less than a present one, ``pos_weight`` and the repeat-factor sampler lift
rare classes. A binary classifier for an excluded class is the same code path with
``target_classes: [person]``, its own ``train_list`` and ``variant: person``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from model_training.common import distributed
from model_training.common.config import (AT_LEAST_1, COMMON_DEFAULTS, FRACTION, NON_NEGATIVE,
                                          NONE_OR_PAIR, PAIR, POSITIVE, Config, ConfigError,
                                          Schema, StepError, merge_defaults)
from model_training.common.datasets import (ImageLoadError, ImageSource, build_source,
                                            labels_to_vector)
from model_training.common.datasets.voc import read_id_list
from model_training.common.models import (CamClassifier, build_cam_classifier, check_backbone_keys,
                                          init_from_checkpoint, weights_error_names)
from model_training.common.metrics import classification_metrics
from model_training.common.progress import progress
from model_training.common.sampling import RepeatFactorSampler, repeat_factors
from model_training.common.step_io import classifier_dir, report_failure, stopped_at
from model_training.common.trainer import (TRAIN_DEFAULTS, Trainer, TrainingParts,
                                           finish_training_step, seed_worker,
                                           start_training_step)
from model_training.common.transforms import build_transform

SHARDABLE = False

DEFAULTS = merge_defaults(COMMON_DEFAULTS, TRAIN_DEFAULTS, Schema({
    "variant": "",  # non-empty: write to 1_classifier_<variant> (e.g. a binary "person" model)
    "model": {
        "backbone": "tf_efficientnet_lite0",  # resnet50 | vgg16 | any timm model
        "weights": "imagenet",  # imagenet | none | path to a state dict
        "output_stride": 16,  # 8 | 16 | 32: CAM resolution
        "freeze_bn": False,  # keep BatchNorm statistics fixed (small batches)
        # ReCAM (Chen et al. CVPR 2022): a second head learns, by softmax cross-entropy, which
        # class the features under each class's CAM show; step 2's CAMs use both heads
        "recam": False,
        # a step-1 best.pt / last.pt to start from (ReCAM fine-tunes a trained classifier)
        "init_from": None,
    },
    "data": {
        "train_list": "",  # file of image ids (one a line) replacing the training split's list
        "target_classes": [],  # names or ids the head predicts; empty: every foreground class
        "exclude_classes": [],  # names or ids left out of the head
        "drop_images_with": [],  # names or ids: training images labelled with them are removed
        "resize_long": [320, 320],  # training long side, drawn from [low, high]; val: the middle
        "scale_range": [],  # optional extra random rescale [low, high]
        "crop_size": 0,  # random crop (padded) to a square; 0: none (images must share a size)
        "hflip": True,
        "color_jitter": 0.0,
        "repeat_threshold": 0.0,  # repeat-factor sampling threshold t (LVIS); 0: off
    },
    "loss": {
        "pos_weight": False,  # weigh positives of class c by #negatives/#positives (clipped)
        "max_pos_weight": 10.0,
        "negative_weight": 1.0,  # < 1 trusts an absent label less (missing labels)
        "negative_weight_classes": [],  # names or ids it applies to; empty: every class
        "recam_weight": 1.0,  # ReCAM's cross-entropy beside the multi-label loss (model.recam)
    },
    "val": {
        "batch_size": 32,
        "threshold": 0.5,  # sigmoid threshold of the F1 scores
    },
}, ranges={
    "data.resize_long": AT_LEAST_1,
    "data.scale_range": POSITIVE,
    "data.crop_size": NON_NEGATIVE,  # 0: no crop
    "data.color_jitter": NON_NEGATIVE,
    "data.repeat_threshold": FRACTION,
    "loss.max_pos_weight": POSITIVE,
    "loss.negative_weight": NON_NEGATIVE,
    "loss.recam_weight": NON_NEGATIVE,
    "val.batch_size": AT_LEAST_1,
    "val.threshold": FRACTION,
}, run_only={"val.batch_size"}, types={"model.init_from": str},
   sizes={"data.resize_long": PAIR, "data.scale_range": NONE_OR_PAIR}))


# ---- classes and images -------------------------------------------------------------------
def class_id(source: ImageSource, item: Any, key: str) -> int:
    """A foreground class given by id or name; anything else is a ConfigError naming ``key``."""
    if isinstance(item, int) and not isinstance(item, bool) and 0 < item < source.num_classes:
        return item
    if isinstance(item, str) and item in source.class_names[1:]:
        return source.class_names.index(item)
    raise ConfigError(f"key '{key}': unknown class {item!r} "
                      f"(classes: {', '.join(source.class_names[1:])})")


def output_class_ids(source: ImageSource, target_classes: Sequence = (),
                     exclude_classes: Sequence = ()) -> list[int]:
    """The classes the head predicts, in dataset order: targets (all) minus exclusions."""
    if target_classes:
        targets = {class_id(source, c, "data.target_classes") for c in target_classes}
    else:
        targets = set(range(1, source.num_classes))
    excluded = {class_id(source, c, "data.exclude_classes") for c in exclude_classes}
    ids = sorted(targets - excluded)
    if not ids:
        raise ConfigError("keys 'data.target_classes'/'data.exclude_classes' leave no class to train")
    return ids


def read_train_list(path: str | Path) -> list[str]:
    """The ids of ``data.train_list`` (VOC ImageSets format)."""
    if not Path(path).is_file():
        raise ConfigError(f"key 'data.train_list': file does not exist: {path}")
    return read_id_list(path)


def training_images(source: ImageSource, ids: Iterable[str], drop_class_ids: Iterable[int],
                    on_error: str = "skip") -> tuple[list[str], list[list[int]], int]:
    """(kept ids, their labels, number dropped for carrying a ``drop_images_with`` class).

    An image whose labels cannot be read is reported and left out.
    """
    drop = set(drop_class_ids)
    kept, labels, dropped = [], [], 0
    for image_id in ids:
        try:
            image_labels = source.labels(image_id)
        except ImageLoadError as err:
            report_failure(image_id, err)
            if on_error == "stop":
                raise stopped_at(image_id, err) from None
            continue
        if drop.intersection(image_labels):
            dropped += 1
            continue
        kept.append(image_id)
        labels.append(list(image_labels))
    return kept, labels, dropped


class MultiLabelDataset(Dataset):
    """Images of a source with multi-hot targets over the classifier's outputs.

    An unreadable image is reported once (the error names the file) and never tried
    again. With ``substitute`` (training) the next readable image takes its place, so
    batches keep their size; without it (validation) the item is None and
    ``collate_images`` leaves it out, so no image is counted twice.
    """

    def __init__(self, source: ImageSource, ids: Sequence[str], labels: Sequence[Sequence[int]],
                 class_ids: Sequence[int], transform, substitute: bool, on_error: str = "skip"):
        self.source = source
        self.ids = list(ids)
        self.targets = np.stack([labels_to_vector(l, class_ids) for l in labels]) if ids else \
            np.zeros((0, len(class_ids)), np.float32)
        self.transform = transform
        self.substitute = substitute
        self.on_error = on_error
        self.unreadable: set[str] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, index: int):
        image_id = self.ids[index]
        if image_id in self.unreadable:
            return None
        try:
            image = self.source.load_image(image_id)
        except ImageLoadError as err:
            if self.on_error == "stop":
                raise stopped_at(image_id, err) from None
            self.unreadable.add(image_id)
            report_failure(image_id, err)
            return None
        tensor, _ = self.transform(image)
        return {"image": tensor, "target": torch.from_numpy(self.targets[index]), "index": index}

    def __getitem__(self, index: int):
        if not self.substitute:
            return self._load(index)
        for step in range(len(self.ids)):
            item = self._load((index + step) % len(self.ids))
            if item is not None:
                return item
        raise StepError("no image of the training list could be read (see the warnings above)")


def collate_images(items: list) -> dict | None:
    """Stack items (None ones left out), zero-padding images to the batch's largest size."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    height = max(item["image"].shape[1] for item in items)
    width = max(item["image"].shape[2] for item in items)
    images = torch.stack([F.pad(item["image"], (0, width - item["image"].shape[2],
                                                0, height - item["image"].shape[1]))
                          for item in items])
    return {"image": images, "target": torch.stack([item["target"] for item in items]),
            "index": torch.tensor([item["index"] for item in items])}


# ---- imbalance ----------------------------------------------------------------------------
def positive_weights(targets: np.ndarray, max_weight: float) -> torch.Tensor:
    """BCE ``pos_weight`` per class: #negatives / #positives, clipped to [1/max, max]."""
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    weights = negatives / np.maximum(positives, 1.0)
    return torch.from_numpy(np.clip(weights, 1.0 / max_weight, max_weight).astype(np.float32))


# ---- loss and validation -----------------------------------------------------------------
def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor,
                    pos_weight: torch.Tensor | None = None,
                    negative_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Multi-label soft-margin loss (= BCE-with-logits averaged over classes and images),
    with optional per-class positive weights and a weight for absent labels (one number, or
    one per class: only the classes whose labels go missing need it)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pos_weight,
                                              reduction="none")
    if isinstance(negative_weight, torch.Tensor) or negative_weight != 1.0:
        loss = loss * torch.where(targets > 0, 1.0, negative_weight)
    return loss.mean()


def recam_loss(feats: torch.Tensor, targets: torch.Tensor, cam_head: torch.Tensor,
               recam_head: torch.Tensor) -> torch.Tensor:
    """ReCAM's loss: for every (image, labelled class c), the features A weighted by c's CAM
    (ReLU(W_c . A), divided by its max) are averaged over the map, and ``recam_head`` must
    tell c from the other classes by softmax cross-entropy. feats (B,C,h,w), targets (B,K),
    heads (K,C); 0 for a batch without labels."""
    cams = torch.relu(torch.einsum("kc,bchw->bkhw", cam_head, feats))
    cams = cams / (cams.amax(dim=(2, 3), keepdim=True) + 1e-5)
    selected = torch.einsum("bkhw,bchw->bkc", cams, feats) / cams[0, 0].numel()  # (B,K,C)
    images, classes = torch.nonzero(targets > 0, as_tuple=True)
    if len(classes) == 0:
        return feats.sum() * 0
    logits = selected[images, classes] @ recam_head.t()  # (N,K)
    return F.cross_entropy(logits.float(), classes)


def negative_weights(source: ImageSource, class_ids: Sequence[int], weight: float,
                     classes: Sequence = ()) -> torch.Tensor:
    """Per-output weight of an absent label: ``weight`` for ``classes`` (all when empty), 1
    for the others, whose negatives are trusted."""
    chosen = ({class_id(source, c, "loss.negative_weight_classes") for c in classes}
              if classes else set(class_ids))
    return torch.tensor([weight if c in chosen else 1.0 for c in class_ids])


@torch.no_grad()
def predict_scores(model: CamClassifier, loader: DataLoader, device: torch.device,
                   show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(sigmoid scores, targets) over a loader of ``collate_images`` batches."""
    scores, targets = [], []
    for batch in progress(loader, "val", leave=False, disable=not show_progress):
        if batch is None:
            continue
        logits = model(batch["image"].to(device, non_blocking=True))
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(batch["target"])
    if not scores:
        raise StepError("no validation image could be read (see the warnings above)")
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


# ---- the step -----------------------------------------------------------------------------
def _transform(data: Config, train: bool):
    return build_transform(train, crop_size=data.crop_size or None, resize_long=data.resize_long,
                           scale_range=data.scale_range or None, hflip=data.hflip,
                           color_jitter=data.color_jitter)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
            sampler=None, drop_last: bool = False) -> DataLoader:
    """Pinned host memory only when batches go to a CUDA device (a CPU run on a machine with
    a GPU would pin for nothing)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_images, drop_last=drop_last, worker_init_fn=seed_worker,
                      persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")


def _check_config(cfg: Config) -> None:
    check_backbone_keys("model", cfg.model.backbone, cfg.model.weights, cfg.model.output_stride)


def step_inputs(cfg: Config) -> dict:
    """What this step reads besides the dataset (``provenance``): the checkpoint it starts
    from, if any."""
    return {"init_from": Path(cfg.model.init_from)} if cfg.model.init_from else {}


class TrainingData(NamedTuple):
    """Step 1's checked inputs: what it reads, known before it claims its folder."""
    source: ImageSource
    val_source: ImageSource | None
    class_ids: list[int]
    names: list[str]  # the class names of the outputs
    ids: list[str]  # training images
    labels: list[list[int]]
    dropped: int  # images left out by drop_images_with


def _read_data(cfg: Config) -> TrainingData:
    _check_config(cfg)
    source = build_source(cfg.dataset, cfg.dataset.train_split)
    class_ids = output_class_ids(source, cfg.data.target_classes, cfg.data.exclude_classes)
    drop_ids = [class_id(source, c, "data.drop_images_with") for c in cfg.data.drop_images_with]
    listed = read_train_list(cfg.data.train_list) if cfg.data.train_list else source.ids
    ids, labels, dropped = training_images(source, listed, drop_ids, cfg.on_error)
    if not ids:
        raise ConfigError("no training images left after 'data.drop_images_with' / 'data.train_list'")
    names = [source.class_names[c] for c in class_ids]
    val_source = build_source(cfg.dataset, cfg.dataset.val_split) if cfg.dataset.val_split else None
    return TrainingData(source, val_source, class_ids, names, ids, labels, dropped)


def _parts(cfg: Config, data: TrainingData, device: torch.device) -> TrainingParts:
    source, class_ids, names = data.source, data.class_ids, data.names
    train_set = MultiLabelDataset(source, data.ids, data.labels, class_ids,
                                  _transform(cfg.data, True), substitute=True,
                                  on_error=cfg.on_error)
    if cfg.data.repeat_threshold > 0:
        sampler: Sampler = RepeatFactorSampler(
            repeat_factors(train_set.targets, cfg.data.repeat_threshold), seed=cfg.seed,
            num_replicas=distributed.world_size(), rank=distributed.rank())
    else:
        sampler = distributed.train_sampler(train_set, cfg.seed)
    batch_size = cfg.train.batch_size
    train_loader = _loader(train_set, batch_size, cfg.num_workers, device, sampler,
                           drop_last=len(sampler) > batch_size)

    validate_fn = None
    val_source = data.val_source
    if val_source is not None:
        val_ids, val_labels, _ = training_images(val_source, val_source.ids, [], cfg.on_error)
        val_set = MultiLabelDataset(val_source, val_ids, val_labels, class_ids,
                                    _transform(cfg.data, False), substitute=False,
                                    on_error=cfg.on_error)
        val_loader = _loader(val_set, cfg.val.batch_size, cfg.num_workers, device)

        def validate_fn(model: CamClassifier) -> dict:
            scores, targets = predict_scores(model, val_loader, device)
            return classification_metrics(scores, targets, names, cfg.val.threshold)

    with weights_error_names("model.weights"):
        model = build_cam_classifier(cfg.model.backbone, cfg.model.weights, cfg.model.output_stride,
                                     class_ids, freeze_bn=cfg.model.freeze_bn,
                                     recam=cfg.model.recam)
    if cfg.model.init_from:
        init_from_checkpoint(model, cfg.model.init_from)
    model = model.to(device)
    pos_weight = (positive_weights(train_set.targets, cfg.loss.max_pos_weight).to(device)
                  if cfg.loss.pos_weight else None)

    # Built (and its class names checked) once; all ones stays a float: the loss skips it.
    negative_weight = negative_weights(source, class_ids, cfg.loss.negative_weight,
                                       cfg.loss.negative_weight_classes)
    negative_weight = negative_weight.to(device) if (negative_weight != 1.0).any() else 1.0

    def step_fn(net, batch) -> dict:
        if not cfg.model.recam:
            logits = net(batch["image"])
            return {"loss": multilabel_loss(logits, batch["target"], pos_weight, negative_weight)}
        logits, feats = net(batch["image"], with_features=True)
        multilabel = multilabel_loss(logits, batch["target"], pos_weight, negative_weight)
        recam = recam_loss(feats, batch["target"], model.classifier.weight.flatten(1),
                           model.recam_head.weight.flatten(1))
        return {"loss": multilabel + cfg.loss.recam_weight * recam,
                "multilabel_loss": multilabel, "recam_loss": recam}

    return TrainingParts(model, model.parameter_groups(cfg.train.new_layer_lr_mult),
                         train_loader, step_fn, validate_fn)


def training_parts(cfg: Config, device: torch.device) -> TrainingParts:
    """The model, loader and loss step 1 trains, without claiming its folder."""
    return _parts(cfg, _read_data(cfg), device)


def run(cfg: Config) -> dict:
    """Run step 1 from a resolved config; returns the Trainer summary plus the output paths."""
    started = time.time()
    data = _read_data(cfg)
    out_dir = classifier_dir(cfg.work_dir, cfg.variant)
    device = start_training_step(cfg, out_dir, DEFAULTS, step_inputs(cfg))
    print(f"1_classifier: {len(data.ids)} training images ({data.dropped} dropped by "
          f"drop_images_with), {len(data.class_ids)} outputs: {', '.join(data.names)}",
          file=sys.stderr)
    parts = _parts(cfg, data, device)
    validate_fn = parts.validate_fn
    trainer = Trainer(
        distributed.wrap_model(parts.model, device, cfg.train.sync_bn), parts.param_groups,
        parts.loader, out_dir, cfg.train, device, step_fn=parts.step_fn, validate_fn=validate_fn,
        best_metric="map" if validate_fn else None,
        checkpoint_fields={**parts.model.checkpoint_fields(), "class_names": data.names,
                           "config": cfg.to_dict()},
        resume=cfg.resume)
    summary = trainer.fit()
    return finish_training_step(out_dir, {
        **summary, "out_dir": str(out_dir), "class_ids": data.class_ids,
        "num_train_images": len(data.ids),
        "val_map": summary["best_score"] if validate_fn else None}, started)


def summary_line(summary: dict) -> str:
    return (f"{Path(summary['out_dir']).name}: best val mAP {summary['best_score']:.4f} at "
            f"epoch {summary['best_epoch']} of {summary['epochs']} ({summary['seconds']} s) -> "
            f"{summary['out_dir']}")
