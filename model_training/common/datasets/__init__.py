"""Dataset sources by name: ``build_source(cfg.dataset, split)``."""
from __future__ import annotations

from ..config import ConfigError
from .base import ImageLoadError, ImageSource, labels_to_vector

__all__ = ["DATASET_NAMES", "ImageLoadError", "ImageSource", "build_source",
           "check_dataset_name", "labels_to_vector"]

DATASET_NAMES = ("toy", "voc", "lid")


def check_dataset_name(name: str) -> None:
    """Before anything else about the dataset, so a misspelt name is reported as such."""
    if name not in DATASET_NAMES:
        raise ConfigError(f"key 'dataset.name': unknown dataset {name!r} "
                          f"(known: {', '.join(DATASET_NAMES)})")


def build_source(dataset_cfg, split: str) -> ImageSource:
    """The named dataset's split; a missing folder or list is a one-line ConfigError."""
    name = dataset_cfg["name"]
    check_dataset_name(name)
    try:
        if name == "toy":
            from .toy import build_toy_source
            return build_toy_source(dataset_cfg, split)
        if name == "voc":
            from .voc import VOCSource
            return VOCSource(dataset_cfg["root"], split, dataset_cfg.get("class_names"),
                             dataset_cfg.get("labels_file"), classes=dataset_cfg.get("classes", ""))
        if name == "lid":
            from .lid import LIDSource
            return LIDSource(dataset_cfg["root"], split, dataset_cfg.get("class_names"),
                             dataset_cfg.get("labels_file"))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"dataset '{name}' split '{split}': {err}") from None
