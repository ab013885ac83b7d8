"""Model builder and checkpoint reader of the standalone submission folder.

This file imports nothing from the training repository: a checkpoint carries everything
needed to rebuild the network, so the folder works when copied alone.

Checkpoint format (written by step 6, ``torch.save``; read with ``weights_only=True``)::

    {
        "model": state_dict,              # segmentation_models_pytorch model.state_dict()
        "model_config": {
            "arch": "DeepLabV3Plus",      # any smp architecture name (smp.create_model)
            "encoder_name": "resnet50",   # any smp encoder name, "tu-<timm name>" included
            "encoder_output_stride": 16,  # optional; only for archs that take it (DeepLabV3/V3+)
            "num_classes": 21,            # output channels, background (id 0) included
            "class_head": True,           # optional; an image-level head (smp aux_params) that
        },                                #   scores classes 1..num_classes-1 (class_gate)
        "class_names": ["background", ...],                 # len == num_classes
        "normalize": {"mean": [0.485, 0.456, 0.406],        # RGB, applied to pixels / 255
                      "std": [0.229, 0.224, 0.225]},
    }

Output channel ``c`` is class id ``c``. Extra top-level keys (e.g. ``epoch``) are ignored;
an unknown ``model_config`` key is an error, so a mismatch never builds the wrong network.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, NamedTuple

import segmentation_models_pytorch as smp
import torch
from torch import nn

REQUIRED_MODEL_KEYS = ("arch", "encoder_name", "num_classes")
OPTIONAL_MODEL_KEYS = ("encoder_output_stride", "class_head")
REQUIRED_CHECKPOINT_KEYS = ("model", "model_config", "class_names", "normalize")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the problem."""


class LoadedModel(NamedTuple):
    model: nn.Module
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_config: dict[str, Any]


def _validate_model_config(model_config: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_MODEL_KEYS if key not in model_config]
    if missing:
        raise CheckpointError(f"model_config is missing {', '.join(missing)}")
    unknown = set(model_config) - set(REQUIRED_MODEL_KEYS) - set(OPTIONAL_MODEL_KEYS)
    if unknown:
        raise CheckpointError(f"model_config has unknown key(s) {', '.join(sorted(unknown))}")
    if not 1 <= int(model_config["num_classes"]) <= 256:
        raise CheckpointError("model_config.num_classes must be in 1..256 (uint8 PNG output)")


def _validate_metadata(model_config: dict, class_names: list, normalize: dict) -> None:
    _validate_model_config(model_config)
    if len(class_names) != model_config["num_classes"]:
        raise CheckpointError(
            f"class_names has {len(class_names)} entries, num_classes is {model_config['num_classes']}"
        )
    for key in ("mean", "std"):
        if len(normalize.get(key, ())) != 3:
            raise CheckpointError(f"normalize.{key} must be a list of 3 floats (RGB)")


def build_model(model_config: dict[str, Any]) -> nn.Module:
    """Build the smp network described by a checkpoint's ``model_config`` (random weights)."""
    _validate_model_config(model_config)
    kwargs = {}
    if "encoder_output_stride" in model_config:
        arch_class = smp.MODEL_ARCHITECTURES_MAPPING.get(model_config["arch"].lower())
        if arch_class is None or "encoder_output_stride" not in inspect.signature(arch_class).parameters:
            raise CheckpointError(f"arch {model_config['arch']} does not take encoder_output_stride")
        kwargs["encoder_output_stride"] = int(model_config["encoder_output_stride"])
    if model_config.get("class_head"):
        kwargs["aux_params"] = class_head_params(int(model_config["num_classes"]))
    try:
        return smp.create_model(
            model_config["arch"],
            encoder_name=model_config["encoder_name"],
            encoder_weights=None,
            classes=int(model_config["num_classes"]),
            **kwargs,
        )
    except (KeyError, RuntimeError) as error:  # smp / timm: unknown arch or encoder
        reason = str(error).strip("'\"")[:200]
        raise CheckpointError(
            f"cannot build {model_config['arch']} with encoder {model_config['encoder_name']}: {reason}"
        ) from error


def class_head_params(num_classes: int) -> dict[str, Any]:
    """smp's image-level head: global average pooling and a linear layer with one logit per
    foreground class (background is never gated, so it has none)."""
    return {"classes": num_classes - 1, "pooling": "avg", "dropout": None, "activation": None}


def split_outputs(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(segmentation logits, image-level class logits or None): with a class head, smp
    models return both."""
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, None


def checkpoint_metadata(model_config: dict[str, Any], class_names: list[str], mean: list[float],
                        std: list[float]) -> dict[str, Any]:
    """Everything but the weights that a checkpoint for this folder holds, validated exactly
    as it will be read (step 6 stores it in best.pt / last.pt too)."""
    normalize = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    model_config = dict(model_config)
    _validate_metadata(model_config, list(class_names), normalize)
    return {"model_config": model_config, "class_names": list(class_names), "normalize": normalize}


def make_checkpoint(state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
                    class_names: list[str], mean: list[float], std: list[float]) -> dict[str, Any]:
    """The dict to ``torch.save`` for this folder (step 6 exports its best network so)."""
    return {"model": state_dict, **checkpoint_metadata(model_config, class_names, mean, std)}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the network from a checkpoint file, in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle / zip errors of many kinds; torch's text would advise the unsafe
        # weights_only=False, so the message says only what the file is not
        raise CheckpointError(f"{path}: not a checkpoint step 6 exported, or truncated") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint")
    missing = [key for key in REQUIRED_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    model_config = dict(checkpoint["model_config"])
    class_names = [str(name) for name in checkpoint["class_names"]]
    normalize = checkpoint["normalize"]
    _validate_metadata(model_config, class_names, normalize)

    model = build_model(model_config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match model_config: {first_line}") from error
    model.to(device).eval()
    return LoadedModel(
        model=model,
        class_names=class_names,
        mean=tuple(float(v) for v in normalize["mean"]),
        std=tuple(float(v) for v in normalize["std"]),
        model_config=model_config,
    )
